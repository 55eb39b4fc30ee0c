"""Names, checks, per-layer flags and weight access shared by the data-driven LoRA inits (FILA, VILA, RILA).

The bottom of the `fila` package: it imports nothing from the package except `registry` (and the shared
`peft_unlearn.utils`), and every other module (fisher, offset, init, saving, registration) may import it.

* the shared checks, each defined once: `adapter_lora_config` (a PeftModel holding the adapter), `check_target`
  (a target a data-driven init supports, before and after injection), `is_sharded` (FSDP2 / ZeRO-3).

* `DATA_DRIVEN_INITS` / `is_data_driven_init`: the `init_lora_weights` values whose factors
  are computed from data after `get_peft_model` (the layer is *pending* until then).
* `normalize_module_name` / `iter_lora_layers`: one naming of target layers before and after
  `get_peft_model`, used by Fisher statistics and saved state.
* pending flags: `mark_pending`, `clear_pending`, `is_pending` and the training warning.
* `dense_weight`: a target layer's weight as a dense float `[out, in]` matrix, whatever its
  storage (plain, GPT-2 `Conv1D`, bitsandbytes 4-bit/8-bit, FSDP2 `DTensor`, ZeRO-3 partition).

Examples:
    >>> is_data_driven_init("FILA"), is_data_driven_init(True)
    (True, False)
    >>> normalize_module_name("base_model.model.model.layers.0.mlp.up_proj.base_layer")
    'model.layers.0.mlp.up_proj'
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
from torch import nn

from ..utils import is_conv1d, is_linear_like
from .registry import FILA_INIT_NAME, VILA_INIT_NAME, init_name, init_names, is_data_driven_init

__all__ = [
    "DATA_DRIVEN_INITS",
    "DataDrivenInitPendingWarning",
    "FLOAT_DTYPES",
    "IMPORTANCE_ATTR",
    "FilaNotInitializedWarning",
    "VILA_INIT_NAME",
    "check_target",
    "check_target_layer",
    "clear_pending",
    "config_targets",
    "copy_into_",
    "data_driven_adapters",
    "dense_weight",
    "init_name",
    "is_data_driven_init",
    "is_fila_init",
    "is_dtensor",
    "is_pending",
    "is_sharded",
    "iter_lora_layers",
    "mark_pending",
    "normalize_module_name",
    "peak_memory",
]

#: ``init_lora_weights`` values computed from forget/retain data after ``get_peft_model`` (`peft_unlearn.fila.registry`).
DATA_DRIVEN_INITS = init_names()
#: Float dtypes a dense base weight may have.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Attribute that `preprocess_fila` attaches to a base layer (consumed by the init during injection).
IMPORTANCE_ATTR = "_fila_importance"
_PENDING_ATTR = "_fila_pending"
_QUANTIZED_PARAMS = ("Params4bit", "Int8Params")
_WARNED_ADAPTERS: set[str] = set()


class DataDrivenInitPendingWarning(UserWarning):
    """A data-driven adapter (FILA, VILA, RILA) is used for training before its weights were computed."""


#: Deprecated name of `DataDrivenInitPendingWarning` (the warning covers every data-driven init, not only FILA).
FilaNotInitializedWarning = DataDrivenInitPendingWarning


def is_fila_init(value: Any) -> bool:
    """Return True if an ``init_lora_weights`` value selects FILA (case-insensitive ``"fila"``)."""
    return init_name(value) == FILA_INIT_NAME


def normalize_module_name(name: str) -> str:
    """Map a module name inside a PeftModel to the name of the same module in the plain base model.

    ``base_model.model.model.layers.0.mlp.up_proj.base_layer`` -> ``model.layers.0.mlp.up_proj``. Fisher
    statistics and saved state use these names so that they work before and after ``get_peft_model``.
    """
    prefix = "base_model.model."
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return ".".join(p for p in name.split(".") if p != "base_layer")


def adapter_lora_config(peft_model: nn.Module, adapter_name: str, init: str = FILA_INIT_NAME) -> Any:
    """The `LoraConfig` of `adapter_name`, after checking that `peft_model` is a PeftModel holding it.

    Args:
        peft_model: The model passed to a data-driven init.
        adapter_name: The adapter to initialise.
        init: The init's name (`"fila"`, `"vila"`), used in the fix the error suggests.

    Returns:
        `peft_model.peft_config[adapter_name]`.

    Raises:
        TypeError: `peft_model` is not a PeftModel.
        ValueError: `adapter_name` is not one of its adapters.

    Examples:
        >>> adapter_lora_config(nn.Linear(2, 2), "default", "fila")
        Traceback (most recent call last):
        ...
        TypeError: `peft_model` must be a PeftModel (from get_peft_model), got Linear; wrap the model with get_peft_model(model, LoraConfig(init_lora_weights='fila', ...)) first.
    """
    from collections.abc import Mapping

    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, Mapping):
        raise TypeError(
            f"`peft_model` must be a PeftModel (from get_peft_model), got {type(peft_model).__name__}; wrap the "
            f"model with get_peft_model(model, LoraConfig(init_lora_weights={init!r}, ...)) first."
        )
    if adapter_name not in configs:
        raise ValueError(f"`adapter_name`={adapter_name!r} is not an adapter of the model; have {sorted(configs)}.")
    return configs[adapter_name]


def iter_lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """List the LoRA layers of ``model`` that hold ``adapter_name`` (normalised names, model order).

    Args:
        model: A PeftModel (or any module containing PEFT LoRA layers).
        adapter_name: The adapter to look for.

    Returns:
        ``(normalized_name, lora_layer)`` pairs.
    """
    from peft.tuners.lora.layer import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (
            adapter_name in module.lora_A or adapter_name in getattr(module, "lora_embedding_A", {})
        ):
            found.append((normalize_module_name(name), module))
    return found


def data_driven_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters whose config selects a data-driven init (``"fila"`` or ``"vila"``)."""
    configs = getattr(model, "peft_config", None) or {}
    return [name for name, cfg in configs.items() if is_data_driven_init(getattr(cfg, "init_lora_weights", None))]


