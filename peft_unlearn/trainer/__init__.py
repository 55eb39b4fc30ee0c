"""Unlearning trainer, its configuration, data handling and model card.

Examples:
    >>> from peft_unlearn.trainer import UnlearningConfig
    >>> UnlearningConfig(output_dir="out", report_to="none").forget_loss
    'inverted_hinge'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils import lazy_exports

_LAZY_EXPORTS: dict[str, str] = {
    "UnlearningConfig": "peft_unlearn.trainer.unlearning_config",
    "UnlearningTrainer": "peft_unlearn.trainer.unlearning_trainer",
    "UnlearningItemCounts": "peft_unlearn.trainer.item_counts",
    "PairedUnlearningDataset": "peft_unlearn.trainer.pairing",
    "UnlearningDataCollator": "peft_unlearn.trainer.collators",
    "CausalLMCollator": "peft_unlearn.trainer.collators",
    "TokenizedDataset": "peft_unlearn.trainer.pairing",
    "DEFAULT_IDK_ANSWERS": "peft_unlearn.trainer.formats",
    "collate_causal_lm": "peft_unlearn.trainer.collators",
    "tokenize_dataset": "peft_unlearn.trainer.formats",
    "tokenize_idk_dataset": "peft_unlearn.trainer.formats",
    "build_model_card": "peft_unlearn.trainer.model_card",
    "RobustnessCallback": "peft_unlearn.trainer.callbacks",
    "StopWhenForgottenCallback": "peft_unlearn.trainer.callbacks",
    "UnlearningEvalCallback": "peft_unlearn.trainer.callbacks",
}

__all__ = [
    "DEFAULT_IDK_ANSWERS",
    "CausalLMCollator",
    "PairedUnlearningDataset",
    "RobustnessCallback",
    "StopWhenForgottenCallback",
    "TokenizedDataset",
    "UnlearningConfig",
    "UnlearningDataCollator",
    "UnlearningEvalCallback",
    "UnlearningItemCounts",
    "UnlearningTrainer",
    "build_model_card",
    "collate_causal_lm",
    "tokenize_dataset",
    "tokenize_idk_dataset",
]

if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import RobustnessCallback, StopWhenForgottenCallback, UnlearningEvalCallback
    from .collators import CausalLMCollator, UnlearningDataCollator, collate_causal_lm
    from .formats import DEFAULT_IDK_ANSWERS, tokenize_dataset, tokenize_idk_dataset
    from .item_counts import UnlearningItemCounts
    from .model_card import build_model_card
    from .pairing import PairedUnlearningDataset, TokenizedDataset
    from .unlearning_config import UnlearningConfig
    from .unlearning_trainer import UnlearningTrainer


__getattr__, __dir__ = lazy_exports(globals(), _LAZY_EXPORTS)
