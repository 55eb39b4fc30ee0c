"""Read a layer's weight as a plain dense tensor, and write a full value into a (possibly sharded) parameter.

FILA's weighted SVD needs the full weight of each target layer, and the LoRA factors it computes must
be written into parameters that may be sharded. These two helpers hide the storage:

* FSDP2 `DTensor` parameters: gathered with `full_tensor()` (all ranks take part), written back shard by
  shard (every rank computes the same full value, so no communication is needed to write);
* DeepSpeed ZeRO-3 partitioned parameters: gathered with PEFT's `gather_params_ctx`;
* bitsandbytes `Params4bit` (nf4/fp4) and `Int8Params`: dequantized, so the SVD runs on the weight the
  layer multiplies with;
* anything else: the tensor itself.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["copy_into_", "dense_weight"]


def _dtensor_type() -> type | tuple:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return DTensor


def _int8_scales(module: nn.Module) -> torch.Tensor | None:
    """Row scales of an LLM.int8 weight (on the weight before the first forward, in ``module.state`` after)."""
    scales = getattr(module.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    return scales


def dense_weight(module: nn.Module, linear_layout: bool = True) -> torch.Tensor:
    """The full, dequantized weight of a linear layer as a plain tensor (a copy when it had to be built).

    Args:
        module: An `nn.Linear` (also bitsandbytes `Linear4bit`/`Linear8bitLt`) or transformers `Conv1D`,
            whose weight may be a `DTensor` or a ZeRO-3 partitioned parameter.
        linear_layout: Return ``[out, in]`` (Conv1D weights are transposed); False keeps the stored layout.

    Returns:
        A floating-point tensor on the weight's device (for 4-bit/8-bit: the dequantized weight in
        the layer's compute dtype, fp32 by default).

    Raises:
        TypeError: If the module has no ``weight`` tensor.

    Examples:
        >>> layer = torch.nn.Linear(3, 2)
        >>> torch.equal(dense_weight(layer), layer.weight)
        True
    """
    from transformers.pytorch_utils import Conv1D

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no `weight` tensor to read (got {type(weight).__name__}).")
    if isinstance(weight, _dtensor_type()):
        dense = weight.full_tensor()
    elif hasattr(weight, "ds_id"):
        from peft.utils.integrations import gather_params_ctx

        with gather_params_ctx(weight):
            dense = weight.detach().clone()
    elif type(weight).__name__ == "Params4bit":
        import bitsandbytes as bnb

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by a CPU inference forward (AVX512-BF16)
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        dense = bnb.functional.dequantize_4bit(data, state)
        compute = getattr(module, "compute_dtype", None)
        dense = dense.to(compute) if isinstance(compute, torch.dtype) else dense
    elif type(weight).__name__ == "Int8Params" and _int8_scales(module) is not None:
        dense = weight.data.float() * _int8_scales(module).float()[:, None] / 127
    else:
        dense = weight.detach()
    dense = dense.detach()
    if linear_layout and isinstance(module, Conv1D):
        dense = dense.mT
    return dense


@torch.no_grad()
def copy_into_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a full (unsharded) ``value`` into ``param``, in place, whatever its sharding.

    Every rank must pass the same ``value`` (FILA computes the same init on every rank): a `DTensor`
    parameter keeps only its own shard of it, without communication.

    Args:
        param: The destination parameter (plain, `DTensor`, or ZeRO-3 partitioned).
        value: The full value, shape of the unsharded parameter; cast to ``param``'s dtype and device.

    Raises:
        ValueError: If the shapes differ.

    Examples:
        >>> p = torch.nn.Parameter(torch.zeros(2, 2))
        >>> copy_into_(p, torch.ones(2, 2)); p.sum().item()
        4.0
    """
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if tuple(value.shape) != shape:
        raise ValueError(f"Cannot write a value of shape {tuple(value.shape)} into a parameter of shape {shape}.")
    if isinstance(param, _dtensor_type()):
        from torch.distributed.tensor import distribute_tensor

        local = param.to_local()
        shard = distribute_tensor(
            value.to(device=local.device, dtype=param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        local.copy_(shard.to_local())
    elif hasattr(param, "ds_id"):
        from peft.utils.integrations import gather_params_ctx

        with gather_params_ctx(param, modifier_rank=0):
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))
    else:
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))