# ----------------------------------------------------------------------------------------------------------------
# pending flags
# ----------------------------------------------------------------------------------------------------------------


def _pending_forward_pre_hook(module: nn.Module, args: Any) -> None:
    """Warn once per adapter when a pending adapter is trained (module-level: deepcopy/pickle safe)."""
    if not (module.training and torch.is_grad_enabled()) or getattr(module, "disable_adapters", False):
        return
    pending = module.__dict__.get(_PENDING_ATTR, {})
    fresh = [a for a in module.active_adapters if pending.get(a) and a not in _WARNED_ADAPTERS]
    if fresh:
        _WARNED_ADAPTERS.update(fresh)
        warnings.warn(
            f"Data-driven adapter(s) {fresh} are used for training before their weights were computed: they still "
            "hold PEFT's default init, so this trains a plain LoRA. Call "
            "peft_unlearn.fila.initialize_adapter_weights(model, forget_dataloader, retain_dataloader) first "
            "(UnlearningTrainer does this automatically).",
            DataDrivenInitPendingWarning,
            stacklevel=2,
        )


def _has_hook(hooks: dict[int, Any], fn: Any) -> bool:
    return any(h is fn for h in hooks.values())


def mark_pending(layer: nn.Module, adapter_name: str) -> None:
    """Flag ``adapter_name`` of a LoRA layer as waiting for its weights and arm the training warning."""
    layer.__dict__.setdefault(_PENDING_ATTR, {})[adapter_name] = True
    _WARNED_ADAPTERS.discard(adapter_name)
    if not _has_hook(layer._forward_pre_hooks, _pending_forward_pre_hook):
        layer.register_forward_pre_hook(_pending_forward_pre_hook)


