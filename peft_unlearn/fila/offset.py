"""The frozen offset that keeps a data-driven adapter a no-op at init without touching the base.

FILA (and VILA) start the trainable factors at non-zero values ``A_init``, ``B_init``. The paper
cancels their product by rewriting the base weight (``W_res = W - s * B_init A_init``). Here the
base weight stays untouched and the LoRA layer's output gets

    y = W x + s * B (A drop(x)) - s * B_init (A_init x)

from a frozen copy of the initial factors: the same function and the same gradients as the
residual form (``W_res x = W x - s * B_init A_init x``; like the residual, the offset sees no
dropout), on every base PEFT wraps (plain, ``Conv1D``, bitsandbytes 4-bit/8-bit, sharded).

Mechanics, and why:

* The copies are **non-persistent buffers** in two `peft.tuners._buffer_dict.BufferDict`
  containers on the LoRA layer (``fila_offset_A`` / ``fila_offset_B``, keyed by adapter). Buffers
  follow ``.to()`` / ``.cuda()`` / FSDP device moves; non-persistent ones never enter
  ``state_dict()``, so PEFT's adapter files and ``get_peft_model_state_dict`` stay exactly the
  rank-r adapter. (Plain attributes would not follow device moves; parameters would be saved.)
* The offset is applied by a **module-level forward hook** (`offset_forward_hook`): stateless,
  so ``copy.deepcopy`` and pickling keep working. It subtracts only for active adapters that
  hold an offset, and does nothing while adapters are disabled or the layer is merged, exactly
  mirroring when PEFT adds ``s * B A``. Mixed-adapter batches (``adapter_names=``) are handled
  row by row. The term is computed as PEFT computes the adapter's (input cast to the adapter
  dtype, two bias-free linear maps, times the scaling).
* ``merge`` / ``unmerge`` / ``merge_and_unload`` use ``get_delta_weight``; the classes that carry
  an offset get it wrapped once (`wrap_delta_weight`, idempotent, guarded), so the merged
  weight is ``W + s * B A - s * B_init A_init``. Layers without an offset are unaffected.
* ``unload()``, ``get_base_model()`` weights and ``disable_adapter()`` are the original model.

Examples:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> base = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"]))
    >>> layer = model.base_model.model[0]
    >>> with torch.no_grad():
    ...     _ = layer.lora_B["default"].weight.fill_(0.5)
    >>> set_offset(layer, "default", layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(model(x), base[0].base_layer(x), atol=1e-6)
    True
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "OFFSET_A",
    "OFFSET_B",
    "get_offset",
    "has_offset",
    "offset_delta_weight",
    "offset_forward_hook",
    "remove_offset",
    "set_offset",
    "unwrap_delta_weights",
    "wrap_delta_weight",
]

#: Submodule names (on the LoRA layer) of the non-persistent buffers holding ``A_init`` / ``B_init``.
OFFSET_A = "fila_offset_A"
OFFSET_B = "fila_offset_B"
_GUARD = "_peft_unlearn_offset_wrapper"
_WRAPPED: list[type] = []


def _containers(layer: nn.Module, create: bool = False) -> tuple[Any, Any] | None:
    offsets_a = layer._modules.get(OFFSET_A)
    if offsets_a is None:
        if not create:
            return None
        from peft.tuners._buffer_dict import BufferDict

        layer.add_module(OFFSET_A, BufferDict(persistent=False))
        layer.add_module(OFFSET_B, BufferDict(persistent=False))
    return layer._modules[OFFSET_A], layer._modules[OFFSET_B]


def set_offset(layer: nn.Module, adapter_name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Attach the frozen initial factors of ``adapter_name`` to a LoRA layer and arm the offset.

    Copies are stored (later training of the adapter does not change them), on the adapter's device.

    Args:
        layer: A PEFT LoRA layer holding ``adapter_name``.
        adapter_name: The adapter whose initial product is cancelled.
        lora_a: ``A_init`` ``[r, in]``.
        lora_b: ``B_init`` ``[out, r]``.

    Raises:
        ValueError: If the shapes differ from the adapter's.
    """
    a_param, b_param = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if tuple(lora_a.shape) != tuple(a_param.shape) or tuple(lora_b.shape) != tuple(b_param.shape):
        raise ValueError(
            f"Initial factors of adapter {adapter_name!r} have shapes {tuple(lora_a.shape)}/{tuple(lora_b.shape)}, "
            f"expected {tuple(a_param.shape)}/{tuple(b_param.shape)} (the adapter's lora_A/lora_B)."
        )
    offsets_a, offsets_b = _containers(layer, create=True)
    offsets_a[adapter_name] = lora_a.detach().to(a_param.device).clone()
    offsets_b[adapter_name] = lora_b.detach().to(b_param.device).clone()
    if not any(h is offset_forward_hook for h in layer._forward_hooks.values()):
        layer.register_forward_hook(offset_forward_hook, with_kwargs=True)
    wrap_delta_weight(type(layer))


