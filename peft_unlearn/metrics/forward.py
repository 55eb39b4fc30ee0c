"""Calling a causal LM for evaluation: the keyword arguments its forward accepts, position ids, eval mode.

Shared by the memorization, generation, MIA and TOFU metrics, which accept any causal LM whose
`forward(input_ids, attention_mask=..., ...)` returns an object with `.logits` (`PreTrainedModel`, `PeftModel`
or a minimal `nn.Module`).

Examples:
    >>> import torch
    >>> from peft_unlearn.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> with eval_mode(model):
    ...     logits = forward_logits(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3)).logits
    >>> tuple(logits.shape[:2]), logits.requires_grad
    ((1, 3), False)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ..utils import IGNORE_INDEX

__all__ = [
    "accepts_kwarg",
    "check_pad_token_id",
    "pad_batch",
    "eval_mode",
    "forward_logits",
    "forward_parameters",
    "position_ids",
    "to_id_list",
    "with_eval_mode",
]


def forward_parameters(model: torch.nn.Module) -> tuple[set[str], bool]:
    """Names accepted by the (innermost) forward and whether it takes ``**kwargs``."""
    target = model
    # PeftModel.forward is (*args, **kwargs) and forwards kwargs to the base model: inspect the base model.
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        with contextlib.suppress(Exception):
            target = get_base()
    try:
        params = inspect.signature(target.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set(), True
    names = {name for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return names, has_var_kw


def accepts_kwarg(model: torch.nn.Module, name: str) -> bool:
    """Whether `model.forward` takes the keyword `name` (explicitly, or through `**kwargs` for the generation
    keywords `position_ids`, `use_cache` and `logits_to_keep`)."""
    names, has_var_kw = forward_parameters(model)
    return name in names or (has_var_kw and name in {"position_ids", "use_cache", "logits_to_keep"})


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the unmasked tokens only (0 on left padding), so padding side does not matter.

    Examples:
        >>> import torch
        >>> position_ids(torch.tensor([[0, 1, 1]])).tolist()
        [[0, 0, 1]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: Any) -> Any:
    """Run `model` on a batch, passing `position_ids` derived from the mask when the model accepts them."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if accepts_kwarg(model, "position_ids"):
        kwargs["position_ids"] = position_ids(attention_mask)
    kwargs.update(extra)
    return model(**kwargs)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put `model` in eval mode under `torch.no_grad()`, restoring its train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def with_eval_mode(fn):
    """Decorator running `fn(model, ...)` under `eval_mode(model)`."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with eval_mode(model):
            return fn(model, *args, **kwargs)

    return wrapper


def to_id_list(value: Any) -> list[int]:
    """A sequence or tensor of token ids as a flat list of Python ints."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


# inputs: tensors, token-id lists and datasets to padded batches


def _as_2d(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2:
        raise ValueError(
            f"`{name}` must have shape [batch, seq_len], got shape {tuple(value.shape)}; pass a 2-D tensor "
            "(or one 1-D sequence)."
        )
    return value


def _prepare_batch(
    input_ids: Any, attention_mask: Any = None, labels: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    input_ids = _as_2d("input_ids", input_ids).long()
    if input_ids.numel() == 0:
        raise ValueError(
            f"`input_ids` is empty (shape {tuple(input_ids.shape)}); the metric is undefined without tokens. Pass at "
            "least one sequence of at least one token."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        attention_mask = _as_2d("attention_mask", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has shape "
                f"{tuple(input_ids.shape)}; they must match."
            )
    if labels is not None:
        labels = _as_2d("labels", labels).long()
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"`labels` has shape {tuple(labels.shape)} but `input_ids` has shape {tuple(input_ids.shape)}; "
                "they must match (unshifted labels, -100 on ignored positions)."
            )
    return input_ids, attention_mask.long(), labels


def check_pad_token_id(pad_token_id: Any) -> int:
    """Validate a padding id: a non-negative integer token id (it is fed to the embedding, masked out).

    Args:
        pad_token_id: The padding id a metric was given.

    Returns:
        The id as an ``int``.

    Raises:
        ValueError: If it is not an integer >= 0 (e.g. ``-1`` or ``-100``, or None from a tokenizer without a
            pad token).
    """
    try:
        valid = not isinstance(pad_token_id, bool) and int(pad_token_id) == pad_token_id and pad_token_id >= 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"`pad_token_id` must be a token id >= 0 (it is written into the padded input_ids, which the model "
            f"embeds; the attention mask hides it), got {pad_token_id!r}. Pass tokenizer.pad_token_id, or "
            "tokenizer.eos_token_id (or 0) when the tokenizer has no pad token."
        )
    return int(pad_token_id)


def pad_batch(
    items: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad a list of tokenized items into tensors.

    Args:
        items: Dicts with ``input_ids`` and optionally ``labels`` (same length as ``input_ids``).
        pad_token_id: Id written into the padded ``input_ids`` positions.

    Returns:
        ``(input_ids [B, T], attention_mask [B, T], labels [B, T] or None)``; labels are padded with -100 and
        are None when no item has labels (an item without labels in a labelled batch is fully supervised).

    Examples:
        >>> ids, mask, labels = pad_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
        >>> ids.tolist(), mask.tolist(), labels
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], None)
    """
    if len(items) == 0:
        raise ValueError("`items` is empty; pass at least one tokenized sequence.")
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), check_pad_token_id(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    has_labels = any(item.get("labels") is not None for item in items)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for i, item in enumerate(items):
        seq = list(item["input_ids"])
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
        if labels is not None:
            lab = list(item["labels"]) if item.get("labels") is not None else seq
            labels[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
    return ids, mask, labels


def _normalize_data(data: Any) -> list[dict[str, list[int] | None]]:
    """Turn the accepted data formats into a list of ``{"input_ids": [...], "labels": [...] | None}``."""
    if isinstance(data, torch.Tensor):
        data = _as_2d("data", data)
        return [{"input_ids": to_id_list(row), "labels": None} for row in data]
    if isinstance(data, Mapping):  # columnar, e.g. a BatchEncoding or a dict of lists
        if "input_ids" not in data:
            raise ValueError(f"`data` is a mapping without an 'input_ids' key (keys: {sorted(data)}).")
        n = len(data["input_ids"])
        data = [{k: data[k][i] for k in ("input_ids", "labels", "attention_mask") if k in data} for i in range(n)]
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"`data` must be a list of token-id lists, a list of dicts with 'input_ids', or a datasets.Dataset; "
            f"got {type(data).__name__}."
        )
    out: list[dict[str, list[int] | None]] = []
    for i, item in enumerate(data):
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"`data[{i}]` has no 'input_ids' key (keys: {sorted(item)}).")
            ids = to_id_list(item["input_ids"])
            labels = item.get("labels")
            labels = to_id_list(labels) if labels is not None else None
            mask = item.get("attention_mask")
            if mask is not None:  # pre-padded rows: drop the padding (either side)
                mask = to_id_list(mask)
                keep = [j for j, m in enumerate(mask) if m]
                ids = [ids[j] for j in keep]
                labels = [labels[j] for j in keep] if labels is not None else None
        elif isinstance(item, (torch.Tensor, Sequence)) and not isinstance(item, (str, bytes)):
            ids, labels = to_id_list(item), None
        else:
            raise TypeError(
                f"`data[{i}]` must be a sequence of token ids or a dict with 'input_ids', got {type(item).__name__}."
            )
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"`data[{i}]` has {len(ids)} input_ids but {len(labels)} labels; they must match.")
        out.append({"input_ids": ids, "labels": labels})
    return out
