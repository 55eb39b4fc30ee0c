"""peft_unlearn: parameter-efficient knowledge unlearning for LLMs on the Hugging Face stack.

Implements Cha et al., "Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs"
(ICLR 2025, arXiv:2408.06621): the Inverted Hinge Loss (IHL) and FILA, a Fisher-weighted LoRA
initialisation, plus the usual unlearning baselines and metrics, and the data-driven LoRA inits VILA
(arXiv 2508.21300) and RILA (ReGLU, arXiv 2604.17396).

Importing the package registers ``LoraConfig(init_lora_weights="fila")`` (and ``"vila"``, ``"rila"``,
see `peft_unlearn.fila.registry`) with stock PEFT (one idempotent patch, see
`peft_unlearn.fila.registration`).

Examples:
    >>> import peft_unlearn
    >>> from peft_unlearn import UnlearningConfig, UnlearningTrainer  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .utils import lazy_exports

__version__ = "0.1.0"

_LAZY_EXPORTS: dict[str, str] = {
    # trainer
    "UnlearningConfig": "peft_unlearn.trainer.unlearning_config",
    "UnlearningTrainer": "peft_unlearn.trainer.unlearning_trainer",
    "RobustnessCallback": "peft_unlearn.trainer.callbacks",
    "StopWhenForgottenCallback": "peft_unlearn.trainer.callbacks",
    "UnlearningEvalCallback": "peft_unlearn.trainer.callbacks",
    # FILA
    "estimate_fisher": "peft_unlearn.fila.fisher",
    "FisherStatistics": "peft_unlearn.fila.fisher",
    "initialize_fila_weights": "peft_unlearn.fila.init",
    "estimate_vila_importance": "peft_unlearn.fila.vila",
    "initialize_vila_weights": "peft_unlearn.fila.vila",
    "initialize_rila_weights": "peft_unlearn.fila.rila",
    "RilaConfig": "peft_unlearn.fila.rila",
    "RilaLoraConfig": "peft_unlearn.fila.rila",
    "estimate_output_covariance": "peft_unlearn.fila.covariance",
    "FilaConfig": "peft_unlearn.fila.config",
    "FilaLoraConfig": "peft_unlearn.fila.config",
    "export_portable_adapter": "peft_unlearn.fila.saving",
    "register_fila": "peft_unlearn.fila.registration",
    # losses
    "inverted_hinge_loss": "peft_unlearn.losses",
    "gradient_ascent_loss": "peft_unlearn.losses",
    "npo_loss": "peft_unlearn.losses",
    "simnpo_loss": "peft_unlearn.losses",
    "nll_loss": "peft_unlearn.losses",
    "kl_loss": "peft_unlearn.losses",
}

__all__ = [
    "__version__",
    "FilaConfig",
    "FilaLoraConfig",
    "FisherStatistics",
    "RilaConfig",
    "RilaLoraConfig",
    "RobustnessCallback",
    "StopWhenForgottenCallback",
    "UnlearningConfig",
    "UnlearningEvalCallback",
    "UnlearningTrainer",
    "estimate_fisher",
    "estimate_output_covariance",
    "estimate_vila_importance",
    "export_portable_adapter",
    "gradient_ascent_loss",
    "initialize_fila_weights",
    "initialize_rila_weights",
    "initialize_vila_weights",
    "inverted_hinge_loss",
    "kl_loss",
    "nll_loss",
    "npo_loss",
    "register_fila",
    "simnpo_loss",
]

if TYPE_CHECKING:  # pragma: no cover
    from .fila.config import FilaConfig, FilaLoraConfig
    from .fila.covariance import estimate_output_covariance
    from .fila.fisher import FisherStatistics, estimate_fisher
    from .fila.init import initialize_fila_weights
    from .fila.registration import register_fila
    from .fila.rila import RilaConfig, RilaLoraConfig, initialize_rila_weights
    from .fila.saving import export_portable_adapter
    from .fila.vila import estimate_vila_importance, initialize_vila_weights
    from .losses import (
        gradient_ascent_loss,
        inverted_hinge_loss,
        kl_loss,
        nll_loss,
        npo_loss,
        simnpo_loss,
    )
    from .trainer.callbacks import RobustnessCallback, StopWhenForgottenCallback, UnlearningEvalCallback
    from .trainer.unlearning_config import UnlearningConfig
    from .trainer.unlearning_trainer import UnlearningTrainer


__getattr__, __dir__ = lazy_exports(globals(), _LAZY_EXPORTS)


def _register() -> None:
    from .fila.registration import register_fila

    register_fila()


_register()
