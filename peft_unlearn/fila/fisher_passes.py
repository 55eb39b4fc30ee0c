"""The passes over the forget/retain data that fill the Fisher accumulators.

One pass runs every paired (forget, retain) batch through the model with adapters disabled and
accumulates ``n · (∂L/∂W)²`` for a group of target layers (see `peft_unlearn.fila.fisher_hooks`).
The target layers can be split into groups, each with its own pass, so that only one group's
accumulators are on the accelerator at a time ([`plan_passes`][peft_unlearn.fila.fisher_passes.plan_passes]).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..utils import IGNORE_INDEX, has_peft_adapters
from .fisher_cache import DataDigest
from .fisher_hooks import WeightGradientHooks, check_no_cpu_inference_packing, input_embedding_roots
from .state import is_sharded

__all__ = ["PassResult", "compute_statistics", "plan_passes"]


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer computes in (the compute dtype of quantized layers)."""
    dtype = module.weight.dtype
    if dtype.is_floating_point:
        return dtype
    compute = getattr(module, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.float32


def weight_device(module: nn.Module) -> torch.device:
    device = module.weight.device
    return torch.device("cpu") if device.type == "meta" else device


# ----------------------------------------------------------------------------------------------------------------
# estimation
# ----------------------------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        device = embeddings.weight.device
        if device.type != "meta":
            return device
    return next(model.parameters()).device


def prepare_batch(batch: Any, device: torch.device, role: str) -> tuple[dict[str, Any], int]:
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
    count = int((labels != IGNORE_INDEX).sum().item())
    shifted = int((labels[..., 1:] != IGNORE_INDEX).sum().item()) if labels.dim() >= 1 else 0
    return inputs, (count if shifted > 0 else 0)


def cycle_batches(loader: Iterable) -> Iterator:
    """Yield the retain batches in order, restarting when exhausted (one-shot iterators are replayed)."""
    one_shot = isinstance(loader, Iterator)
    seen: list[Any] = []
    while True:
        produced = False
        for item in loader:
            produced = True
            if one_shot:
                seen.append(item)
            yield item
        if one_shot and seen:
            loader = seen
            one_shot = False
            continue
        if not produced:
            raise ValueError("The retain dataloader is empty; pass retain_dataloader=None to use forget data only.")


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    backend = dist.get_backend()
    for tensor in tensors:
        if backend == "nccl" and tensor.device.type != "cuda":
            moved = tensor.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved.to(tensor.device))
        elif tensor.device.type != "meta":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _fisher_mode(model: nn.Module, train_mode: bool) -> Iterator[None]:
    """Adapters off, unsharded parameters frozen (less saved activations), train/eval mode; all restored."""
    saved_flags = [(p, p.requires_grad) for p in model.parameters() if p.requires_grad and not is_sharded(p)]
    # reentrant activation checkpointing (active in train mode only) cannot run under torch.autograd.grad:
    # such layers run without checkpointing during the pass; non-reentrant checkpointing is kept
    reentrant = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and _reentrant(m)]
    saved_modes = [(module, module.training) for module in model.modules()]
    disable = model.disable_adapter() if has_peft_adapters(model) else contextlib.nullcontext()
    try:
        for param, _ in saved_flags:
            param.requires_grad_(False)
        for module in reentrant:
            module.gradient_checkpointing = False
        model.train(train_mode)
        with disable, torch.enable_grad():
            yield
    finally:
        for param, flag in saved_flags:
            param.requires_grad_(flag)
        for module, mode in saved_modes:
            module.training = mode
        for module in reentrant:
            module.gradient_checkpointing = True


