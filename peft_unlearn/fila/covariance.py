"""Streaming second moments of target layers' outputs on forget and retain data (RILA, ROL).

For every target layer (a LoRA layer's base layer, or any ``nn.Linear``/``Conv1D``) and each data set,
forward hooks accumulate ``S = sum_i y_i y_i^T`` (fp32, ``[out, out]``) and the count ``N`` of the
vectors ``y_i``; ``C = S / N`` is the (uncentered) output covariance that ReGLU (arXiv 2604.17396)
uses. No gradient is computed (forward passes under ``torch.no_grad``), adapters are disabled so the
statistics belong to the base model, and the model runs in eval mode; modes are restored afterwards.

What a vector ``y_i`` is (``pooling``):

* ``"sum"`` (the official ReGLU code): one vector per sequence, the layer output summed over the
  sequence's positions. Padding positions are excluded here (``attention_mask == 0``); the official code
  sums them too, which makes its statistics depend on the padding length.
* ``"token"``: one vector per non-padding position.

The covariance is not centered, as in the official code (``H^T H / n``). Its ``eps * I`` shrinkage
(``1e-4``) is omitted: adding a multiple of the identity to both covariances shifts every eigenvalue of
``(1 - beta) C_f - beta C_r`` (and of ``C_r``) by the same amount and leaves the eigenvectors, and so the
init and the regulariser's subspace, unchanged.

Memory modes, as for the Fisher pass (`peft_unlearn.fila.fisher.estimate_fisher`), with identical
statistics in every mode: accumulators next to each weight (default), in host memory
(``accumulator_device="cpu"``), or the layers in groups with one pass over the data per group
(``layers_per_pass``). Under ``torch.distributed`` the sums and counts are all-reduced, so every rank ends
with the same statistics. bitsandbytes 4-bit/8-bit layers, FSDP2 and ZeRO-3 models work since only
layer outputs are read.

Examples:
    >>> import torch
    >>> stats = OutputCovariance({"fc": 4 * torch.eye(2)}, {}, f_count=2, r_count=0)
    >>> stats.forget_covariance("fc")[0, 0].item()
    2.0
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..utils import has_peft_adapters, is_conv1d
from .fisher import resolve_fisher_targets
from .fisher_passes import all_reduce_, check_reiterable, distributed, model_device, plan_passes, rank, weight_device

__all__ = ["POOLINGS", "OutputCovariance", "estimate_output_covariance"]

#: Accepted values of ``pooling``.
POOLINGS = ("sum", "token")


@dataclass
class OutputCovariance:
    """Accumulated output second moments of forget and retain data.

    Attributes:
        forget: ``name -> sum_i y_i y_i^T`` over the forget vectors, fp32 ``[out, out]`` (plain base-model names).
        retain: The same for the retain data (empty without retain data).
        f_count: Number of forget vectors (sequences with ``pooling="sum"``, tokens with ``"token"``).
        r_count: Number of retain vectors.
    """

    forget: dict[str, torch.Tensor]
    retain: dict[str, torch.Tensor] = field(default_factory=dict)
    f_count: int = 0
    r_count: int = 0

    @property
    def names(self) -> list[str]:
        """Layer names covered by the statistics (model order)."""
        return list(self.forget or self.retain)

    def forget_covariance(self, name: str) -> torch.Tensor:
        """``C_f = S_f / N_f`` of one layer (fp32, a new tensor)."""
        return _normalise(self.forget, name, self.f_count, "forget")

    def retain_covariance(self, name: str) -> torch.Tensor:
        """``C_r = S_r / N_r`` of one layer (fp32, a new tensor)."""
        return _normalise(self.retain, name, self.r_count, "retain")

    def pop(self, name: str) -> None:
        """Drop one layer's accumulators (free memory once the layer is initialised)."""
        self.forget.pop(name, None)
        self.retain.pop(name, None)


