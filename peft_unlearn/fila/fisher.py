"""Streaming empirical Fisher information of the forget and retain data (FILA, arXiv 2408.06621, section 3).

For every paired batch (forget batch, retain batch) and for each of the two, the gradient ``g`` of
the model's own mean-token NLL (``model(**batch).loss``, labels shifted inside, -100 ignored) with
respect to every target weight is accumulated as ``F += n * g**2`` with ``n = (labels != -100).sum()``
counted on the **unshifted** labels, as in the official code; ``N += n``. These are mini-batch mean
gradients, not per-sample gradients.

How the gradients are obtained: each target layer's weight gradient ``Σ_t g_t x_tᵀ`` is formed from a
forward hook (the layer input ``x``) and a hook on the layer output (its gradient ``g``), squared into
the accumulator and dropped at once (`peft_unlearn.fila.fisher_hooks`). The backward pass runs to the
input-embedding output only, so no weight needs ``requires_grad``, no ``.grad`` is left anywhere, at
most one layer gradient exists at a time, and the weights may be 4-bit/8-bit bitsandbytes layers (the
Fisher of the dequantized weight), FSDP2 ``DTensor`` or ZeRO-3 partitioned parameters.

Choices of this implementation (documented deviations from the official code):

* Accumulators are fp32 even for bf16/fp16 models (``fp32_accumulation=False`` reproduces the
  official bf16 accumulation).
* Adapters are disabled (PeftModel) so the statistics belong to the base weights. Parameter flags
  and train/eval modes are restored afterwards.
* The model runs in **eval mode** by default (dropout off, deterministic); the official code used
  train mode (``train_mode=True``). LoRA dropout does not matter since adapters are disabled.
* Retain batches are drawn in order, one per forget batch, restarting the retain loader when it is
  exhausted (the official code pairs each forget item with one random retain item).
* Batches without supervised tokens are skipped.
* A weight shared by several layers (tied embeddings used as `lm_head`) gets the Fisher of the
  target layer's own use of it.
* Under ``torch.distributed`` the accumulators and counts are summed over ranks (each rank sees its
  own data shard), so every rank ends with identical statistics.

Memory: see the modes of [`estimate_fisher`][peft_unlearn.fila.fisher.estimate_fisher] (accumulators on the
accelerator, in host memory, or a group of layers per pass).

Examples:
    >>> from peft_unlearn.fila.fisher import estimate_fisher
    >>> stats = estimate_fisher(peft_model, forget_loader, retain_loader)  # doctest: +SKIP
    >>> f_hat = stats.relative_importance()  # {name: [out, in] fp32}  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import has_peft_adapters, is_conv1d, is_linear_like
from .fisher_cache import FisherCacheKey, architecture, combine_over_ranks, settings_json, targets_digest
from .fisher_passes import DataDigest, compute_statistics, plan_passes, rank
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
            name: Layer name (a key of `importance_f`).
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
        """``F_hat`` for every layer (see `layer_relative_importance`).

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

    def save(self, path: str | os.PathLike, key: FisherCacheKey | None = None) -> None:
        """Write the statistics to a safetensors file (counts, and the cache key if given, in the metadata).

        Args:
            path: Target file; parent folders are created.
            key: What the statistics were computed from (written by `estimate_fisher(cache_path=...)`).
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
        metadata["names"] = json.dumps(list(self.importance_f))  # safetensors sorts keys; keep the model order
        if key is not None:
            metadata["key"] = key.to_json()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FisherStatistics:
        """Read statistics written by `save`.

        Args:
            path: The safetensors file.
            device: Where to put the accumulators.

        Returns:
            The statistics.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            _check_format(handle.metadata() or {}, path)
            metadata = handle.metadata() or {}
            counts = json.loads(metadata["counts"])
            forget, retain = {}, {}
            for key in handle.keys():
                kind, name = key.split("::", 1)
                (forget if kind == "f" else retain)[name] = handle.get_tensor(key)
        order = json.loads(metadata.get("names", "[]"))
        if sorted(order) == sorted(forget):
            forget = {name: forget[name] for name in order}
            retain = {name: retain[name] for name in order if name in retain}
        return cls(forget, retain, counts["f_count"], counts["r_count"], counts["num_batches"])


# ----------------------------------------------------------------------------------------------------------------
# target discovery
# ----------------------------------------------------------------------------------------------------------------


def _check_format(metadata: Mapping[str, str], path: str | os.PathLike) -> None:
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"{path} is not a peft_unlearn Fisher file (metadata format {metadata.get('format')!r}, "
            f"expected {_FORMAT!r}); it is left untouched. Delete it or pass another `cache_path`."
        )