def clear_pending(layer: nn.Module, adapter_name: str) -> None:
    """Remove the pending flag of ``adapter_name``; drop the warning hook when nothing is pending any more."""
    pending = layer.__dict__.get(_PENDING_ATTR, {})
    pending.pop(adapter_name, None)
    if not any(pending.values()):
        for key in [k for k, h in layer._forward_pre_hooks.items() if h is _pending_forward_pre_hook]:
            del layer._forward_pre_hooks[key]


def is_pending(layer: nn.Module, adapter_name: str) -> bool:
    """Return True if ``adapter_name`` of this layer still waits for its data-driven weights."""
    return bool(layer.__dict__.get(_PENDING_ATTR, {}).get(adapter_name, False))


# ----------------------------------------------------------------------------------------------------------------
# target layers and their weights
# ----------------------------------------------------------------------------------------------------------------


def _is_quantized(weight: Any) -> bool:
    return type(weight).__name__ in _QUANTIZED_PARAMS


def check_target(module: nn.Module, init: str = FILA_INIT_NAME, name: str | None = None) -> nn.Module:
    """Return the base layer of a target if a data-driven init supports it, else raise a ValueError.

    The one target check of every data-driven init, before injection (`module` is a plain layer of the model,
    or an existing LoRA layer) and after it (`module` is the LoRA layer). Supported: ``nn.Linear``
    (bitsandbytes ``Linear4bit``/``Linear8bitLt`` included) and transformers ``Conv1D`` with a float or
    bitsandbytes-quantized weight.

    Args:
        module: The target module or its LoRA layer.
        init: The init's name, for the message.
        name: The module's name, for the message (before injection: the model is then left unchanged).

    Returns:
        The base layer.
    """
    from peft.tuners.lora.layer import _ConvNd
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    where = f"{name} ({type(base).__name__})" if name else f"a {type(base).__name__} target"
    embedding = bool(getattr(module, "lora_embedding_A", None)) and not getattr(module, "lora_A", None)
    if isinstance(module, _ConvNd) or embedding or not is_linear_like(base):
        raise ValueError(
            f"init_lora_weights={init!r} supports nn.Linear and transformers Conv1D targets only, but "
            f"`target_modules` matches {where}. Restrict target_modules to linear layers (e.g. 'all-linear')"
            + ("; the model was left unchanged." if name else ".")
        )
    weight = getattr(base, "weight", None)
    if weight is None or not (weight.dtype in FLOAT_DTYPES or _is_quantized(weight)):
        raise ValueError(
            f"init_lora_weights={init!r} needs a float or bitsandbytes 4-bit/8-bit weight, but {where} has dtype "
            f"{None if weight is None else weight.dtype}; for GGUF use GgufConfig(dequantize=True)."
        )
    return base


def check_target_layer(layer: nn.Module, adapter_name: str, init: str = FILA_INIT_NAME) -> nn.Module:
    """`check_target` for the LoRA layer of `adapter_name` (it must hold ``lora_A``/``lora_B`` of it)."""
    if adapter_name not in layer.lora_A:
        raise ValueError(
            f"init_lora_weights={init!r} supports nn.Linear and transformers Conv1D targets only, got a "
            f"{type(layer.get_base_layer()).__name__} target without lora_A/lora_B; restrict `target_modules` to "
            "linear layers."
        )
    return check_target(layer, init)