def _normalise(sums: Mapping[str, torch.Tensor], name: str, count: int, role: str) -> torch.Tensor:
    if name not in sums:
        raise KeyError(f"No {role} output covariance for layer {name!r}; available: {list(sums)[:4]}...")
    if count <= 0:
        raise ValueError(f"The {role} output covariance of {name!r} was computed from no vectors.")
    return sums[name].float() / count


def _out_features(module: nn.Module) -> int:
    if is_conv1d(module):
        return int(module.nf)
    if hasattr(module, "out_features"):
        return int(module.out_features)
    return int(getattr(module.weight, "ds_shape", module.weight.shape)[0])


@contextlib.contextmanager
def _forward_only(model: nn.Module) -> Iterator[None]:
    """Adapters off, eval mode, no gradients; modes restored.

    bitsandbytes 4-bit layers stay in train mode (their only use of the flag): on CPUs with AVX512-BF16, an
    eval-mode forward without gradients repacks the weight for an inference kernel through which no gradient flows
    afterwards, which would break the training that follows the statistics pass.
    """
    saved_modes = [(module, module.training) for module in model.modules()]
    disable = model.disable_adapter() if has_peft_adapters(model) else contextlib.nullcontext()
    try:
        model.eval()
        for module in model.modules():
            if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
                module.training = True
        with disable, torch.no_grad():
            yield
    finally:
        for module, mode in saved_modes:
            module.training = mode


class _OutputHooks:
    """Forward hooks adding ``Y^T Y`` of the current batch's (pooled) outputs into the accumulators."""

    def __init__(self, modules: Mapping[str, nn.Module], pooling: str) -> None:
        self.modules = modules
        self.pooling = pooling
        self.accumulators: Mapping[str, torch.Tensor] | None = None
        self.mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _OutputHooks:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.accumulators is None or name not in self.accumulators:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor):
                return
            out = out.float()
            mask = self.mask
            if out.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(out.shape[:2]):
                weights = mask.to(out.device, out.dtype)
                if self.pooling == "sum":
                    vectors = (out * weights[..., None]).sum(dim=1)
                else:
                    vectors = out[weights.bool()]
            elif out.dim() == 3:
                vectors = out.sum(dim=1) if self.pooling == "sum" else out.reshape(-1, out.shape[-1])
            else:
                vectors = out.reshape(-1, out.shape[-1])
            target = self.accumulators[name]
            moment = vectors.T @ vectors
            target.add_(moment.to(target.device))

        return hook


