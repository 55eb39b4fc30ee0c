"""The registry of data-driven LoRA initialisations: the one place where their names live.

A data-driven init computes an adapter's factors from forget/retain data after ``get_peft_model``
(``LoraConfig(init_lora_weights=NAME)``; the layer stays *pending* until then). Every part of the
library that needs the list of such inits reads it from here: the PEFT hook that accepts the names
(`peft_unlearn.fila.registration`), the dispatcher (`peft_unlearn.fila.dispatch`), the trainer's
automatic initialisation, the ``peft-unlearn train --init`` choices and the adapter presets.

Adding an init is one module (with an ``initialize_<name>_weights(peft_model, forget_dataloader,
retain_dataloader, adapter_name=..., **kwargs)`` function that sets the initial factors and their frozen
offset, see `peft_unlearn.fila.offset`) plus one `DataDrivenInit` entry in `INITS`.

This module imports nothing from the package (entries name their functions as ``"module:function"``
strings, imported on first use), so every other module may import it.

Examples:
    >>> sorted(INITS)
    ['fila', 'rila', 'vila']
    >>> get_init("RILA").paper
    'arXiv 2604.17396'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DataDrivenInit",
    "FILA_INIT_NAME",
    "INITS",
    "RILA_INIT_NAME",
    "VILA_INIT_NAME",
    "get_init",
    "init_name",
    "init_names",
    "inits_with_settings",
    "is_data_driven_init",
]

#: ``init_lora_weights`` value of FILA (Fisher-weighted SVD).
FILA_INIT_NAME = "fila"
#: ``init_lora_weights`` value of VILA (gradient-variance importance, then FILA's weighted SVD).
VILA_INIT_NAME = "vila"
#: ``init_lora_weights`` value of RILA (eigenvectors of the forget-minus-retain output covariance).
RILA_INIT_NAME = "rila"


@dataclass(frozen=True)
class DataDrivenInit:
    """One data-driven LoRA initialisation.

    Args:
        name: The ``init_lora_weights`` value (lower case).
        initializer: ``"module:function"`` of its initialiser, called as
            ``function(peft_model, forget_dataloader, retain_dataloader, adapter_name=..., **kwargs)``.
        trainer_options: ``"module:function"`` returning the initialiser's extra keyword arguments for a run of
            `UnlearningTrainer`, called as ``function(lora_config, unlearning_config)``; ``None``: none.
        summary: One line for help texts (the CLI's ``--init`` choices).
        paper: Where the method is published.
        settings_field: The ``LoraConfig`` attribute that carries the init's settings (``"fila_config"`` for the
            inits that end in FILA's weighted SVD, `FilaLoraConfig`; ``"rila_config"`` for RILA, `RilaLoraConfig`).
    """

    name: str
    initializer: str
    trainer_options: str | None
    summary: str
    paper: str
    settings_field: str = "fila_config"


#: Every data-driven init, by name (model of PEFT's name -> method tables).
INITS: dict[str, DataDrivenInit] = {
    FILA_INIT_NAME: DataDrivenInit(
        name=FILA_INIT_NAME,
        initializer="peft_unlearn.fila.init:initialize_fila_weights",
        trainer_options="peft_unlearn.fila.init:trainer_options",
        summary="Fisher-weighted LoRA init, the paper's",
        paper="arXiv 2408.06621",
    ),
    VILA_INIT_NAME: DataDrivenInit(
        name=VILA_INIT_NAME,
        initializer="peft_unlearn.fila.vila:initialize_vila_weights",
        trainer_options=None,
        summary="gradient-variance-weighted LoRA init",
        paper="arXiv 2508.21300",
    ),
    RILA_INIT_NAME: DataDrivenInit(
        name=RILA_INIT_NAME,
        initializer="peft_unlearn.fila.rila:initialize_rila_weights",
        trainer_options="peft_unlearn.fila.rila:trainer_options",
        summary="eigenvectors of the forget-minus-retain output covariance, ReGLU",
        paper="arXiv 2604.17396",
        settings_field="rila_config",
    ),
}


def init_names() -> tuple[str, ...]:
    """The names of the registered data-driven inits, in registration order."""
    return tuple(INITS)


def init_name(value: object) -> str | None:
    """The lower-case registered init name of an ``init_lora_weights`` value, or None for any other value.

    Examples:
        >>> init_name("FILA"), init_name(True), init_name("pissa")
        ('fila', None, None)
    """
    if isinstance(value, str) and value.lower() in INITS:
        return value.lower()
    return None


def is_data_driven_init(value: object) -> bool:
    """Return True if an ``init_lora_weights`` value selects a registered data-driven init."""
    return init_name(value) is not None


def inits_with_settings(settings_field: str) -> tuple[str, ...]:
    """The names of the inits whose settings live in ``settings_field`` (e.g. the inits `FilaLoraConfig` takes)."""
    return tuple(name for name, entry in INITS.items() if entry.settings_field == settings_field)


def get_init(name: str) -> DataDrivenInit:
    """The registry entry of a data-driven init name (case-insensitive).

    Raises:
        ValueError: For a name that is not registered, listing the registered ones.
    """
    entry = INITS.get(name.lower()) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"{name!r} is not a data-driven LoRA init; expected one of {list(INITS)}.")
    return entry
