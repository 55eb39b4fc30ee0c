"""The data-driven LoRA inits: FILA (Fisher-weighted LoRA initialisation, Cha et al., ICLR 2025), VILA and RILA.

"FILA" names the method; the family of inits that compute an adapter's factors from forget/retain data after
``get_peft_model`` is the *data-driven inits*, registered in `peft_unlearn.fila.registry` (`DataDrivenInit`), the
one place their names live.

Usage with stock PEFT after ``import peft_unlearn``:

    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights="fila"))
    initialize_fila_weights(model, forget_loader, retain_loader)   # Fisher pass + weighted SVD per layer
    ...train...
    model.save_pretrained("out")   # portable rank-2r plain LoRA, loads with stock PEFT on the original base

The base model is never modified: the initial product is cancelled by a frozen copy of the initial
factors (`peft_unlearn.fila.offset`), so ``unload()`` / ``disable_adapter()`` give back the original
model, and 4-bit/8-bit and sharded bases work.

Modules, in import order (each imports only the ones before it): `config` (FilaConfig,
FilaLoraConfig), `state` (names, pending flags, dense weights), `fisher` (estimate_fisher),
`offset` (the frozen initial factors), `init` (fila_init_layer, initialize_fila_weights),
`preprocess` (preprocess_fila), `dispatch` (initialize_adapter_weights for every registered init),
`saving` (portable export, raw checkpoints), `registration` (the PEFT hooks), `vila` (VILA:
variance-based importance through the LoRA factors, then the same weighted init), `covariance`
(streamed output covariances) and `rila` (RILA: eigenvectors of the forget-minus-retain output
covariance, ReGLU). `registry` names every data-driven init in one place.

Examples:
    >>> from peft_unlearn.fila import FilaConfig
    >>> FilaConfig().seed
    42
"""

from __future__ import annotations

from .config import FilaConfig, FilaLoraConfig
from .covariance import OutputCovariance, estimate_output_covariance
from .dispatch import initialize_adapter_weights
from .fisher import FisherStatistics, estimate_fisher
from .init import fila_init_layer, initialize_fila_weights
from .preprocess import preprocess_fila
from .registration import FilaUnavailableWarning, register_fila
from .registry import INITS, DataDrivenInit, get_init, init_names
from .rila import RILA_INIT_NAME, RilaConfig, RilaLoraConfig, initialize_rila_weights, rila_init_layer
from .saving import (
    export_portable_adapter,
    has_data_driven_adapter,
    is_fila_model,
    pending_data_driven_adapters,
    pending_fila_adapters,
    restore_fila_residual,
    restore_fila_state,
    save_fila_state,
)
from .state import DATA_DRIVEN_INITS, DataDrivenInitPendingWarning, FilaNotInitializedWarning, is_data_driven_init
from .vila import VILA_INIT_NAME, estimate_vila_importance, initialize_vila_weights

__all__ = [
    "DATA_DRIVEN_INITS",
    "DataDrivenInit",
    "DataDrivenInitPendingWarning",
    "INITS",
    "OutputCovariance",
    "RILA_INIT_NAME",
    "RilaConfig",
    "RilaLoraConfig",
    "estimate_output_covariance",
    "initialize_rila_weights",
    "rila_init_layer",
    "FilaConfig",
    "FilaLoraConfig",
    "FilaNotInitializedWarning",
    "FilaUnavailableWarning",
    "FisherStatistics",
    "estimate_fisher",
    "export_portable_adapter",
    "fila_init_layer",
    "get_init",
    "has_data_driven_adapter",
    "init_names",
    "initialize_adapter_weights",
    "initialize_fila_weights",
    "is_data_driven_init",
    "is_fila_model",
    "pending_data_driven_adapters",
    "pending_fila_adapters",
    "preprocess_fila",
    "register_fila",
    "restore_fila_residual",
    "restore_fila_state",
    "save_fila_state",
    "VILA_INIT_NAME",
    "estimate_vila_importance",
    "initialize_vila_weights",
]
