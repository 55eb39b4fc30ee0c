"""The data-driven adapter initialisation (FILA, VILA, RILA) that `UnlearningTrainer.train` runs before the first step.

A pending FILA/VILA adapter gets its weights from the forget/retain data; on resume its frozen initial factors are
re-attached from the checkpoint's `_fila_init/` folder instead (re-running the init would not reproduce them in
general).

Examples:
    >>> stats = initialize_pending_adapters(model, args, None, loaders=make_loaders)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader
from transformers.trainer_utils import get_last_checkpoint

from ..fila.dispatch import initialize_adapter_weights, resolve_trainer_options
from ..fila.saving import INIT_DIR, has_data_driven_adapter, pending_data_driven_adapters, restore_fila_state
from ..utils import is_peft_model

__all__ = ["init_metrics", "initialize_pending_adapters"]

logger = logging.getLogger(__name__)


def _restore_from_checkpoint(model: nn.Module, checkpoint: str | None) -> None:
    """Re-attach the initial factors of `checkpoint`, or refuse to resume a pending adapter without them."""
    if checkpoint is None:
        return
    if (Path(checkpoint) / INIT_DIR).is_dir():
        restore_fila_state(model, checkpoint)
    elif pending_data_driven_adapters(model):
        raise ValueError(
            f"Cannot resume the adapter(s) {pending_data_driven_adapters(model)} from {str(checkpoint)!r}: the "
            f"checkpoint has no `{INIT_DIR}/` folder with the initial factors A0/B0 (re-running the init would "
            "not reproduce them). Resume from a checkpoint written by UnlearningTrainer (or "
            "save_pretrained(..., fila_portable=False)), or start a new run without `resume_from_checkpoint`."
        )


def initialize_pending_adapters(
    model: nn.Module,
    args: Any,
    resume_from_checkpoint: str | bool | None,
    loaders: Callable[[], tuple[DataLoader, DataLoader | None]],
    show_progress: bool = False,
) -> dict[str, Any] | None:
    """Compute the weights of the pending data-driven adapters of `model` from the forget/retain data.

    Args:
        model: The unwrapped trained model.
        args: The `UnlearningConfig` of the run (`output_dir`, `fila_max_batches`, `fila_seed`, `fila_cache`,
            `fila_accumulator_device`, `fila_layers_per_pass`).
        resume_from_checkpoint: The checkpoint folder being resumed (`True`: the last one in `args.output_dir`).
        loaders: Builds the `(forget, retain)` data loaders of the init (`retain` may be None); called only when an
            adapter is pending.
        show_progress: Show a progress bar of the data passes.

    Returns:
        The statistics of the initialisation per adapter, or None when nothing was computed.

    Raises:
        ValueError: If a pending adapter is resumed from a checkpoint without `_fila_init/`.
    """
    if not is_peft_model(model) or not has_data_driven_adapter(model):
        return None
    checkpoint = resume_from_checkpoint
    if isinstance(checkpoint, bool):
        checkpoint = get_last_checkpoint(args.output_dir) if checkpoint else None
    _restore_from_checkpoint(model, checkpoint)
    pending = pending_data_driven_adapters(model)
    if not pending:
        return None
    forget_dl, retain_dl = loaders()
    stats: dict[str, Any] = {}
    for adapter_name in pending:
        config = model.peft_config[adapter_name]
        kwargs: dict[str, Any] = {"max_batches": args.fila_max_batches, "show_progress": show_progress}
        kwargs.update(resolve_trainer_options(config.init_lora_weights, config, args))
        stats[adapter_name] = initialize_adapter_weights(
            model, forget_dl, retain_dl, adapter_name=adapter_name, **kwargs
        )
    for adapter_name, adapter_stats in stats.items():
        logger.info("FILA initialisation of adapter %r: %s", adapter_name, adapter_stats)
    return stats


def init_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The numeric statistics of the init as train metrics `fila_<key>` (suffixed `_<adapter>` for several).

    Args:
        stats: The result of `initialize_pending_adapters`.

    Returns:
        Metric name -> value.

    Examples:
        >>> init_metrics({"default": {"seconds": 1.5, "method": "fila", "exact": True}})
        {'fila_seconds': 1.5}
    """
    metrics: dict[str, float] = {}
    for adapter_name, adapter_stats in stats.items():
        suffix = "" if len(stats) == 1 else f"_{adapter_name}"
        for key, value in (adapter_stats or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"fila_{key}{suffix}"] = float(value)
    return metrics
