"""`initialize_adapter_weights`: one entry point for every data-driven LoRA init.

Reads the adapter's ``init_lora_weights`` and runs the matching initialisation: ``"fila"`` ->
`peft_unlearn.fila.init.initialize_fila_weights`, ``"vila"`` ->
``peft_unlearn.fila.vila.initialize_vila_weights`` (imported on first use). The trainer's
automatic initialisation calls this, so a new init only needs an entry here.

Examples:
    >>> info = initialize_adapter_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from .config import FILA_INIT_NAME
from .init import initialize_fila_weights
from .state import DATA_DRIVEN_INITS, VILA_INIT_NAME, init_name

__all__ = ["initialize_adapter_weights", "resolve_initializer"]

#: Data-driven init name -> ``"module:function"`` of its initialiser (imported lazily).
_INITIALIZERS: dict[str, str] = {
    FILA_INIT_NAME: "peft_unlearn.fila.init:initialize_fila_weights",
    VILA_INIT_NAME: "peft_unlearn.fila.vila:initialize_vila_weights",
}


def resolve_initializer(init: str) -> Callable[..., dict[str, Any]]:
    """Return the initialiser function of a data-driven init name (``"fila"`` or ``"vila"``).

    Raises:
        ValueError: For any other name, or when the initialiser's module is not available.
    """
    name = init_name(init)
    if name is None:
        raise ValueError(f"`init`={init!r} is not a data-driven LoRA init; expected one of {list(DATA_DRIVEN_INITS)}.")
    if name == FILA_INIT_NAME:
        return initialize_fila_weights
    module_name, function = _INITIALIZERS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"init_lora_weights={name!r} needs {module_name}.{function}, which this installation of peft_unlearn "
            f"does not provide ({error})."
        ) from error
    return getattr(module, function)


def initialize_adapter_weights(
    peft_model: nn.Module,
    forget_dataloader: Iterable[Mapping[str, Any]] | None,
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    adapter_name: str = "default",
    **kwargs: Any,
) -> dict[str, Any]:
    """Initialise a pending data-driven adapter (``"fila"`` or ``"vila"``) from forget/retain data.

    Args:
        peft_model: A PeftModel holding ``adapter_name``.
        forget_dataloader: Forget batches (``input_ids``, ``attention_mask``, ``labels``).
        retain_dataloader: Retain batches or None.
        adapter_name: The adapter to initialise.
        **kwargs: Passed to the initialiser (e.g. ``max_batches``, ``show_progress``; FILA also takes
            ``cache_path``, ``fila_config``, ``fisher``).

    Returns:
        The initialiser's statistics (times, memory, counts).

    Raises:
        ValueError: If the adapter does not exist or its init is not data-driven.
    """
    configs = getattr(peft_model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"`adapter_name`={adapter_name!r} is not an adapter of the model; have {sorted(configs)}.")
    init = getattr(configs[adapter_name], "init_lora_weights", None)
    initializer = resolve_initializer(init)
    return initializer(peft_model, forget_dataloader, retain_dataloader, adapter_name=adapter_name, **kwargs)