def is_dtensor(tensor: Any) -> bool:
    """Return True for an FSDP2 ``torch.distributed.tensor.DTensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def is_sharded(param: torch.Tensor) -> bool:
    """Return True if `param` is sharded over processes (an FSDP2 ``DTensor`` or a DeepSpeed ZeRO-3 partition)."""
    return is_dtensor(param) or hasattr(param, "ds_id")


def peak_memory(devices: set[torch.device]) -> int:
    """Peak memory of an init in bytes: CUDA max allocated over `devices`, else the process's RSS high-water mark."""
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        return max(torch.cuda.max_memory_allocated(d) for d in cuda)
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def _dequantize_bnb(base_layer: nn.Module) -> torch.Tensor:
    """Dequantize a bitsandbytes weight without touching the layer.

    (PEFT's ``dequantize_module_weight`` re-assigns an 8-bit weight on CPU, which drops its scales.)
    """
    import bitsandbytes as bnb

    weight = base_layer.weight
    if type(weight).__name__ == "Params4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an inference forward on an AVX512 CPU
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))  # on copies
        return bnb.functional.dequantize_4bit(data, state)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(base_layer, "state", None), "SCB", None)
    if scales is None:
        raise ValueError(f"The 8-bit weight of {type(base_layer).__name__} has no row scales (SCB) to dequantize.")
    return weight.data.to(torch.float32) * (scales.to(weight.device, torch.float32).view(-1, 1) / 127.0)


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The weight of a target base layer as a dense float ``[out, in]`` tensor (``nn.Linear`` layout).

    bitsandbytes weights are dequantized read-only (``dequantize_4bit``; int8 rows times their scales), FSDP2
    ``DTensor`` weights are gathered (``full_tensor()``), GPT-2 ``Conv1D`` weights are transposed. Under
    DeepSpeed ZeRO-3 call it inside ``peft.utils.integrations.gather_params_ctx(base_layer.weight)``; the
    result is then a copy that stays valid after the context. The base layer is never modified.

    Args:
        base_layer: An ``nn.Linear`` (plain or bitsandbytes) or ``Conv1D``.

    Returns:
        A detached float tensor on the weight's device.
    """
    weight = base_layer.weight
    if _is_quantized(weight):
        weight = _dequantize_bnb(base_layer)
    if hasattr(weight, "full_tensor"):  # torch.distributed.tensor.DTensor (FSDP2)
        weight = weight.full_tensor()
    weight = weight.detach()
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"Cannot read a float weight from {type(base_layer).__name__} (dtype {weight.dtype}).")
    if hasattr(base_layer.weight, "ds_id"):  # a ZeRO-3 partition gathered by the caller: keep a copy
        weight = weight.clone()
    return weight.mT if is_conv1d(base_layer) else weight


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
    if is_dtensor(param):
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


def config_targets(model: nn.Module, lora_config: Any) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that ``lora_config`` targets, before any layer is swapped (model order).

    Resolves ``target_modules=None`` (PEFT's per-architecture defaults), ``"all-linear"`` (every
    ``nn.Linear``/``Conv1D`` but the output embedding), names, suffixes and regexes, and honours
    ``exclude_modules``, like PEFT's injection. Modules inside existing adapter layers are skipped;
    an existing LoRA layer is returned itself (its base layer is the target).

    Args:
        model: The model adapters are injected into (plain, or already holding LoRA layers).
        lora_config: A ``LoraConfig``.

    Returns:
        ``(name, module)`` pairs, names as in ``model.named_modules()``.
    """
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    targets = lora_config.target_modules
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    probe = lora_config
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = LoraModel.target_module_mapping.get(model_type)
        if defaults is None:
            raise ValueError("`lora_config.target_modules` is None and PEFT has no default for this model; set it.")
        probe = lora_config.__class__(**{**lora_config.to_dict(), "target_modules": list(defaults)})
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside.append(name + ".")
        if all_linear:
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            hit = is_linear_like(base) and base is not output
            hit = hit and not _is_excluded(lora_config, name)
        else:
            hit = bool(check_target_module_exists(probe, name))
        if hit:
            found.append((name, module))
    return found


def _is_excluded(lora_config: Any, name: str) -> bool:
    exclude = getattr(lora_config, "exclude_modules", None)
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return name in exclude or any(name.endswith(f".{key}") for key in exclude)
