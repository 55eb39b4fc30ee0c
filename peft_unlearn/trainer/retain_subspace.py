"""The retain-subspace penalty (ROL of ReGLU, arXiv 2604.17396): keep LoRA updates out of the retain outputs.

For every LoRA layer of the trained adapter(s), ``Q_r`` [out, k] are the eigenvectors of the ``k`` largest
(non-zero, see `retain_basis`) eigenvalues of the layer's retain output covariance ``C_r = E_retain[y y^T]`` (base model, adapters off; the
statistics of `peft_unlearn.fila.covariance`, one vector per retain sequence by default). The penalty is

    weight * sum over layers of || Q_r^T B ||_F^2

with ``B`` [out, r] the layer's ``lora_B`` weight, the form of the official ReGLU code. It works with any init
(default LoRA, FILA, VILA, RILA). Its gradient ``2 weight Q_r Q_r^T B`` pulls the columns of ``B``, i.e. the
output directions the adapter can write to, out of the top retain subspace.

The paper words the regulariser in output space (the adapter's outputs on retain inputs inside the retain
subspace). The official code, followed here, penalises the weight ``B`` instead: no forward pass is needed,
and ``||Q_r^T B A x||`` is bounded by ``||Q_r^T B||_F ||A x||``, so a ``B`` outside the subspace keeps every
adapter output there. ``B`` is the trained ``lora_B`` itself (with the frozen offset of FILA/VILA/RILA it
includes the initial ``B_init``, exactly as the official code's ``B`` does after it rewrote the base weight).

Examples:
    >>> import torch
    >>> q = torch.eye(3)[:, :1]  # the retain subspace is the first output axis
    >>> subspace_penalty({"fc": torch.tensor([[2.0], [1.0], [0.0]])}, {"fc": q}).item()
    4.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..fila.covariance import estimate_output_covariance
from ..fila.rila import get_rila_config
from ..fila.state import init_name, iter_lora_layers

__all__ = ["RetainSubspace", "compute_retain_subspace", "retain_basis", "subspace_penalty"]


def subspace_penalty(lora_b: Mapping[Any, torch.Tensor], bases: Mapping[Any, torch.Tensor]) -> torch.Tensor:
    """``sum over layers of || Q^T B ||_F^2`` (fp32 or wider; differentiable in ``B``).

    Args:
        lora_b: ``key -> B`` [out, r] (keys: layer names, or any hashable).
        bases: ``key -> Q`` [out, k] with orthonormal columns; every key of ``lora_b`` must be present.

    Returns:
        A scalar tensor on the device of the first ``B``.
    """
    total = None
    for name, weight in lora_b.items():
        q = bases[name]
        dtype = torch.promote_types(weight.dtype, torch.float32)
        projected = q.to(weight.device, dtype).mT @ weight.to(dtype)
        value = projected.pow(2).sum()
        total = value if total is None else total + value.to(total.device)
    if total is None:
        raise ValueError("subspace_penalty needs at least one layer; got none.")
    return total


#: Eigenvalues below this fraction of the largest one count as zero (the covariance is accumulated in fp32).
RANK_TOLERANCE = 1e-5
_OVERSAMPLE = 16


def retain_basis(covariance: torch.Tensor, rank: int, seed: int = 0) -> torch.Tensor:
    """``Q_r``: orthonormal eigenvectors of the ``rank`` largest eigenvalues of a PSD covariance (fp32 result).

    Only eigenvalues above ``RANK_TOLERANCE`` times the largest count: directions without retain energy are
    left out, so ``Q_r`` has ``min(rank, out, numerical rank)`` columns. (With one vector per sequence the rank is
    at most the number of retain sequences; the official code's ``128`` vectors then include an arbitrary basis of
    directions of zero eigenvalue, which this leaves out.) Large layers use a randomized range finder
    (``rank + 16`` vectors, two power iterations, then an exact eigendecomposition of the projected matrix in
    fp64): exact whenever the numerical rank is at most ``rank + 16``, as with per-sequence statistics; a close
    approximation of the top subspace otherwise. Small layers (``out <= 2 (rank + 16)``) use ``torch.linalg.eigh``.

    Args:
        covariance: Symmetric PSD ``[out, out]``.
        rank: Largest number of vectors, ``>= 1``.
        seed: Seed of the random test matrix (results do not depend on it when exact).

    Returns:
        ``[out, k]`` fp32 with orthonormal columns, ``1 <= k <= rank`` (``k = 0`` for a zero covariance).
    """
    c = covariance.to(torch.float64)
    c = (c + c.mT) / 2
    n = c.shape[0]
    width = min(n, rank + _OVERSAMPLE)
    if 2 * width >= n:
        values, vectors = torch.linalg.eigh(c)
        values, vectors = values.flip(-1), vectors.flip(-1)
    else:
        gen = torch.Generator(device=c.device).manual_seed(seed)
        basis = torch.linalg.qr(c @ torch.randn(n, width, generator=gen, dtype=c.dtype, device=c.device))[0]
        for _ in range(2):
            basis = torch.linalg.qr(c @ basis)[0]
        values, small = torch.linalg.eigh(basis.mT @ c @ basis)
        values, vectors = values.flip(-1), basis @ small.flip(-1)
    top = values[0].clamp_min(0)
    keep = min(rank, int((values > RANK_TOLERANCE * top).sum().item())) if top > 0 else 0
    return vectors[:, :keep].contiguous().float()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tensor, DTensor)


@dataclass
class RetainSubspace:
    """The top retain-output subspaces ``Q_r`` of an adapter's LoRA layers and the penalty on ``lora_B``.

    Attributes:
        bases: ``(adapter, layer name) -> Q_r`` [out, k] (fp32, on the layer's device).
        layers: ``(adapter, layer name) -> LoRA layer`` (its ``lora_B[adapter].weight`` is read at every call).
        seconds: Time the statistics pass and the eigendecompositions took.
    """

    bases: dict[tuple[str, str], torch.Tensor]
    layers: dict[tuple[str, str], nn.Module]
    seconds: float = 0.0

    def penalty(self) -> torch.Tensor:
        """``sum over layers of || Q_r^T B ||_F^2`` of the current ``lora_B`` weights (no weight applied)."""
        weights: dict[tuple[str, str], torch.Tensor] = {}
        for key, layer in self.layers.items():
            weight = layer.lora_B[key[0]].weight
            if _is_dtensor(weight):
                raise NotImplementedError(
                    "retain_subspace_weight > 0 does not support sharded (FSDP2/DTensor) LoRA weights yet; train "
                    "without FSDP (DDP works) or set retain_subspace_weight=0."
                )
            if weight.shape[0] != self.bases[key].shape[0]:
                raise NotImplementedError(
                    f"The lora_B weight of {key[1]} has shape {tuple(weight.shape)}, expected {self.bases[key].shape[0]} "
                    "rows: partitioned weights (e.g. DeepSpeed ZeRO-3) are not supported by retain_subspace_weight > 0."
                )
            weights[key] = weight
        return subspace_penalty(weights, self.bases)


def compute_retain_subspace(
    model: nn.Module,
    retain_dataloader: Iterable[Mapping[str, Any]],
    rank: int,
    adapter_names: Sequence[str],
    *,
    max_batches: int | None = None,
    covariance_options: Mapping[str, Any] | None = None,
    show_progress: bool = False,
) -> RetainSubspace:
    """Compute ``Q_r`` of every LoRA layer of ``adapter_names`` from the retain data (forward passes only).

    The statistics are RILA's (`RilaConfig`'s ``max_samples`` and ``pooling``: the adapter's ``rila_config`` for a
    RILA adapter, else the defaults, 256 sequences summed over their positions), so a RILA run's ``Q_r`` are the
    eigenvectors of the same ``C_r`` its init used.

    Args:
        model: A PeftModel (unwrapped).
        retain_dataloader: Retain batches (``input_ids``, ``attention_mask``).
        rank: ``k``, the subspace size, clamped to each layer's output size and the covariance's numerical rank
            (official: 128).
        adapter_names: The trained adapters whose ``lora_B`` is penalised.
        max_batches: Limit on the retain batches.
        covariance_options: ``accumulator_device`` / ``layers_per_pass`` of the statistics pass.
        show_progress: Show a progress bar.

    Returns:
        A `RetainSubspace`.

    Raises:
        ValueError: If ``rank < 1`` or the adapters have no LoRA layer.
    """
    import time

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`retain_subspace_rank` must be an integer >= 1, got {rank!r}.")
    start = time.perf_counter()
    layers: dict[tuple[str, str], nn.Module] = {}
    for adapter in adapter_names:
        for name, layer in iter_lora_layers(model, adapter):
            if adapter in getattr(layer, "lora_B", {}):
                layers[(adapter, name)] = layer
    if not layers:
        raise ValueError(
            f"retain_subspace_weight > 0 needs LoRA layers (lora_B) in the trained adapter(s) {list(adapter_names)}; "
            "found none."
        )
    configs = getattr(model, "peft_config", {})
    rila = [configs[a] for a in adapter_names if a in configs and init_name(configs[a].init_lora_weights) == "rila"]
    settings = get_rila_config(rila[0] if rila else None)
    names = list(dict.fromkeys(name for _, name in layers))
    stats = estimate_output_covariance(
        model,
        None,
        retain_dataloader,
        target_modules=names,
        max_samples=settings.max_samples,
        max_batches=max_batches,
        pooling=settings.pooling,
        show_progress=show_progress,
        **dict(covariance_options or {}),
    )
    per_layer: dict[str, torch.Tensor] = {}
    for name in names:
        per_layer[name] = retain_basis(stats.retain_covariance(name), rank)
        stats.pop(name)
    bases = {}
    for key, layer in layers.items():
        device = layer.lora_B[key[0]].weight.device
        bases[key] = per_layer[key[1]].to("cpu" if device.type == "meta" else device)
    return RetainSubspace(bases=bases, layers=layers, seconds=time.perf_counter() - start)
