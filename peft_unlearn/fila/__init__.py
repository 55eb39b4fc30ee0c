"""FILA: Fisher-weighted LoRA initialisation for unlearning (paper-notes section 3).

Usage with stock PEFT after ``import peft_unlearn``::

    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights="fila"))
    initialize_fila_weights(model, forget_loader, retain_loader)   # Fisher pass + weighted SVD per layer
    ...train...
    model.save_pretrained("out")   # portable rank-2r plain LoRA, loads with stock PEFT on the original base

Modules: :mod:`.config` (FilaConfig, FilaLoraConfig), :mod:`.fisher` (estimate_fisher),
:mod:`.init` (fila_init_layer, initialize_fila_weights, preprocess_fila), :mod:`.registration`
(the PEFT hooks), :mod:`.saving` (portable export, raw checkpoints, residual rebuild), :mod:`.vila`
(VILA: variance-based importance through the LoRA factors, then the same weighted init).

Examples:
    >>> from peft_unlearn.fila import FilaConfig
    >>> FilaConfig().seed
    42
"""

from __future__ import annotations

from .config import FilaConfig, FilaLoraConfig
from .fisher import FisherStatistics, estimate_fisher
from .init import add_fila_reference_adapter, fila_init_layer, initialize_fila_weights, preprocess_fila
from .registration import FilaNotInitializedWarning, pending_fila_adapters, register_fila
from .saving import (
    export_portable_adapter,
    is_fila_model,
    restore_fila_residual,
    save_fila_state,
    save_residual_base,
)
from .vila import VILA_INIT_NAME, estimate_vila_importance, initialize_vila_weights

__all__ = [
    "add_fila_reference_adapter",
    "FilaConfig",
    "FilaLoraConfig",
    "FilaNotInitializedWarning",
    "FisherStatistics",
    "estimate_fisher",
    "export_portable_adapter",
    "fila_init_layer",
    "initialize_fila_weights",
    "is_fila_model",
    "pending_fila_adapters",
    "preprocess_fila",
    "register_fila",
    "restore_fila_residual",
    "save_fila_state",
    "save_residual_base",
    "VILA_INIT_NAME",
    "estimate_vila_importance",
    "initialize_vila_weights",
]
