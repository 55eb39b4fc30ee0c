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
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "accepts_kwarg",
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
