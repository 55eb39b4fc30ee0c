"""Streaming empirical Fisher information of the forget and retain data (paper-notes section 3.1).

For every paired batch (forget batch, retain batch) and for each of the two, the gradient ``g`` of
the model's own mean-token NLL (``model(**batch).loss``, labels shifted inside, -100 ignored) with
respect to every target weight is computed and accumulated as ``F += n * g**2`` with
``n = (labels != -100).sum()`` counted on the **unshifted** labels, as in the official code; ``N += n``.
These are mini-batch mean gradients, not per-sample gradients.

Choices of this implementation (documented deviations from ``measure_importance.py``):

* Accumulators are fp32 even for bf16/fp16 models (``fp32_accumulation=False`` reproduces the
  official bf16 accumulation).
* Only the target base weights require grad; gradients come from :func:`torch.autograd.grad`, so no
  ``.grad`` is left anywhere. ``requires_grad`` flags and the training mode are restored afterwards.
* Adapters are disabled (PeftModel) so the statistics belong to the base weights.
* The model runs in **eval mode** by default (dropout off, deterministic); the official code used
  train mode (``train_mode=True``). LoRA dropout does not matter since adapters are disabled.
* Retain batches are drawn in order, one per forget batch, restarting the retain loader when it is
  exhausted (the official code pairs each forget item with one random retain item).
* Batches without supervised tokens are skipped.
* Under ``torch.distributed`` the accumulators and counts are summed over ranks (each rank sees its
  own data shard), so every rank ends with identical statistics.

Memory: two fp32 accumulators of the size of every target weight (forget and retain), plus one
temporary gradient per target weight during the backward pass. ``accumulator_device="cpu"`` keeps the
accumulators off the accelerator.

Examples:
    >>> from peft_unlearn.fila.fisher import estimate_fisher
    >>> stats = estimate_fisher(peft_model, forget_loader, retain_loader)  # doctest: +SKIP
    >>> f_hat = stats.relative_importance()  # {name: [out, in] fp32}  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state import normalize_module_name

__all__ = ["FisherStatistics", "estimate_fisher", "resolve_fisher_targets"]

_FORMAT = "peft_unlearn.fisher/1"


@dataclass
class FisherStatistics:
    """Accumulated Fisher statistics of forget and retain data.

    Attributes:
        importance_f: ``name -> F_f`` (sum over batches of ``n * g**2``), fp32 ``[out, in]`` in
            ``nn.Linear`` layout (Conv1D weights are transposed). Names are module names of the
            plain base model (``model.layers.0.self_attn.q_proj``).
        importance_r: Same for the retain data; empty when no retain data was given.
        f_count: ``N_f``, the number of supervised forget labels (unshifted count).
        r_count: ``N_r``, the same for retain data (0 without retain data).
        num_batches: Number of (paired) forget batches that were processed, summed over ranks.

    Examples:
        >>> import torch
        >>> s = FisherStatistics({"fc": torch.ones(2, 3)}, {"fc": torch.ones(2, 3)}, f_count=2, r_count=4)
        >>> s.relative_importance(eps=0.0)["fc"][0, 0].item()
        2.0
    """

    importance_f: dict[str, torch.Tensor]
    importance_r: dict[str, torch.Tensor] = field(default_factory=dict)
    f_count: int = 0
    r_count: int = 0
    num_batches: int = 0

    @property
    def names(self) -> list[str]:
        """Layer names covered by the statistics."""
        return list(self.importance_f)

    @property
    def has_retain(self) -> bool:
        """True if retain statistics are present."""
        return bool(self.importance_r) and self.r_count > 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Return ``name -> shape`` of the forget accumulators."""
        return {name: tuple(t.shape) for name, t in self.importance_f.items()}

    def layer_relative_importance(self, name: str, eps: float = 1e-5) -> torch.Tensor:
        """Relative importance ``F_hat`` of one layer (fp32 ``[out, in]``).

        ``F_hat = (F_f / N_f) / (eps + F_r / N_r)`` elementwise; ``F_f / N_f`` without retain data.

        Args:
            name: Layer name (a key of :attr:`importance_f`).
            eps: Stabiliser of the denominator (paper: 1e-5).

        Returns:
            A new fp32 tensor on the device of the accumulator.
        """
        if name not in self.importance_f:
            raise KeyError(f"No Fisher statistics for layer {name!r}; available: {sorted(self.importance_f)[:8]}...")
        if self.f_count <= 0:
            raise ValueError(
                "The Fisher statistics have f_count=0 (no supervised forget tokens); check that the forget "
                "dataloader yields `labels` that are not all -100."
            )
        forget = self.importance_f[name].float() / self.f_count
        if not self.has_retain:
            return forget
        retain = self.importance_r[name].float() / self.r_count
        return forget / (eps + retain)

    def relative_importance(self, eps: float = 1e-5) -> dict[str, torch.Tensor]:
        """``F_hat`` for every layer (see :meth:`layer_relative_importance`).

        Args:
            eps: Stabiliser of the denominator (paper: 1e-5).

        Returns:
            ``name -> F_hat`` (fp32 ``[out, in]``).
        """
        return {name: self.layer_relative_importance(name, eps) for name in self.importance_f}

    def validate(self, shapes: Mapping[str, Sequence[int]], source: str = "Fisher statistics") -> None:
        """Check that the statistics cover exactly these layers with these ``[out, in]`` shapes.

        Args:
            shapes: Expected ``name -> (out, in)``.
            source: Description used in the error message (e.g. the cache path).

        Raises:
            ValueError: On missing/extra layers or shape mismatches.
        """
        expected = {k: tuple(v) for k, v in shapes.items()}
        have = self.shapes()
        missing = sorted(set(expected) - set(have))
        extra = sorted(set(have) - set(expected))
        wrong = sorted(k for k in set(expected) & set(have) if expected[k] != have[k])
        if missing or extra or wrong:
            details = []
            if missing:
                details.append(f"missing layers {missing[:5]}")
            if extra:
                details.append(f"unexpected layers {extra[:5]}")
            if wrong:
                details.append(f"shape mismatch for {[(k, have[k], expected[k]) for k in wrong[:3]]}")
            raise ValueError(
                f"{source} do not match the model's target layers: {'; '.join(details)}. They were computed for "
                "another model or another set of target modules; delete the cache file or pass a matching one."
            )

    def to(self, device: torch.device | str) -> FisherStatistics:
        """Return a copy with every accumulator on ``device``."""
        return FisherStatistics(
            {k: v.to(device) for k, v in self.importance_f.items()},
            {k: v.to(device) for k, v in self.importance_r.items()},
            self.f_count,
            self.r_count,
            self.num_batches,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to a safetensors file (counts in the metadata).

        Args:
            path: Target file; parent folders are created.
        """
        from safetensors.torch import save_file

        tensors = {f"f::{k}": v.detach().to("cpu").contiguous() for k, v in self.importance_f.items()}
        tensors.update({f"r::{k}": v.detach().to("cpu").contiguous() for k, v in self.importance_r.items()})
        metadata = {
            "format": _FORMAT,
            "counts": json.dumps(
                {"f_count": int(self.f_count), "r_count": int(self.r_count), "num_batches": int(self.num_batches)}
            ),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FisherStatistics:
        """Read statistics written by :meth:`save`.

        Args:
            path: The safetensors file.
            device: Where to put the accumulators.

        Returns:
            The statistics.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(
                    f"{path} is not a peft_unlearn Fisher file (metadata format {metadata.get('format')!r}, "
                    f"expected {_FORMAT!r}); delete it or pass another `cache_path`."
                )
            counts = json.loads(metadata["counts"])
            forget, retain = {}, {}
            for key in handle.keys():
                kind, name = key.split("::", 1)
                (forget if kind == "f" else retain)[name] = handle.get_tensor(key)
        return cls(forget, retain, counts["f_count"], counts["r_count"], counts["num_batches"])


# ----------------------------------------------------------------------------------------------------------------
# target discovery
# ----------------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _linear_like(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def resolve_fisher_targets(model: nn.Module, target_modules: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Find the weight-holding modules whose Fisher information is needed.

    Args:
        model: A PeftModel (targets default to the base layers of its LoRA layers) or a plain model
            (targets default to every ``nn.Linear``/``Conv1D`` except the output embedding, like the
            official code).
        target_modules: Explicit module names (plain-model names, e.g. ``model.layers.0.mlp.up_proj``).

    Returns:
        ``normalized name -> module`` (an ``nn.Linear`` or ``Conv1D`` owning ``.weight``).

    Raises:
        ValueError: If a requested name does not exist or is not a linear layer, or nothing was found.
    """
    from peft.tuners.lora.layer import LoraLayer

    model = _unwrap(model)
    candidates: dict[str, nn.Module] = {}
    if _is_peft_model(model):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and _linear_like(module.get_base_layer()):
                candidates[normalize_module_name(name)] = module.get_base_layer()
        if not candidates and target_modules is None:
            raise ValueError("The PeftModel has no LoRA layer on an nn.Linear/Conv1D module to estimate Fisher for.")
    else:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in model.named_modules():
            if _linear_like(module) and module is not output:
                candidates[normalize_module_name(name)] = module
    if target_modules is None:
        if not candidates:
            raise ValueError("No nn.Linear/Conv1D module found to estimate Fisher for; pass `target_modules`.")
        return candidates
    if isinstance(target_modules, str):
        raise TypeError(
            f"`target_modules` must be a list of module names, got the string {target_modules!r}; wrap it in a list."
        )
    all_modules = {normalize_module_name(n): m for n, m in model.named_modules()}
    result = {}
    for name in target_modules:
        module = candidates.get(name)
        if module is None:
            module = all_modules.get(name)
            if module is not None and hasattr(module, "get_base_layer"):
                module = module.get_base_layer()
        if module is None:
            raise ValueError(
                f"`target_modules` entry {name!r} is not a module of the model; expected names such as "
                f"{list(candidates)[:3]}."
            )
        if not _linear_like(module):
            raise ValueError(
                f"`target_modules` entry {name!r} is a {type(module).__name__}; FILA supports nn.Linear and "
                "Conv1D layers only."
            )
        result[name] = module
    if not result:
        raise ValueError("`target_modules` is empty; pass at least one module name or None.")
    return result


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    from transformers.pytorch_utils import Conv1D

    shape = tuple(module.weight.shape)
    return (shape[1], shape[0]) if isinstance(module, Conv1D) else (shape[0], shape[1])


# ----------------------------------------------------------------------------------------------------------------
# estimation
# ----------------------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _prepare_batch(batch: Any, device: torch.device, role: str) -> tuple[dict[str, Any], int]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"The {role} dataloader must yield dicts with `input_ids`, `attention_mask` and `labels`, got "
            f"{type(batch).__name__}."
        )
    if "labels" not in batch or "input_ids" not in batch:
        raise ValueError(
            f"The {role} batches need `input_ids` and `labels` (-100 on ignored tokens), got keys {sorted(batch)}."
        )
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    labels = inputs["labels"]
    count = int((labels != -100).sum().item())
    shifted = int((labels[..., 1:] != -100).sum().item()) if labels.dim() >= 1 else 0
    return inputs, (count if shifted > 0 else 0)


def _cycle(loader: Iterable) -> Iterator:
    while True:
        produced = False
        for item in loader:
            produced = True
            yield item
        if not produced:
            raise ValueError("The retain dataloader is empty; pass retain_dataloader=None to use forget data only.")


def _all_reduce_(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    backend = dist.get_backend()
    for tensor in tensors:
        if backend == "nccl" and tensor.device.type != "cuda":
            moved = tensor.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved.to(tensor.device))
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def estimate_fisher(
    model: nn.Module,
    forget_dataloader: Iterable[Mapping[str, Any]],
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    target_modules: Sequence[str] | None = None,
    max_batches: int | None = None,
    show_progress: bool = True,
    cache_path: str | os.PathLike | None = None,
    *,
    fp32_accumulation: bool = True,
    train_mode: bool = False,
    accumulator_device: torch.device | str | None = None,
) -> FisherStatistics:
    """Estimate the forget and retain Fisher information of the target weights (one pass).

    Args:
        model: A PeftModel (adapters are disabled during the pass; targets default to its LoRA
            targets) or a plain causal LM (targets default to every Linear/Conv1D but the LM head).
        forget_dataloader: Yields causal-LM dicts ``input_ids``, ``attention_mask``, ``labels`` (-100 masked).
        retain_dataloader: Same for retain data; one retain batch is paired with each forget batch
            (restarted when exhausted). ``None``: forget statistics only.
        target_modules: Module names (plain-model naming) to restrict the statistics to.
        max_batches: Stop after this many forget batches (per rank).
        show_progress: Show a tqdm bar (rank 0 only).
        cache_path: If the file exists, load and validate it instead of computing (``ValueError`` on
            mismatch); otherwise compute and save there (rank 0).
        fp32_accumulation: fp32 accumulators (default); False accumulates in the weight dtype like the
            official code.
        train_mode: Run the model in train mode (dropout on, as the official code) instead of eval mode.
        accumulator_device: Device of the accumulators (default: the device of each weight).

    Returns:
        :class:`FisherStatistics`; identical on every rank under ``torch.distributed``.

    Examples:
        >>> stats = estimate_fisher(model, forget_loader, retain_loader, max_batches=8)  # doctest: +SKIP
        >>> stats.f_count, stats.num_batches  # doctest: +SKIP
        (1234, 8)
    """
    from transformers.pytorch_utils import Conv1D

    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)):
        raise TypeError(f"`max_batches` must be an int or None, got {max_batches!r}.")
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"`max_batches` must be positive or None, got {max_batches}.")
    if forget_dataloader is None:
        raise ValueError("`forget_dataloader` is required to estimate the Fisher information.")

    model = _unwrap(model)
    targets = resolve_fisher_targets(model, target_modules)
    shapes = {name: _weight_shape(module) for name, module in targets.items()}

    if cache_path is not None and Path(cache_path).is_file():
        stats = FisherStatistics.load(cache_path)
        stats.validate(shapes, source=f"Cached Fisher statistics in {cache_path}")
        return stats

    device = _model_device(model)
    acc_dtype = torch.float32
    forget_acc: dict[str, torch.Tensor] = {}
    retain_acc: dict[str, torch.Tensor] = {}
    for name, module in targets.items():
        dtype = torch.float32 if fp32_accumulation else module.weight.dtype
        acc_dtype = dtype
        where = accumulator_device if accumulator_device is not None else module.weight.device
        forget_acc[name] = torch.zeros(shapes[name], dtype=dtype, device=where)
        if retain_dataloader is not None:
            retain_acc[name] = torch.zeros(shapes[name], dtype=dtype, device=where)
    del acc_dtype

    names = list(targets)
    weights = [targets[name].weight for name in names]
    transposed = [isinstance(targets[name], Conv1D) for name in names]

    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_modes = [(module, module.training) for module in model.modules()]
    disable = model.disable_adapter() if _is_peft_model(model) else contextlib.nullcontext()
    counts = {"f": 0, "r": 0}
    num_batches = 0

    def accumulate(batch: Any, acc: dict[str, torch.Tensor], role: str) -> None:
        inputs, n = _prepare_batch(batch, device, role)
        if n == 0:
            return
        loss = model(**inputs).loss
        if loss is None:
            raise ValueError(f"The model returned no loss for a {role} batch; it must accept `labels`.")
        if not torch.isfinite(loss):
            raise ValueError(f"The {role} loss is {loss.item()} (not finite); check the model and the data.")
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for name, grad, is_t in zip(names, grads, transposed):
            if grad is None:
                continue
            grad = grad.t() if is_t else grad
            target = acc[name]
            grad = grad.to(device=target.device, dtype=target.dtype)  # no copy for fp32 grads on the same device
            target.addcmul_(grad, grad, value=n)  # fused: no [out, in] temporary for grad**2
        counts[role[0]] += n

    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        model.train(train_mode)
        total = None
        if hasattr(forget_dataloader, "__len__"):
            total = len(forget_dataloader)
            total = min(total, max_batches) if max_batches is not None else total
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="FILA Fisher", disable=not show_progress or _rank() != 0)
        retain_iter = _cycle(retain_dataloader) if retain_dataloader is not None else None
        forget_iter = iter(forget_dataloader)
        if max_batches is not None:
            forget_iter = itertools.islice(forget_iter, max_batches)
        with disable, torch.enable_grad():
            for forget_batch in forget_iter:
                accumulate(forget_batch, forget_acc, "forget")
                if retain_iter is not None:
                    accumulate(next(retain_iter), retain_acc, "retain")
                num_batches += 1
                progress.update(1)
        progress.close()
    finally:
        for param, flag in saved_flags:
            param.requires_grad_(flag)
        for module, mode in saved_modes:
            module.training = mode

    f_count, r_count = counts["f"], counts["r"]
    if _distributed():
        ordered = [forget_acc[n] for n in names] + [retain_acc[n] for n in names if n in retain_acc]
        _all_reduce_(ordered)
        totals = torch.tensor([f_count, r_count, num_batches], dtype=torch.float64, device=ordered[0].device)
        _all_reduce_([totals])
        f_count, r_count, num_batches = (int(v) for v in totals.tolist())

    if f_count == 0:
        raise ValueError(
            "The forget dataloader produced no supervised tokens (every label is -100 or it is empty); FILA needs "
            "forget labels."
        )
    if retain_dataloader is not None and r_count == 0:
        raise ValueError("The retain dataloader produced no supervised tokens; pass retain_dataloader=None.")
    stats = FisherStatistics(forget_acc, retain_acc, f_count, r_count, num_batches)
    if cache_path is not None and _rank() == 0:
        stats.save(cache_path)
    return stats
