"""Small helpers shared across the package: the label ignore index, model introspection and lazy exports.

Examples:
    >>> from peft_unlearn.utils import IGNORE_INDEX, model_device
    >>> import torch
    >>> IGNORE_INDEX, model_device(torch.nn.Linear(2, 2)).type
    (-100, 'cpu')
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "has_peft_adapters",
    "is_conv1d",
    "is_linear_like",
    "is_peft_model",
    "lazy_exports",
    "linear_weight",
    "model_device",
    "one_line",
]

IGNORE_INDEX = -100
"""Label value excluded from every loss and metric (the `ignore_index` of `torch.nn.CrossEntropyLoss`)."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line, or its type name when it has none (for one-line error reports).

    Examples:
        >>> one_line(ValueError("bad\\n  value"))
        'bad value'
        >>> one_line(KeyError())
        'KeyError'
    """
    return " ".join(str(err).split()) or type(err).__name__


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a `peft.PeftModel` (any task-specific subclass included) or a `peft.PeftMixedModel`.

    Args:
        model: Any object.

    Returns:
        `True` for a `PeftModel` or `PeftMixedModel`.

    Examples:
        >>> import torch
        >>> is_peft_model(torch.nn.Linear(2, 2))
        False
    """
    from peft import PeftMixedModel, PeftModel

    return isinstance(model, (PeftModel, PeftMixedModel))


def has_peft_adapters(model: Any) -> bool:
    """Whether `model` behaves as a PEFT model: it has a `peft_config` and a `disable_adapter()` context.

    Unlike `is_peft_model`, this also holds for a `PeftModel` behind a wrapper that forwards attribute access
    (FSDP1's `FullyShardedDataParallel`).

    Args:
        model: Any object.

    Returns:
        `True` when both attributes are there.

    Examples:
        >>> import torch
        >>> has_peft_adapters(torch.nn.Linear(2, 2))
        False
    """
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def model_device(model: nn.Module) -> torch.device:
    """The device inputs of `model` must be on.

    That is the device of the input embeddings when the model has them (right for models dispatched over several
    devices with `device_map`), else of its first parameter or buffer, else the CPU.

    Args:
        model: A module.

    Returns:
        A `torch.device`.

    Examples:
        >>> import torch
        >>> model_device(torch.nn.Module()).type
        'cpu'
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except NotImplementedError:
            embeddings = None
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a transformers `Conv1D` (GPT-2 style), which stores its weight as `[in, out]`.

    Args:
        module: A module.

    Returns:
        `True` for a `transformers.pytorch_utils.Conv1D`.

    Examples:
        >>> import torch
        >>> is_conv1d(torch.nn.Linear(2, 3))
        False
    """
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """Whether `module` is an `nn.Linear` or a transformers `Conv1D`.

    Args:
        module: A module.

    Returns:
        `True` for either layer type.

    Examples:
        >>> import torch
        >>> is_linear_like(torch.nn.Linear(2, 3)), is_linear_like(torch.nn.ReLU())
        (True, False)
    """
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or `Conv1D` in `nn.Linear` layout `[out_features, in_features]` (a view).

    Args:
        module: An `nn.Linear` or a transformers `Conv1D`.

    Returns:
        The weight, transposed for `Conv1D`.

    Examples:
        >>> import torch
        >>> from transformers.pytorch_utils import Conv1D
        >>> tuple(linear_weight(Conv1D(nf=3, nx=2)).shape), tuple(linear_weight(torch.nn.Linear(2, 3)).shape)
        ((3, 2), (3, 2))
    """
    return module.weight.mT if is_conv1d(module) else module.weight


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build a package's `__getattr__` / `__dir__` that import each public name on first access.

    Args:
        namespace: The package's `globals()`; an imported name is stored there, so later accesses are plain
            attribute lookups.
        exports: Public name -> module defining it.

    Returns:
        `(__getattr__, __dir__)` to assign at the package's top level.

    Examples:
        >>> ns = {"__name__": "pkg", "__all__": ["sqrt"]}
        >>> getattr_, dir_ = lazy_exports(ns, {"sqrt": "math"})
        >>> getattr_("sqrt")(4.0), "sqrt" in ns, "sqrt" in dir_()
        (2.0, True, True)
    """
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {namespace.get('__name__')!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())) | set(table))

    return __getattr__, __dir__