def read_cache_key(path: str | os.PathLike) -> FisherCacheKey | None:
    """The key stored in a Fisher file (None for files written before keys existed).

    Args:
        path: A file written by [`FisherStatistics.save`][peft_unlearn.fila.fisher.FisherStatistics.save].

    Returns:
        The stored key, or None.

    Raises:
        ValueError: If the file is not a Fisher file of this library.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for unreadable files
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); it is left untouched. Delete it or pass "
            "another `cache_path`."
        ) from error
    _check_format(metadata, path)
    return FisherCacheKey.from_json(metadata.get("key"))


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


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
    if has_peft_adapters(model):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and is_linear_like(module.get_base_layer()):
                candidates[normalize_module_name(name)] = module.get_base_layer()
        if not candidates and target_modules is None:
            raise ValueError("The PeftModel has no LoRA layer on an nn.Linear/Conv1D module to estimate Fisher for.")
    else:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in model.named_modules():
            if is_linear_like(module) and module is not output:
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
        if not is_linear_like(module):
            raise ValueError(
                f"`target_modules` entry {name!r} is a {type(module).__name__}; FILA supports nn.Linear and "
                "Conv1D layers only."
            )
        result[name] = module
    if not result:
        raise ValueError("`target_modules` is empty; pass at least one module name or None.")
    return result


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a linear layer, whatever its weight's storage (packed 4-bit, ZeRO-3, DTensor)."""
    if is_conv1d(module):
        return int(module.nf), int(module.weight.shape[0] if module.weight.dim() == 2 else module.nx)
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    shape = tuple(getattr(module.weight, "ds_shape", module.weight.shape))
    return int(shape[0]), int(shape[1])


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
    layers_per_pass: int | None = None,
    max_accumulator_bytes: int | None = None,
    on_cache_mismatch: str = "recompute",
) -> FisherStatistics:
    """Estimate the forget and retain Fisher information of the target weights.

    Each target layer's weight gradient is formed from layer hooks (output gradient times input), squared
    into its accumulator and dropped, so no base weight needs a gradient and quantized or sharded
    weights work (see the module docstring).

    Memory modes (the statistics are identical in every mode):

    * default: two fp32 accumulators per target weight on the weight's device, one pass;
    * ``accumulator_device="cpu"``: the accumulators live in (pinned) host memory; each layer's
      gradient is copied there as soon as it is formed. The accelerator holds one layer gradient
      at a time on top of the forward/backward activations;
    * ``layers_per_pass=N`` or ``max_accumulator_bytes=B``: the target layers are split into groups
      (model order) and each group gets its own pass over the data (the dataloaders must yield the same
      batches every time). Only the current group's accumulators are on the accelerator; finished groups
      move to ``accumulator_device`` (default ``"cpu"`` in this mode). Costs one forward/backward pass
      per group.

    Args:
        model: A PeftModel (adapters are disabled during the pass; targets default to its LoRA
            targets) or a plain causal LM (targets default to every Linear/Conv1D but the LM head).
        forget_dataloader: Yields causal-LM dicts ``input_ids``, ``attention_mask``, ``labels`` (-100 masked).
        retain_dataloader: Same for retain data; one retain batch is paired with each forget batch
            (restarted when exhausted). ``None``: forget statistics only.
        target_modules: Module names (plain-model naming) to restrict the statistics to.
        max_batches: Stop after this many forget batches (per rank).
        show_progress: Show a tqdm bar (rank 0 only).
        cache_path: A safetensors file. If it exists and was computed from the same base weights, target
            layers, forget/retain batches and settings (see `peft_unlearn.fila.fisher_cache`), it is loaded
            instead of computing. If it was written by this library for other inputs, see
            ``on_cache_mismatch``; any other file raises ``ValueError`` and is left untouched. After
            computing, the statistics and their key are written there (rank 0).
        fp32_accumulation: fp32 accumulators (default); False accumulates in the weight dtype like the
            official code.
        train_mode: Run the model in train mode (dropout on, as the official code) instead of eval mode.
        accumulator_device: Device of the returned statistics (default: each weight's device; ``"cpu"``
            when the layers are processed in several passes).
        layers_per_pass: Process at most this many target layers per pass over the data.
        max_accumulator_bytes: Process as many layers per pass as fit in this many accumulator bytes.
        on_cache_mismatch: ``"recompute"`` (default): warn which key fields differ, recompute and overwrite
            the cache; ``"error"``: raise ``ValueError`` instead.

    Returns:
        [`FisherStatistics`][peft_unlearn.fila.fisher.FisherStatistics]; identical on every rank under `torch.distributed`.

    Raises:
        ValueError: On bad arguments, data without supervised tokens, a non-finite loss, or a cache file
            that is not a Fisher file of this library (or a mismatching one with ``on_cache_mismatch="error"``).

    Examples:
        >>> stats = estimate_fisher(model, forget_loader, retain_loader, max_batches=8)  # doctest: +SKIP
        >>> low_memory = estimate_fisher(model, forget_loader, retain_loader, accumulator_device="cpu")  # doctest: +SKIP
        >>> stats.f_count, stats.num_batches  # doctest: +SKIP
        (1234, 8)
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)):
        raise TypeError(f"`max_batches` must be an int or None, got {max_batches!r}.")
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"`max_batches` must be positive or None, got {max_batches}.")
    if forget_dataloader is None:
        raise ValueError("`forget_dataloader` is required to estimate the Fisher information.")
    if on_cache_mismatch not in ("recompute", "error"):
        raise ValueError(f"`on_cache_mismatch` must be 'recompute' or 'error', got {on_cache_mismatch!r}.")
    plan_passes({}, 8, layers_per_pass, max_accumulator_bytes)  # validates the two limits

    model = _unwrap(model)
    targets = resolve_fisher_targets(model, target_modules)
    shapes = {name: _weight_shape(module) for name, module in targets.items()}
    settings = settings_json(fp32_accumulation=fp32_accumulation, train_mode=train_mode, max_batches=max_batches)

    def compute(forget: Iterable, retain: Iterable | None) -> tuple[FisherStatistics, str, str]:
        forget_acc, retain_acc, totals = compute_statistics(
            model,
            targets,
            shapes,
            forget,
            retain,
            max_batches,
            show_progress,
            fp32_accumulation,
            train_mode,
            accumulator_device,
            layers_per_pass,
            max_accumulator_bytes,
        )
        stats = FisherStatistics(forget_acc, retain_acc, totals.f_count, totals.r_count, totals.num_batches)
        _check_counts(stats, retain)
        return stats, totals.forget_digest, totals.retain_digest

    if cache_path is None:
        return compute(forget_dataloader, retain_dataloader)[0]
    return _cached(
        Path(cache_path),
        model,
        shapes,
        settings,
        forget_dataloader,
        retain_dataloader,
        max_batches,
        compute,
        on_cache_mismatch,
    )


def _check_counts(stats: FisherStatistics, retain_dataloader: Any) -> None:
    if stats.f_count == 0:
        raise ValueError(
            "The forget dataloader produced no supervised tokens (every label is -100 or it is empty); FILA needs "
            "forget labels."
        )
    if retain_dataloader is not None and stats.r_count == 0:
        raise ValueError("The retain dataloader produced no supervised tokens; pass retain_dataloader=None.")


def _consumed(
    forget_dataloader: Iterable, retain_dataloader: Iterable | None, max_batches: int | None
) -> tuple[list[Any], list[Any] | None, str, str]:
    """The batches a pass would consume (materialised, so one-shot iterators still work) and their digests."""
    import itertools

    from .fisher_passes import cycle_batches

    forget_digest, retain_digest = DataDigest(), DataDigest()
    forget = list(forget_digest.wrap(itertools.islice(iter(forget_dataloader), max_batches)))
    retain = None
    if retain_dataloader is not None:
        retain_iter = cycle_batches(retain_dataloader)
        retain = list(retain_digest.wrap(next(retain_iter) for _ in forget))
    return (
        forget,
        retain,
        combine_over_ranks(forget_digest.hexdigest()),
        combine_over_ranks(retain_digest.hexdigest()) if retain is not None else "none",
    )


def _cached(
    path: Path,
    model: nn.Module,
    shapes: Mapping[str, tuple[int, int]],
    settings: str,
    forget_dataloader: Iterable,
    retain_dataloader: Iterable | None,
    max_batches: int | None,
    compute: Callable[[Iterable, Iterable | None], tuple[FisherStatistics, str, str]],
    on_cache_mismatch: str,
) -> FisherStatistics:
    """Reuse ``path`` if its key matches what would be computed; otherwise compute and (over)write it."""
    from .fisher_cache import weight_fingerprint

    def key_for(forget_digest: str, retain_digest: str) -> FisherCacheKey:
        return FisherCacheKey(
            architecture=architecture(model),
            weights=weights,
            targets=targets_digest(shapes),
            forget_data=forget_digest,
            retain_data=retain_digest,
            settings=settings,
        )

    weights = weight_fingerprint(model)
    if not path.is_file():
        stats, forget_digest, retain_digest = compute(forget_dataloader, retain_dataloader)
        key = key_for(combine_over_ranks(forget_digest), combine_over_ranks(retain_digest))
    else:
        stored = read_cache_key(path)  # raises, leaving the file alone, if it is not ours
        forget, retain, forget_digest, retain_digest = _consumed(forget_dataloader, retain_dataloader, max_batches)
        key = key_for(forget_digest, retain_digest)
        differing = key.differences(stored)
        if _agree(not differing):
            stats = FisherStatistics.load(path)
            stats.validate(shapes, source=f"Cached Fisher statistics in {path}")
            return stats
        reason = (
            "it was written without a key (older version)"
            if stored is None
            else f"these inputs differ: {', '.join(differing) or 'on another rank'}"
        )
        if on_cache_mismatch == "error":
            raise ValueError(
                f"The Fisher cache {path} was computed for other inputs ({reason}). Delete it, pass another "
                "`cache_path`, or on_cache_mismatch='recompute' to overwrite it."
            )
        if rank() == 0:
            warnings.warn(
                f"Not reusing the Fisher cache {path}: {reason}. Recomputing and overwriting it.", stacklevel=3
            )
        stats = compute(forget, retain)[0]
    if rank() == 0:
        stats.save(path, key=key)
    return stats


def _agree(flag: bool) -> bool:
    """True only if ``flag`` holds on every rank (all ranks must take the same branch)."""
    from .fisher_passes import distributed

    if not distributed():
        return flag
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, bool(flag))
    return all(values)
