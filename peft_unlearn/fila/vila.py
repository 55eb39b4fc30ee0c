"""VILA: variance-based importance through the LoRA factors, then FILA's weighted low-rank init.

VILA (Kim et al., COLM 2025, arXiv 2508.21300) replaces FILA's Fisher pass over the full base weights
with a pass over the LoRA factors only:

1. The adapter's factors ``A`` [r, in] and ``B`` [out, r] are temporarily drawn from
   ``N(0, sigma**2)`` (``sigma = 0.05``; both non-zero, so both get gradients). Only the factors take
   gradients; the base weights never do.
2. For every paired batch (forget batch, retain batch) and each of the two, the gradient ``g`` of the
   model's own mean-token NLL with respect to each factor is accumulated token-weighted:
   ``G += n * g`` and ``Q += n * g**2`` with ``n`` the number of supervised labels (unshifted count),
   ``N += n``.
3. The importance of a factor is the gradient **variance** ``clamp(Q / N - (G / N)**2, min=0)``
   (FILA uses the raw second moment; VILA argues that the mean gradient measures a distributional
   mismatch, not importance).
4. The full-shape importance of a layer is ``I_B @ I_A`` ([out, r] @ [r, in]), separately for forget
   and retain; from there FILA's relative importance ``F_f / (eps + F_r)`` and its weighted
   low-rank init ([`fila_init_layer`][peft_unlearn.fila.init.fila_init_layer]) apply unchanged, so the output is
   unchanged at init and the adapter saves as a portable plain LoRA.

The factors are restored after the pass (the weighted init then overwrites them anyway).

Choices where the official code and the paper leave room (all documented on the functions):

* **One pass** over the forget data (``epochs=1``). The official scripts loop ``range(10)`` over a
  shuffled dataloader with dropout on, although their comment says one epoch; with a fixed batch
  order and dropout off every epoch would repeat the same gradients and leave the variance unchanged.
  ``epochs=10, train_mode=True`` with a shuffling dataloader reproduces the scripts.
* **No second division by the token count.** The official code divides the variance (already a
  per-token mean) by ``N`` once more before taking the ratio: ``(I_f / N_f) / (eps + I_r / N_r)``, i.e.
  ``(N_r / N_f) I_f / (N_r eps + I_r)``, which gives ``eps`` ``N_r`` times more weight and, where ``eps``
  dominates, scales the importance by about ``1 / N_f`` (``A0`` by its fourth root, ``B0`` by the inverse;
  docs/concepts/vila.md states it in full); here ``F_f / (eps + F_r)`` uses the variances themselves
  (``FisherStatistics`` holds ``N * (I_B @ I_A)`` with count ``N``).
* **Eval mode** by default (dropout off, deterministic), like [`estimate_fisher`][peft_unlearn.fila.fisher.estimate_fisher].
* The random factors come from a private generator seeded by ``seed``; the global RNG is untouched.

Cost: forward and backward passes like FILA's Fisher pass, but no ``[out, in]`` weight gradients (only
the ``r x (in + out)`` factor gradients) and four small accumulators per layer during the pass; the
returned full-shape statistics take as much memory as FILA's.

Examples:
    >>> import peft_unlearn
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights="vila"))  # doctest: +SKIP
    >>> info = initialize_vila_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FilaConfig
from .fisher import FisherStatistics
from .fisher_passes import all_reduce_, cycle_batches, distributed, model_device, prepare_batch, rank
from .init import initialize_fila_weights
from .state import VILA_INIT_NAME as VILA_INIT_NAME
from .state import adapter_lora_config, iter_lora_layers

__all__ = ["VILA_INIT_NAME", "estimate_vila_importance", "initialize_vila_weights", "vila_layer_importance"]


def vila_layer_importance(
    sum_grad_a: torch.Tensor,
    sum_sq_a: torch.Tensor,
    sum_grad_b: torch.Tensor,
    sum_sq_b: torch.Tensor,
    count: float,
) -> torch.Tensor:
    """Full-shape VILA importance ``I_B @ I_A`` of one layer from the token-weighted factor sums.

    Args:
        sum_grad_a: ``sum_batches n * g_A`` [r, in].
        sum_sq_a: ``sum_batches n * g_A**2`` [r, in].
        sum_grad_b: ``sum_batches n * g_B`` [out, r].
        sum_sq_b: ``sum_batches n * g_B**2`` [out, r].
        count: ``N = sum_batches n`` (supervised tokens, > 0).

    Returns:
        ``clamp(E[g_B**2] - E[g_B]**2, 0) @ clamp(E[g_A**2] - E[g_A]**2, 0)``, fp32 ``[out, in]``.

    Examples:
        >>> import torch
        >>> ga, gb = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0], [0.0]])  # one batch: zero variance
        >>> vila_layer_importance(ga, ga**2, gb, gb**2, 1.0).abs().sum().item()
        0.0
    """
    if not count > 0:
        raise ValueError(f"`count` must be positive (the number of supervised tokens), got {count!r}.")
    var_a = (sum_sq_a.float() / count - (sum_grad_a.float() / count).square()).clamp_min(0)
    var_b = (sum_sq_b.float() / count - (sum_grad_b.float() / count).square()).clamp_min(0)
    return var_b @ var_a


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")


def _vila_layers(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    adapter_lora_config(peft_model, adapter_name, VILA_INIT_NAME)
    layers = [(n, m) for n, m in iter_lora_layers(peft_model, adapter_name) if adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no LoRA layer with lora_A/lora_B factors.")
    return layers


def estimate_vila_importance(
    peft_model: nn.Module,
    forget_dataloader: Iterable[Mapping[str, Any]],
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    adapter_name: str = "default",
    *,
    sigma: float = 0.05,
    epochs: int = 1,
    max_batches: int | None = None,
    seed: int = 42,
    train_mode: bool = False,
    show_progress: bool = True,
    cache_path: str | os.PathLike | None = None,
) -> FisherStatistics:
    """Estimate VILA's full-shape forget and retain importance of every LoRA layer of an adapter.

    See the module docstring for the formula. Only the adapter's ``lora_A`` / ``lora_B`` factors take
    gradients (drawn from ``N(0, sigma**2)`` for the pass, restored afterwards); every ``requires_grad``
    flag and training mode is restored too, and no ``.grad`` is left behind.

    Args:
        peft_model: A PeftModel holding ``adapter_name`` (usually a fresh ``init_lora_weights="vila"``
            adapter).
        forget_dataloader: Yields causal-LM dicts ``input_ids``, ``attention_mask``, ``labels`` (-100 masked).
        retain_dataloader: Same for retain data; one retain batch is paired with each forget batch
            (restarted when exhausted). ``None``: forget statistics only.
        adapter_name: The adapter whose factors carry the gradients.
        sigma: Standard deviation of the random factors during the pass (VILA: 0.05).
        epochs: Passes over the forget data (default 1; the official scripts use 10, see the module
            docstring).
        max_batches: Stop each pass after this many forget batches (per rank).
        seed: Seed of the random factors (a private generator; the global RNG is not touched).
        train_mode: Run in train mode (dropout on) instead of eval mode.
        show_progress: Show a tqdm bar (rank 0 only).
        cache_path: If the file exists, load and validate it instead of computing; otherwise compute and
            save there (rank 0). Same format as [`FisherStatistics.save`][peft_unlearn.fila.fisher.FisherStatistics.save].

    Returns:
        [`FisherStatistics`][peft_unlearn.FisherStatistics] with ``importance_f[name] = N_f * (I_B @ I_A)``
        (fp32 ``[out, in]``, plain base-model module names), the same for retain, and the token counts, so
        that ``relative_importance(eps)`` is ``I_f / (eps + I_r)``. Identical on every rank under
        ``torch.distributed`` (sums and counts are all-reduced before the variance).

    Raises:
        ValueError: On bad arguments, an empty forget loader or no supervised tokens.

    Examples:
        >>> stats = estimate_vila_importance(model, forget_loader, retain_loader)  # doctest: +SKIP
        >>> f_hat = stats.relative_importance()  # {name: [out, in]}  # doctest: +SKIP
    """
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"`sigma` must be a positive number (VILA uses 0.05), got {sigma!r}.")
    _check_positive_int("epochs", epochs)
    _check_positive_int("max_batches", max_batches, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")
    if forget_dataloader is None:
        raise ValueError("`forget_dataloader` is required to estimate the VILA importance.")
    model = peft_model.module if isinstance(peft_model, nn.parallel.DistributedDataParallel) else peft_model
    layers = _vila_layers(model, adapter_name)
    shapes = {
        name: (layer.lora_B[adapter_name].weight.shape[0], layer.lora_A[adapter_name].weight.shape[1])
        for name, layer in layers
    }
    if cache_path is not None and Path(cache_path).is_file():
        stats = FisherStatistics.load(cache_path)
        stats.validate(shapes, source=f"Cached VILA importance in {cache_path}")
        return stats

    names = [name for name, _ in layers]
    factors = [(layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight) for _, layer in layers]
    params = [p for pair in factors for p in pair]
    saved_values = [p.detach().clone() for p in params]
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_modes = [(module, module.training) for module in model.modules()]
    saved_active = model.active_adapter
    device = model_device(model)

    def zeros() -> list[torch.Tensor]:
        return [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]

    sums = {"f": (zeros(), zeros()), "r": (zeros(), zeros()) if retain_dataloader is not None else None}
    counts = {"f": 0, "r": 0}
    num_batches = 0

    def accumulate(batch: Any, role: str) -> None:
        inputs, n = prepare_batch(batch, device, role)
        if n == 0:
            return
        loss = model(**inputs).loss
        if loss is None:
            raise ValueError(f"The model returned no loss for a {role} batch; it must accept `labels`.")
        if not torch.isfinite(loss):
            raise ValueError(f"The {role} loss is {loss.item()} (not finite); check the model and the data.")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        first, second = sums[role[0]]
        for grad, g_acc, q_acc in zip(grads, first, second):
            if grad is None:
                continue
            grad = grad.to(torch.float32)
            g_acc.add_(grad, alpha=n)
            q_acc.addcmul_(grad, grad, value=n)
        counts[role[0]] += n

    try:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in params:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * sigma
                param.copy_(noise.to(device=param.device, dtype=param.dtype))
        for param in model.parameters():
            param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        if saved_active != adapter_name:
            model.set_adapter(adapter_name)
        model.train(train_mode)
        from tqdm.auto import tqdm

        total = None
        if hasattr(forget_dataloader, "__len__"):
            per_epoch = len(forget_dataloader) if max_batches is None else min(len(forget_dataloader), max_batches)
            total = per_epoch * epochs
        progress = tqdm(total=total, desc="VILA importance", disable=not show_progress or rank() != 0)
        retain_iter = cycle_batches(retain_dataloader) if retain_dataloader is not None else None
        with torch.enable_grad():
            for _ in range(epochs):
                forget_iter = iter(forget_dataloader)
                if max_batches is not None:
                    forget_iter = itertools.islice(forget_iter, max_batches)
                for forget_batch in forget_iter:
                    accumulate(forget_batch, "forget")
                    if retain_iter is not None:
                        accumulate(next(retain_iter), "retain")
                    num_batches += 1
                    progress.update(1)
        progress.close()
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved_values):
                param.copy_(value)
        if model.active_adapter != saved_active:
            model.set_adapter(saved_active)
        for param, flag in saved_flags:
            param.requires_grad_(flag)
        for module, mode in saved_modes:
            module.training = mode

    f_count, r_count = counts["f"], counts["r"]
    if distributed():
        ordered = [t for role in ("f", "r") if sums[role] is not None for group in sums[role] for t in group]
        all_reduce_(ordered)
        totals = torch.tensor([f_count, r_count, num_batches], dtype=torch.float64, device=ordered[0].device)
        all_reduce_([totals])
        f_count, r_count, num_batches = (int(v) for v in totals.tolist())
    if f_count == 0:
        raise ValueError(
            "The forget dataloader produced no supervised tokens (every label is -100 or it is empty); VILA needs "
            "forget labels."
        )
    if retain_dataloader is not None and r_count == 0:
        raise ValueError("The retain dataloader produced no supervised tokens; pass retain_dataloader=None.")

    def full_shape(role: str, count: int) -> dict[str, torch.Tensor]:
        first, second = sums[role]
        out = {}
        for i, name in enumerate(names):
            # FisherStatistics divides by the count: store N * I so that the ratio uses the variances themselves
            out[name] = vila_layer_importance(first[2 * i], second[2 * i], first[2 * i + 1], second[2 * i + 1], count)
            out[name].mul_(count)
        return out

    importance_f = full_shape("f", f_count)
    importance_r = full_shape("r", r_count) if sums["r"] is not None else {}
    stats = FisherStatistics(importance_f, importance_r, f_count, r_count, num_batches)
    if cache_path is not None and rank() == 0:
        stats.save(cache_path)
    return stats


def initialize_vila_weights(
    peft_model: nn.Module,
    forget_dataloader: Iterable[Mapping[str, Any]] | None = None,
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    adapter_name: str = "default",
    *,
    importance: FisherStatistics | str | os.PathLike | None = None,
    sigma: float = 0.05,
    epochs: int = 1,
    max_batches: int | None = None,
    seed: int = 42,
    train_mode: bool = False,
    cache_path: str | os.PathLike | None = None,
    show_progress: bool = True,
    fila_config: FilaConfig | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute the VILA init of one adapter: VILA importance, then FILA's weighted low-rank init.

    Every LoRA layer of the adapter gets ``A0``, ``B0`` from the weighted SVD and a frozen copy of them that
    cancels ``s * B0 @ A0`` (the base weight is never modified), exactly as with [`initialize_fila_weights`][peft_unlearn.initialize_fila_weights]
    (so the model output is unchanged and ``save_pretrained`` writes the portable plain LoRA).

    Args:
        peft_model: A PeftModel with a fresh adapter (``init_lora_weights="vila"``, pending).
        forget_dataloader: Forget batches (``input_ids``, ``attention_mask``, ``labels``); required unless
            ``importance`` is given.
        retain_dataloader: Retain batches or None.
        adapter_name: The adapter to initialise.
        importance: Precomputed statistics of [`estimate_vila_importance`][peft_unlearn.estimate_vila_importance]
            (or the path of a saved file).
        sigma: Standard deviation of the random factors of the importance pass (VILA: 0.05).
        epochs: Passes over the forget data for the importance (default 1).
        max_batches: Limit on forget batches per pass.
        seed: Seed of the random factors of the importance pass.
        train_mode: Importance pass in train mode (dropout on).
        cache_path: Importance cache file (see [`estimate_vila_importance`][peft_unlearn.estimate_vila_importance]).
        show_progress: Show a progress bar.
        fila_config: Settings of the weighted init (eps, SVD, factor scale...); default: the adapter
            config's ``fila_config`` or `FilaConfig()`.

    Returns:
        The statistics of `initialize_fila_weights` (``svd_seconds``, ``num_layers``, counts...), with
        ``importance_seconds`` (the VILA pass), ``fisher_seconds`` (the same value, for code that reads FILA's
        key) and ``seconds`` (total).

    Examples:
        >>> info = initialize_vila_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
        >>> info["importance_seconds"] < info["seconds"]  # doctest: +SKIP
        True
    """

    start = time.perf_counter()
    if importance is None:
        if forget_dataloader is None:
            raise ValueError(
                "initialize_vila_weights needs `forget_dataloader` (and ideally `retain_dataloader`) or precomputed "
                "`importance` statistics."
            )
        importance = estimate_vila_importance(
            peft_model,
            forget_dataloader,
            retain_dataloader,
            adapter_name,
            sigma=sigma,
            epochs=epochs,
            max_batches=max_batches,
            seed=seed,
            train_mode=train_mode,
            show_progress=show_progress,
            cache_path=cache_path,
        )
    elif isinstance(importance, (str, os.PathLike)):
        importance = FisherStatistics.load(importance)
    elif not isinstance(importance, FisherStatistics):
        raise TypeError(f"`importance` must be FisherStatistics, a path or None, got {type(importance).__name__}.")
    importance_seconds = time.perf_counter() - start
    info = initialize_fila_weights(peft_model, adapter_name=adapter_name, fisher=importance, fila_config=fila_config)
    info["importance_seconds"] = importance_seconds
    info["fisher_seconds"] = importance_seconds
    info["seconds"] = time.perf_counter() - start
    return info
