"""Compatibility alias: the data handling now lives in `formats`, `pairing` and `collators`.

Import from `peft_unlearn.trainer` (or those modules) instead; this module only re-exports their public names.
"""

from __future__ import annotations

from .collators import CausalLMCollator, UnlearningDataCollator, collate_causal_lm
from .formats import (
    DEFAULT_IDK_ANSWERS,
    SUPPORTED_FORMATS,
    detect_format,
    ensure_pad_token,
    tokenize_dataset,
    tokenize_idk_dataset,
)
from .pairing import PairedUnlearningDataset, TokenizedDataset

__all__ = [
    "DEFAULT_IDK_ANSWERS",
    "SUPPORTED_FORMATS",
    "CausalLMCollator",
    "PairedUnlearningDataset",
    "TokenizedDataset",
    "UnlearningDataCollator",
    "collate_causal_lm",
    "detect_format",
    "ensure_pad_token",
    "tokenize_dataset",
    "tokenize_idk_dataset",
]