def _reentrant(module: nn.Module) -> bool:
    """True unless the layer's checkpoint function is known to be non-reentrant (torch's default is reentrant)."""
    func = getattr(module, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    return keywords.get("use_reentrant", True) is not False


def plan_passes(
    shapes: Mapping[str, tuple[int, int]],
    bytes_per_layer_element: int,
    layers_per_pass: int | None = None,
    max_accumulator_bytes: int | None = None,
) -> list[list[str]]:
    """Split the target layers (in model order) into the groups that share one pass over the data.

    Args:
        shapes: ``name -> (out, in)`` in model order.
        bytes_per_layer_element: Accumulator bytes per weight element (4 per fp32 accumulator, times
            the number of accumulators: 8 with retain data).
        layers_per_pass: At most this many layers per group.
        max_accumulator_bytes: At most this many accumulator bytes per group (a single larger layer
            gets a group of its own).

    Returns:
        Groups of layer names; a single group when neither limit is given.

    Raises:
        ValueError: If both limits are given or one is not a positive int.

    Examples:
        >>> plan_passes({"a": (2, 2), "b": (2, 2), "c": (4, 4)}, 8, max_accumulator_bytes=64)
        [['a', 'b'], ['c']]
    """
    for arg, value in (("layers_per_pass", layers_per_pass), ("max_accumulator_bytes", max_accumulator_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"`{arg}` must be a positive int or None, got {value!r}.")
    if layers_per_pass is not None and max_accumulator_bytes is not None:
        raise ValueError(
            f"Pass either `layers_per_pass` ({layers_per_pass}) or `max_accumulator_bytes` ({max_accumulator_bytes}), "
            "not both."
        )
    names = list(shapes)
    if layers_per_pass is not None:
        return [names[i : i + layers_per_pass] for i in range(0, len(names), layers_per_pass)]
    if max_accumulator_bytes is None:
        return [names]
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        size = shapes[name][0] * shapes[name][1] * bytes_per_layer_element
        if current and used + size > max_accumulator_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


@dataclass
class PassResult:
    f_count: int
    r_count: int
    num_batches: int
    forget_digest: str
    retain_digest: str


def _run_pass(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    forget_acc: Mapping[str, torch.Tensor],
    retain_acc: Mapping[str, torch.Tensor],
    forget_dataloader: Iterable[Mapping[str, Any]],
    retain_dataloader: Iterable[Mapping[str, Any]] | None,
    max_batches: int | None,
    progress: Any,
) -> PassResult:
    """One pass over the paired data, accumulating the statistics of ``modules``."""
    device = model_device(model)
    forget_digest, retain_digest = DataDigest(), DataDigest()
    counts = {"forget": 0, "retain": 0}
    num_batches = 0
    forget_iter: Iterator = iter(forget_dataloader)
    if max_batches is not None:
        forget_iter = itertools.islice(forget_iter, max_batches)
    retain_iter = cycle_batches(retain_dataloader) if retain_dataloader is not None else None

    with input_embedding_roots(model) as roots, WeightGradientHooks(modules) as hooks:

        def accumulate(batch: Any, acc: Mapping[str, torch.Tensor], role: str, digest: DataDigest) -> None:
            if isinstance(batch, Mapping):
                digest.update(batch)
            inputs, n = prepare_batch(batch, device, role)
            if n == 0:
                return
            roots.clear()
            hooks.begin(acc, scale=n)
            try:
                loss = model(**inputs).loss
                if loss is None:
                    raise ValueError(f"The model returned no loss for a {role} batch; it must accept `labels`.")
                if not torch.isfinite(loss):
                    raise ValueError(f"The {role} loss is {loss.item()} (not finite); check the model and the data.")
                if not roots:
                    raise ValueError(
                        "The input embeddings were not called during the forward pass; the Fisher estimation needs "
                        "a model that embeds `input_ids` through `get_input_embeddings()`."
                    )
                # backward to the embedding output only: the hooks see every layer's output gradient, and no
                # parameter gradient is computed or stored
                torch.autograd.grad(loss, list(roots), allow_unused=True)
            finally:
                roots.clear()
            hooks.finish()
            counts[role] += n

        for forget_batch in forget_iter:
            accumulate(forget_batch, forget_acc, "forget", forget_digest)
            if retain_iter is not None:
                accumulate(next(retain_iter), retain_acc, "retain", retain_digest)
            num_batches += 1
            progress.update(1)
    return PassResult(
        counts["forget"],
        counts["retain"],
        num_batches,
        forget_digest.hexdigest(),
        retain_digest.hexdigest() if retain_dataloader is not None else "none",
    )


def check_reiterable(loader: Any, role: str, passes: int) -> None:
    if passes > 1 and loader is not None and isinstance(loader, Iterator):
        raise ValueError(
            f"The {role} dataloader is a one-shot iterator ({type(loader).__name__}), but the layers are processed "
            f"in {passes} passes (`layers_per_pass`/`max_accumulator_bytes`); pass a DataLoader or a list."
        )


def compute_statistics(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, int]],
    forget_dataloader: Iterable[Mapping[str, Any]],
    retain_dataloader: Iterable[Mapping[str, Any]] | None,
    max_batches: int | None,
    show_progress: bool,
    fp32_accumulation: bool,
    train_mode: bool,
    accumulator_device: torch.device | str | None,
    layers_per_pass: int | None,
    max_accumulator_bytes: int | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], PassResult]:
    check_no_cpu_inference_packing(model)  # bitsandbytes' CPU inference packing has no backward
    roles = 2 if retain_dataloader is not None else 1
    groups = plan_passes(shapes, 4 * roles, layers_per_pass, max_accumulator_bytes)
    check_reiterable(forget_dataloader, "forget", len(groups))
    check_reiterable(retain_dataloader, "retain", len(groups))
    # where the returned statistics live; with several passes, finished groups leave the accelerator
    final_device = accumulator_device if accumulator_device is not None else ("cpu" if len(groups) > 1 else None)

    total = None
    if hasattr(forget_dataloader, "__len__"):
        total = len(forget_dataloader)
        total = min(total, max_batches) if max_batches is not None else total
        total *= len(groups)
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc="FILA Fisher", disable=not show_progress or rank() != 0)
    forget_stats: dict[str, torch.Tensor] = {}
    retain_stats: dict[str, torch.Tensor] = {}
    first: PassResult | None = None
    with _fisher_mode(model, train_mode):
        for index, group in enumerate(groups):
            forget_acc: dict[str, torch.Tensor] = {}
            retain_acc: dict[str, torch.Tensor] = {}
            for name in group:
                module = targets[name]
                dtype = torch.float32 if fp32_accumulation else weight_dtype(module)
                where = weight_device(module) if len(groups) > 1 or final_device is None else final_device
                forget_acc[name] = torch.zeros(shapes[name], dtype=dtype, device=where)
                if retain_dataloader is not None:
                    retain_acc[name] = torch.zeros(shapes[name], dtype=dtype, device=where)
            result = _run_pass(
                model,
                {name: targets[name] for name in group},
                forget_acc,
                retain_acc,
                forget_dataloader,
                retain_dataloader,
                max_batches,
                progress,
            )
            if first is None:
                first = result
            elif result != first:
                raise RuntimeError(
                    f"Pass {index + 1} of {len(groups)} over the Fisher data saw other batches than pass 1 ({result} vs "
                    f"{first}); processing the layers in several passes needs dataloaders that yield the same batches "
                    "every time (no shuffling)."
                )
            if distributed():
                all_reduce_([forget_acc[n] for n in group] + [retain_acc[n] for n in group if n in retain_acc])
            for name in group:
                forget_stats[name] = (
                    forget_acc.pop(name) if final_device is None else forget_acc.pop(name).to(final_device)
                )
                if name in retain_acc:
                    retain_stats[name] = (
                        retain_acc.pop(name) if final_device is None else retain_acc.pop(name).to(final_device)
                    )
    progress.close()
    assert first is not None
    f_count, r_count, num_batches = first.f_count, first.r_count, first.num_batches
    if distributed():
        totals = torch.tensor([f_count, r_count, num_batches], dtype=torch.float64, device=model_device(model))
        all_reduce_([totals])
        f_count, r_count, num_batches = (int(v) for v in totals.tolist())
    ordered_f = {name: forget_stats[name] for name in shapes}
    ordered_r = {name: retain_stats[name] for name in shapes if name in retain_stats}
    totals = PassResult(f_count, r_count, num_batches, first.forget_digest, first.retain_digest)
    return ordered_f, ordered_r, totals
