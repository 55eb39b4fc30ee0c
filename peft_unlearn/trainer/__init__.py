"""Unlearning trainer, its configuration, data handling and model card.

Examples:
    >>> from peft_unlearn.trainer import UnlearningConfig
    >>> UnlearningConfig(output_dir="out", report_to="none").forget_loss
    'inverted_hinge'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY_EXPORTS: dict[str, str] = {
    "UnlearningConfig": "peft_unlearn.trainer.unlearning_config",
    "UnlearningTrainer": "peft_unlearn.trainer.unlearning_trainer",
    "UnlearningItemCounts": "peft_unlearn.trainer.unlearning_trainer",
    "PairedUnlearningDataset": "peft_unlearn.trainer.data",
    "UnlearningDataCollator": "peft_unlearn.trainer.data",
    "CausalLMCollator": "peft_unlearn.trainer.data",
    "TokenizedDataset": "peft_unlearn.trainer.data",
    "DEFAULT_IDK_ANSWERS": "peft_unlearn.trainer.data",
    "collate_causal_lm": "peft_unlearn.trainer.data",
    "tokenize_dataset": "peft_unlearn.trainer.data",
    "tokenize_idk_dataset": "peft_unlearn.trainer.data",
    "build_model_card": "peft_unlearn.trainer.model_card",
    "StopWhenForgottenCallback": "peft_unlearn.trainer.callbacks",
    "UnlearningEvalCallback": "peft_unlearn.trainer.callbacks",
}

__all__ = [
    "DEFAULT_IDK_ANSWERS",
    "CausalLMCollator",
    "PairedUnlearningDataset",
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
    from .callbacks import StopWhenForgottenCallback, UnlearningEvalCallback
    from .data import (
        DEFAULT_IDK_ANSWERS,
        CausalLMCollator,
        PairedUnlearningDataset,
        TokenizedDataset,
        UnlearningDataCollator,
        collate_causal_lm,
        tokenize_dataset,
        tokenize_idk_dataset,
    )
    from .model_card import build_model_card
    from .unlearning_config import UnlearningConfig
    from .unlearning_trainer import UnlearningItemCounts, UnlearningTrainer


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peft_unlearn.trainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