def get_offset(layer: nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the stored ``(A_init, B_init)`` of ``adapter_name`` on this layer, or None."""
    containers = _containers(layer)
    if containers is None or adapter_name not in containers[0]:
        return None
    return containers[0][adapter_name], containers[1][adapter_name]


def has_offset(layer: nn.Module, adapter_name: str) -> bool:
    """Return True if this layer cancels the initial product of ``adapter_name``."""
    return get_offset(layer, adapter_name) is not None


def remove_offset(layer: nn.Module, adapter_name: str) -> None:
    """Drop the offset of ``adapter_name`` (the adapter's full product then acts on the base)."""
    containers = _containers(layer)
    if containers is not None and adapter_name in containers[0]:
        del containers[0][adapter_name]
        del containers[1][adapter_name]


def _offset_output(layer: nn.Module, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    lora_a0, lora_b0 = get_offset(layer, adapter_name)
    dtype = layer.lora_A[adapter_name].weight.dtype
    lora_a0, lora_b0 = lora_a0.to(x.device, dtype), lora_b0.to(x.device, dtype)
    if not torch.is_autocast_enabled():
        x = x.to(dtype)
    return F.linear(F.linear(x, lora_a0), lora_b0) * layer.scaling[adapter_name]


def offset_forward_hook(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Subtract ``s * B_init (A_init x)`` for every active adapter with an offset (a forward hook).

    Does nothing when adapters are disabled or the layer is merged (PEFT then adds no adapter either).
    """
    containers = _containers(layer)
    if not containers or not len(containers[0]) or layer.disable_adapters or layer.merged:
        return None
    if not isinstance(output, torch.Tensor):
        return None
    x = args[0] if args else kwargs.get("x")
    adapter_names = kwargs.get("adapter_names")
    result = output
    if adapter_names is None:
        for adapter in layer.active_adapters:
            if adapter in containers[0] and adapter in layer.lora_A:
                result = result - _offset_output(layer, adapter, x)
    else:  # mixed batch: one adapter name per row
        for adapter in sorted(set(adapter_names)):
            if adapter in containers[0] and adapter in layer.lora_A:
                rows = torch.tensor([i for i, a in enumerate(adapter_names) if a == adapter], device=x.device)
                offset = _offset_output(layer, adapter, x.index_select(0, rows))
                result = result.index_add(0, rows, -offset.to(result.dtype))
    return result.to(output.dtype)


def offset_delta_weight(layer: nn.Module, adapter_name: str, like: torch.Tensor) -> torch.Tensor | None:
    """``s * B_init A_init`` in the layout and dtype of ``get_delta_weight`` (fp32 product), or None."""
    pair = get_offset(layer, adapter_name)
    if pair is None:
        return None
    lora_a0, lora_b0 = pair
    product = lora_b0.to(like.device, torch.float32) @ lora_a0.to(like.device, torch.float32)
    if getattr(layer, "fan_in_fan_out", False):
        product = product.T
    return (product * layer.scaling[adapter_name]).to(like.dtype)


def wrap_delta_weight(cls: type) -> bool:
    """Make ``cls.get_delta_weight`` subtract the offset, once per class (merge/unmerge use it).

    Returns:
        True if this call installed the wrapper.
    """
    current = getattr(cls, "get_delta_weight", None)
    if current is None or hasattr(current, _GUARD):
        return False

    @functools.wraps(current)
    def get_delta_weight(self, adapter, *args, **kwargs):
        delta = current(self, adapter, *args, **kwargs)
        offset = offset_delta_weight(self, adapter, delta)
        return delta if offset is None else delta - offset

    setattr(get_delta_weight, _GUARD, (cls, cls.__dict__.get("get_delta_weight")))
    cls.get_delta_weight = get_delta_weight
    _WRAPPED.append(cls)
    return True


def unwrap_delta_weights() -> int:
    """Restore every ``get_delta_weight`` wrapped by `wrap_delta_weight` (mainly for tests).

    Returns:
        The number of classes restored.
    """
    count = 0
    while _WRAPPED:
        cls = _WRAPPED.pop()
        wrapper = cls.__dict__.get("get_delta_weight")
        guard = getattr(wrapper, _GUARD, None)
        if guard is None:
            continue
        own = guard[1]
        if own is None:
            delattr(cls, "get_delta_weight")
        else:
            cls.get_delta_weight = own
        count += 1
    return count
