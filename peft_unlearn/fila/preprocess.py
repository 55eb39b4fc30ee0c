"""`preprocess_fila`: Fisher statistics attached to a plain model, consumed by ``get_peft_model``.

The LoRA-GA-style alternative to calling `peft_unlearn.fila.initialize_fila_weights` after
``get_peft_model`` (PEFT's ``preprocess_loraga`` works the same way): every target layer of the
plain model gets its relative importance attached, and the FILA hook initialises the layer
during injection and deletes the attachment.

Examples:
    >>> preprocess_fila(base, cfg, forget_loader, retain_loader)  # doctest: +SKIP
    >>> model = get_peft_model(base, cfg)  # FILA weights computed during injection  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..utils import is_linear_like
from .config import get_fila_config, validate_fila_lora_config
from .fisher import FisherStatistics, estimate_fisher, resolve_fisher_targets
from .init import AttachedImportance
from .state import IMPORTANCE_ATTR, config_targets, is_fila_init

__all__ = ["preprocess_fila"]


def preprocess_fila(
    model: nn.Module,
    lora_config: Any,
    forget_dataloader: Iterable[Mapping[str, Any]],
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    *,
    max_batches: int | None = None,
    cache_path: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> FisherStatistics:
    """Attach FILA statistics to a plain model so that ``get_peft_model`` initialises FILA directly.

    Call it on the plain model with the LoRA config you will pass to ``get_peft_model``; every target
    layer gets its relative importance attached, which the FILA init consumes (and deletes) during
    injection. Layers without attached statistics stay pending.

    Args:
        model: The plain (not yet PEFT-wrapped) model.
        lora_config: The ``LoraConfig`` (``init_lora_weights="fila"``) that selects the targets.
        forget_dataloader: Forget batches (``input_ids``, ``attention_mask``, ``labels``).
        retain_dataloader: Retain batches or None.
        max_batches: Limit on forget batches.
        cache_path: Fisher cache file (see `peft_unlearn.fila.fisher.estimate_fisher`).
        show_progress: Show a progress bar.

    Returns:
        The Fisher statistics that were used.

    Raises:
        ValueError: For a PeftModel, a config that is not FILA, or targets that match no linear layer.

    Examples:
        >>> preprocess_fila(base, cfg, forget_loader, retain_loader)  # doctest: +SKIP
        >>> model = get_peft_model(base, cfg)  # doctest: +SKIP
    """
    if hasattr(model, "peft_config"):
        raise ValueError(
            "`preprocess_fila` expects the plain model before get_peft_model; for a PeftModel call "
            "initialize_fila_weights(model, forget_dataloader, retain_dataloader) instead."
        )
    if not is_fila_init(getattr(lora_config, "init_lora_weights", None)):
        raise ValueError(
            f"`lora_config.init_lora_weights` must be 'fila', got {getattr(lora_config, 'init_lora_weights', None)!r}."
        )
    validate_fila_lora_config(lora_config)
    fila_config = get_fila_config(lora_config)
    names = [n for n, m in config_targets(model, lora_config) if is_linear_like(m)]
    if not names:
        raise ValueError(
            f"`lora_config.target_modules`={lora_config.target_modules!r} matches no nn.Linear/Conv1D module of the "
            "model."
        )
    stats = estimate_fisher(
        model,
        forget_dataloader,
        retain_dataloader,
        target_modules=names,
        max_batches=max_batches,
        show_progress=show_progress,
        cache_path=cache_path,
        fp32_accumulation=fila_config.fp32_accumulation,
    )
    for name, module in resolve_fisher_targets(model, names).items():
        importance = stats.layer_relative_importance(name, fila_config.eps)
        setattr(module, IMPORTANCE_ATTR, AttachedImportance(importance, fila_config, name))
    return stats
