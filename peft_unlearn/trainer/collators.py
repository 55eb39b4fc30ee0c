"""Collators: right-pad causal-LM examples and the forget / retain / IDK parts of paired items.

Examples:
    >>> collate_causal_lm([{"input_ids": [5, 6]}, {"input_ids": [7]}], pad_token_id=0)["input_ids"].tolist()
    [[5, 6], [7, 0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..utils import IGNORE_INDEX

__all__ = ["CausalLMCollator", "UnlearningDataCollator", "collate_causal_lm"]


def _pad(sequences: Sequence[Sequence[int]], value: int, multiple_of: int | None) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            out[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


def _collate_prefix(
    features: Sequence[Mapping[str, Any]], prefix: str, pad_token_id: int, multiple_of: int | None
) -> dict[str, torch.Tensor]:
    ids = [f[f"{prefix}input_ids"] for f in features]
    labels = [f.get(f"{prefix}labels", f[f"{prefix}input_ids"]) for f in features]
    input_ids = _pad(ids, pad_token_id, multiple_of)
    attention_mask = _pad([[1] * len(s) for s in ids], 0, multiple_of)
    padded_labels = _pad(labels, IGNORE_INDEX, multiple_of)
    return {
        f"{prefix}input_ids": input_ids,
        f"{prefix}attention_mask": attention_mask,
        f"{prefix}labels": padded_labels,
    }


def collate_causal_lm(
    features: Sequence[Mapping[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad plain causal-LM examples into ``input_ids``, ``attention_mask`` and ``labels`` (-100 padded).

    Args:
        features: Dicts with ``input_ids`` and optional ``labels`` (defaults to ``input_ids``).
        pad_token_id: Token used to pad ``input_ids``.
        pad_to_multiple_of: Pad the length to a multiple of this value.

    Returns:
        A dict of ``[B, T]`` long tensors.

    Examples:
        >>> b = collate_causal_lm([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_token_id=0)
        >>> b["attention_mask"].tolist(), b["labels"][1].tolist()
        ([[1, 1, 1], [1, 0, 0]], [8, -100, -100])
    """
    return _collate_prefix(features, "", pad_token_id, pad_to_multiple_of)


class CausalLMCollator:
    """Callable form of `collate_causal_lm` (for ``DataLoader(collate_fn=...)``).

    Args:
        pad_token_id: Token used to pad ``input_ids``.
        pad_to_multiple_of: Pad the length to a multiple of this value.

    Examples:
        >>> CausalLMCollator(0)([{"input_ids": [1, 2]}])["labels"].tolist()
        [[1, 2]]
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_causal_lm(features, self.pad_token_id, self.pad_to_multiple_of)


class UnlearningDataCollator:
    """Pad the forget, retain (and IDK) parts of `PairedUnlearningDataset` items separately (right padding).

    Produces ``forget_input_ids``, ``forget_attention_mask``, ``forget_labels`` and, when present in the items,
    the same three keys for ``retain_`` and ``idk_``. Labels are padded with -100, ``input_ids`` with
    ``pad_token_id``.

    Args:
        pad_token_id: Token used to pad ``input_ids``.
        pad_to_multiple_of: Pad each part's length to a multiple of this value.

    Examples:
        >>> c = UnlearningDataCollator(pad_token_id=0)
        >>> b = c([{"forget_input_ids": [1, 2, 3], "forget_labels": [-100, 2, 3]}, {"forget_input_ids": [4], "forget_labels": [4]}])
        >>> b["forget_input_ids"].tolist(), b["forget_labels"].tolist()
        ([[1, 2, 3], [4, 0, 0]], [[-100, 2, 3], [4, -100, -100]])
    """

    prefixes: tuple[str, ...] = ("forget_", "retain_", "idk_")

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty list of features.")
        batch: dict[str, torch.Tensor] = {}
        for prefix in self.prefixes:
            if f"{prefix}input_ids" in features[0]:
                batch.update(_collate_prefix(features, prefix, self.pad_token_id, self.pad_to_multiple_of))
        if "forget_input_ids" not in batch:
            raise ValueError(
                f"UnlearningDataCollator expects items with 'forget_input_ids'; got keys {sorted(features[0])}."
            )
        return batch