def _batch_inputs(batch: Any, device: torch.device, role: str, limit: int | None) -> tuple[dict[str, Any], int, int]:
    """``(model inputs, vectors it contributes for pooling "sum", tokens)``; at most ``limit`` sequences."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            f"The {role} dataloader must yield dicts with `input_ids` (and `attention_mask`), got "
            f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}."
        )
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if limit is not None:
        input_ids, mask = input_ids[:limit], mask[:limit]
    inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    return inputs, int(input_ids.shape[0]), int(mask.sum().item())


def estimate_output_covariance(
    model: nn.Module,
    forget_dataloader: Iterable[Mapping[str, Any]] | None,
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    target_modules: Sequence[str] | None = None,
    *,
    max_samples: int | None = None,
    max_batches: int | None = None,
    pooling: str = "sum",
    accumulator_device: torch.device | str | None = None,
    layers_per_pass: int | None = None,
    show_progress: bool = True,
) -> OutputCovariance:
    """Accumulate the output second moments of the target layers on forget and/or retain data.

    See the module docstring for what is accumulated and the memory modes.

    Args:
        model: A PeftModel (adapters are disabled; targets default to its LoRA layers' base layers) or a plain
            causal LM (targets default to every ``nn.Linear``/``Conv1D`` but the LM head).
        forget_dataloader: Yields dicts with ``input_ids`` and ``attention_mask`` (``labels`` are ignored), or
            None for retain statistics only.
        retain_dataloader: The same for retain data, or None.
        target_modules: Module names (plain-model naming) to restrict the statistics to.
        max_samples: Use at most this many sequences of each set (per rank); None: all.
        max_batches: Use at most this many batches of each set (per rank); None: all.
        pooling: ``"sum"`` (one vector per sequence, the official ReGLU statistics) or ``"token"``.
        accumulator_device: Device of the accumulators (default: each weight's device; ``"cpu"`` with
            several passes).
        layers_per_pass: Process at most this many target layers per pass over the data.
        show_progress: Show a tqdm bar (rank 0 only).

    Returns:
        `OutputCovariance`; identical on every rank under ``torch.distributed``.

    Raises:
        ValueError: On bad arguments, or a set that yields no vector.

    Examples:
        >>> stats = estimate_output_covariance(peft_model, forget_loader, retain_loader, max_samples=256)  # doctest: +SKIP
        >>> stats.forget_covariance("model.layers.0.self_attn.q_proj").shape  # doctest: +SKIP
        torch.Size([1024, 1024])
    """
    for arg, value in (("max_samples", max_samples), ("max_batches", max_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{arg}` must be a positive integer or None, got {value!r}.")
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {list(POOLINGS)}, got {pooling!r}.")
    if forget_dataloader is None and retain_dataloader is None:
        raise ValueError("Pass a `forget_dataloader`, a `retain_dataloader` or both; got neither.")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    targets = resolve_fisher_targets(model, target_modules)
    sizes = {name: _out_features(module) for name, module in targets.items()}
    roles = {"forget": forget_dataloader, "retain": retain_dataloader}
    roles = {role: loader for role, loader in roles.items() if loader is not None}
    groups = plan_passes({n: (s, s) for n, s in sizes.items()}, 4 * len(roles), layers_per_pass, None)
    for role, loader in roles.items():
        check_reiterable(loader, role, len(groups))
    final_device = accumulator_device if accumulator_device is not None else ("cpu" if len(groups) > 1 else None)
    device = model_device(model)

    from tqdm.auto import tqdm

    progress = tqdm(desc="Output covariance", disable=not show_progress or rank() != 0)
    sums: dict[str, dict[str, torch.Tensor]] = {role: {} for role in ("forget", "retain")}
    counts: dict[str, int] = {"forget": 0, "retain": 0}
    with _forward_only(model):
        for group in groups:
            modules = {name: targets[name] for name in group}
            group_sums: dict[str, dict[str, torch.Tensor]] = {}
            with _OutputHooks(modules, pooling) as hooks:
                for role, loader in roles.items():
                    # with several passes a group accumulates next to its weights, then moves to `final_device`
                    where = {
                        n: weight_device(targets[n]) if len(groups) > 1 or final_device is None else final_device
                        for n in group
                    }
                    acc = {n: torch.zeros(sizes[n], sizes[n], dtype=torch.float32, device=where[n]) for n in group}
                    group_sums[role] = acc
                    hooks.accumulators = acc
                    seen, vectors = 0, 0
                    batches: Iterator = iter(loader)
                    if max_batches is not None:
                        batches = itertools.islice(batches, max_batches)
                    for batch in batches:
                        limit = None if max_samples is None else max_samples - seen
                        inputs, sequences, tokens = _batch_inputs(batch, device, role, limit)
                        hooks.mask = inputs["attention_mask"]
                        model(**inputs, use_cache=False)
                        seen += sequences
                        vectors += sequences if pooling == "sum" else tokens
                        progress.update(1)
                        if max_samples is not None and seen >= max_samples:
                            break
                    hooks.accumulators = None
                    counts[role] = vectors
            if distributed():
                all_reduce_([group_sums[role][n] for role in group_sums for n in group])
            for role, acc in group_sums.items():
                for name in group:
                    sums[role][name] = acc[name] if final_device is None else acc[name].to(final_device)
    progress.close()
    if distributed():
        totals = torch.tensor([counts["forget"], counts["retain"]], dtype=torch.float64, device=device)
        all_reduce_([totals])
        counts = {"forget": int(totals[0].item()), "retain": int(totals[1].item())}
    for role in roles:
        if counts[role] == 0:
            raise ValueError(f"The {role} dataloader produced no sequence; the output covariance needs data.")
    return OutputCovariance(sums["forget"], sums["retain"], counts["forget"], counts["retain"])
