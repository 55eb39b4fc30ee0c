"""`initialize_adapter_weights`: one entry point for every data-driven LoRA init.

Reads the adapter's ``init_lora_weights`` and runs the initialiser that `peft_unlearn.fila.registry`
names for it (``"fila"``, ``"vila"``, ``"rila"``; imported on first use). The trainer's automatic
initialisation calls this, so a new init needs only its module and its registry entry.

Examples:
    >>> info = initialize_adapter_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .registry import get_init
from .state import DATA_DRIVEN_INITS, adapter_lora_config, init_name

__all__ = ["initialize_adapter_weights", "resolve_initializer", "resolve_trainer_options"]


def _import(target: str, what: str) -> Callable[..., Any]:
    module_name, function = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"{what} needs {module_name}.{function}, which this installation of peft_unlearn does not provide ({error})."
        ) from error
    return getattr(module, function)


def resolve_initializer(init: str) -> Callable[..., dict[str, Any]]:
    """Return the initialiser function of a data-driven init name (a name of `peft_unlearn.fila.registry`).

    Raises:
        ValueError: For any other name, or when the initialiser's module is not available.
    """
    name = init_name(init)
    if name is None:
        raise ValueError(f"`init`={init!r} is not a data-driven LoRA init; expected one of {list(DATA_DRIVEN_INITS)}.")
    return _import(get_init(name).initializer, f"init_lora_weights={name!r}")


def resolve_trainer_options(init: str, lora_config: Any, unlearning_config: Any) -> dict[str, Any]:
    """The initialiser's extra keyword arguments for a trainer run (the registry entry's ``trainer_options``).

    Args:
        init: A data-driven init name.
        lora_config: The adapter's ``LoraConfig``.
        unlearning_config: The run's `UnlearningConfig` (``fila_*`` fields: seed, cache, low-memory modes).

    Returns:
        Keyword arguments for the initialiser (empty when the init takes none from the trainer).
    """
    entry = get_init(init_name(init) or str(init))
    if entry.trainer_options is None:
        return {}
    return _import(entry.trainer_options, f"init_lora_weights={entry.name!r}")(lora_config, unlearning_config)


def initialize_adapter_weights(
    peft_model: nn.Module,
    forget_dataloader: Iterable[Mapping[str, Any]] | None,
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    adapter_name: str = "default",
    **kwargs: Any,
) -> dict[str, Any]:
    """Initialise a pending data-driven adapter (``"fila"``, ``"vila"``, ``"rila"``) from forget/retain data.

    Args:
        peft_model: A PeftModel holding ``adapter_name``.
        forget_dataloader: Forget batches (``input_ids``, ``attention_mask``, ``labels``).
        retain_dataloader: Retain batches or None.
        adapter_name: The adapter to initialise.
        **kwargs: Passed to the initialiser (e.g. ``max_batches``, ``show_progress``; FILA also takes
            ``cache_path``, ``fila_config``, ``fisher``; RILA ``rila_config``, ``covariance_options``).

    Returns:
        The initialiser's statistics (times, memory, counts).

    Raises:
        ValueError: If the adapter does not exist or its init is not data-driven.
    """
    init = getattr(adapter_lora_config(peft_model, adapter_name), "init_lora_weights", None)
    initializer = resolve_initializer(init)
    return initializer(peft_model, forget_dataloader, retain_dataloader, adapter_name=adapter_name, **kwargs)
