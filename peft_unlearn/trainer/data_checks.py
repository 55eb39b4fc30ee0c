"""Per-example checks of raw training data, run before an example is tokenized.

The format of a dataset is detected from its columns and first example; these checks make every later
example fit that format with a clear error (set, example index, column, value, fix) instead of a `KeyError`
or an `int()` error, and keep pre-tokenized ids from being silently coerced (`1.5` to `1`, `True` to `1`).

Examples:
    >>> check_example({"input_ids": [1, 2, 3]}, "tokenized", index=0, name="forget")
    >>> check_example({"input_ids": [1, 2.5]}, "tokenized", index=3, name="forget")
    Traceback (most recent call last):
    ...
    ValueError: forget example 3: 'input_ids' must be a flat list of integer token ids, got 2.5 (a float) at position 1. Pass the ids the tokenizer returns (lists of int).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["REQUIRED_COLUMNS", "check_example"]

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "tokenized": ("input_ids",),
    "conversational": ("messages",),
    "conversational_prompt_completion": ("prompt", "completion"),
    "prompt_completion": ("prompt", "completion"),
    "language_modeling": ("text",),
}
"""Columns every example of a format must have (see `SUPPORTED_FORMATS`)."""


def _describe(value: Any) -> str:
    kind = "a bool" if isinstance(value, bool) else f"a {type(value).__name__}"
    return f"{value!r} ({kind})"


def _check_ids(value: Any, column: str, index: int, name: str, allow_ignore: bool) -> None:
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # torch / numpy arrays
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(
            f"{name} example {index}: {column!r} must be a list of integer token ids, got {_describe(value)}."
        )
    for position, item in enumerate(value):
        ok = isinstance(item, numbers.Integral) and not isinstance(item, bool)
        if not ok:
            raise ValueError(
                f"{name} example {index}: {column!r} must be a flat list of integer token ids, got {_describe(item)} "
                f"at position {position}. Pass the ids the tokenizer returns (lists of int)."
            )
        if item < 0 and not (allow_ignore and item == -100):
            allowed = "ids >= 0, or -100 for unsupervised positions" if allow_ignore else "ids >= 0"
            raise ValueError(
                f"{name} example {index}: {column!r} holds {item} at position {position}; expected {allowed}."
            )


def check_example(example: Mapping[str, Any], fmt: str, *, index: int, name: str) -> None:
    """Check that one raw example fits the dataset's format.

    Args:
        example: The raw example (a mapping of column -> value).
        fmt: The dataset's format (a key of `SUPPORTED_FORMATS`).
        index: The example's position, for the message.
        name: The data set (``"forget"``, ``"retain"``, ...), for the message.

    Raises:
        ValueError: If a column of the format is missing, or pre-tokenized ids are not flat lists of ints
            (`labels` may hold -100; `attention_mask` 0/1).
    """
    missing = [column for column in REQUIRED_COLUMNS.get(fmt, ()) if column not in example]
    if missing:
        raise ValueError(
            f"{name} example {index} has no {', '.join(repr(c) for c in missing)} column, which the dataset's format "
            f"{fmt!r} (detected from its columns and first example) needs; it has {sorted(example)}. Every example "
            "of a dataset must use the same format: split mixed data into separate datasets."
        )
    if fmt != "tokenized":
        return
    _check_ids(example["input_ids"], "input_ids", index, name, allow_ignore=False)
    if example.get("labels") is not None:
        _check_ids(example["labels"], "labels", index, name, allow_ignore=True)
    mask = example.get("attention_mask")
    if mask is not None:
        _check_ids(mask, "attention_mask", index, name, allow_ignore=False)
        values = mask.tolist() if hasattr(mask, "tolist") else mask
        if any(m not in (0, 1) for m in values):
            raise ValueError(f"{name} example {index}: 'attention_mask' must hold only 0 and 1, got {list(values)!r}.")
