"""The idempotent hook that teaches stock PEFT ``LoraConfig(init_lora_weights="fila")``.

PEFT has no registry for LoRA initialisations: ``LoraLayer.update_layer`` dispatches the strings it
knows and sends every other truthy value to ``LoraLayer.reset_lora_parameters``, which raises for
unknown names (hf-integration.md section 1). :func:`register_fila` installs three small wrappers,
each keeping the original and delegating everything that is not FILA:

* ``LoraLayer.reset_lora_parameters``: for ``"fila"`` on an ``nn.Linear`` / GPT-2 ``Conv1D`` target
  it applies PEFT's default init (``B = 0``, so the model output is unchanged) and marks the layer
  *pending* until :func:`peft_unlearn.fila.initialize_fila_weights` computes the real weights. When
  :func:`peft_unlearn.fila.init.preprocess_fila` attached Fisher statistics to the base layer
  beforehand, the layer is initialised right away instead (like PEFT's LoRA-GA). Embedding and
  convolution targets are rejected.
* ``LoraModel._check_new_adapter_config``: validates FILA configs when PEFT injects an adapter
  (``get_peft_model``, ``add_adapter``, ``load_adapter``), see
  :func:`peft_unlearn.fila.config.validate_fila_lora_config`.
* ``PeftModel.save_pretrained``: FILA models save the portable rank-2r plain LoRA by default and
  accept ``fila_portable=False`` for the raw format (:mod:`peft_unlearn.fila.saving`).

A pending layer warns on a training forward pass and saving it raises.

Examples:
    >>> import peft_unlearn  # calls register_fila()
    >>> from peft_unlearn.fila.registration import register_fila
    >>> register_fila()  # already registered: nothing happens
    False
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

__all__ = [
    "FilaNotInitializedWarning",
    "clear_pending",
    "get_init_state",
    "is_fila_init",
    "is_registered",
    "iter_lora_layers",
    "mark_pending",
    "normalize_module_name",
    "pending_fila_adapters",
    "register_fila",
    "set_init_state",
    "unregister_fila",
]

_GUARD = "_peft_unlearn_fila_wrapper"
_PENDING_ATTR = "_fila_pending"
_HOOK_ATTR = "_fila_pending_hook"
_STATE_ATTR = "_fila_init_state"
#: Attribute that :func:`peft_unlearn.fila.init.preprocess_fila` attaches to a base layer.
IMPORTANCE_ATTR = "_fila_importance"
_WARNED_ADAPTERS: set[str] = set()


class FilaNotInitializedWarning(UserWarning):
    """A FILA adapter is used for training before :func:`initialize_fila_weights` ran."""


def is_fila_init(value: Any) -> bool:
    """Return True if an ``init_lora_weights`` value selects FILA (case-insensitive ``"fila"``)."""
    return isinstance(value, str) and value.lower() == "fila"


def normalize_module_name(name: str) -> str:
    """Map a module name inside a PeftModel to the name of the same module in the plain base model.

    ``base_model.model.model.layers.0.mlp.up_proj.base_layer`` -> ``model.layers.0.mlp.up_proj``. Fisher
    statistics and saved FILA state use these names so that they work before and after ``get_peft_model``.
    """
    prefix = "base_model.model."
    if name.startswith(prefix):
        name = name[len(prefix) :]
    parts = [p for p in name.split(".") if p != "base_layer"]
    return ".".join(parts)


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


# ----------------------------------------------------------------------------------------------------------------
# per-layer state: pending flags and the initial A0/B0
# ----------------------------------------------------------------------------------------------------------------


def _pending_forward_pre_hook(module: nn.Module, args: Any) -> None:
    if not (module.training and torch.is_grad_enabled()) or getattr(module, "disable_adapters", False):
        return
    pending = getattr(module, _PENDING_ATTR, {})
    names = [a for a in module.active_adapters if pending.get(a)]
    fresh = [a for a in names if a not in _WARNED_ADAPTERS]
    if fresh:
        _WARNED_ADAPTERS.update(fresh)
        warnings.warn(
            f"FILA adapter(s) {fresh} are used for training before their weights were computed: they still hold "
            "PEFT's default init, so this trains a plain LoRA. Call "
            "peft_unlearn.fila.initialize_fila_weights(model, forget_dataloader, retain_dataloader) first "
            "(UnlearningTrainer does this automatically).",
            FilaNotInitializedWarning,
            stacklevel=2,
        )


def mark_pending(layer: nn.Module, adapter_name: str) -> None:
    """Flag ``adapter_name`` of a LoRA layer as waiting for its FILA weights and arm the training warning."""
    pending = layer.__dict__.setdefault(_PENDING_ATTR, {})
    pending[adapter_name] = True
    _WARNED_ADAPTERS.discard(adapter_name)
    if getattr(layer, _HOOK_ATTR, None) is None:
        layer.__dict__[_HOOK_ATTR] = layer.register_forward_pre_hook(_pending_forward_pre_hook)


def clear_pending(layer: nn.Module, adapter_name: str) -> None:
    """Remove the pending flag of ``adapter_name``; drop the forward hook when nothing is pending any more."""
    pending = layer.__dict__.get(_PENDING_ATTR, {})
    pending.pop(adapter_name, None)
    if not any(pending.values()):
        handle = layer.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()


def is_pending(layer: nn.Module, adapter_name: str) -> bool:
    """Return True if ``adapter_name`` of this layer still waits for its FILA weights."""
    return bool(layer.__dict__.get(_PENDING_ATTR, {}).get(adapter_name, False))


def set_init_state(layer: nn.Module, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Remember the initial FILA factors ``A0`` [r, in] and ``B0`` [out, r] of a layer (not in the state dict)."""
    state = layer.__dict__.setdefault(_STATE_ATTR, {})
    state[adapter_name] = (lora_A.detach().clone(), lora_B.detach().clone())


def get_init_state(layer: nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the stored ``(A0, B0)`` of ``adapter_name`` or None."""
    return layer.__dict__.get(_STATE_ATTR, {}).get(adapter_name)


def pop_init_state(layer: nn.Module, adapter_name: str) -> None:
    """Forget the stored ``(A0, B0)`` of ``adapter_name``."""
    layer.__dict__.get(_STATE_ATTR, {}).pop(adapter_name, None)


def pending_fila_adapters(model: nn.Module) -> list[str]:
    """Adapter names whose config says ``"fila"`` and whose FILA weights are not computed yet.

    An adapter counts as pending if any of its layers is flagged pending (fresh ``get_peft_model``, or
    a raw FILA checkpoint loaded without :func:`peft_unlearn.fila.saving.restore_fila_residual`), or if
    none of its layers carries an initial state.

    Args:
        model: A PeftModel.

    Returns:
        Sorted list of adapter names (empty if nothing is pending or the model has no FILA adapter).

    Examples:
        >>> pending_fila_adapters(peft_model)  # doctest: +SKIP
        ['default']
    """
    configs = getattr(model, "peft_config", None) or {}
    result = []
    for adapter_name, config in configs.items():
        if not is_fila_init(getattr(config, "init_lora_weights", None)):
            continue
        layers = iter_lora_layers(model, adapter_name)
        if any(is_pending(layer, adapter_name) for _, layer in layers) or not any(
            get_init_state(layer, adapter_name) is not None for _, layer in layers
        ):
            result.append(adapter_name)
    return sorted(result)


# ----------------------------------------------------------------------------------------------------------------
# the wrappers
# ----------------------------------------------------------------------------------------------------------------


def _check_fila_target(layer: nn.Module, adapter_name: str) -> nn.Module:
    """Return the base layer if FILA supports this target, else raise a ValueError."""
    from peft.tuners.lora.layer import _ConvNd
    from transformers.pytorch_utils import Conv1D

    base = layer.get_base_layer()
    kind = type(base).__name__
    if adapter_name in getattr(layer, "lora_embedding_A", {}) or isinstance(layer, _ConvNd):
        raise ValueError(
            f"init_lora_weights='fila' supports nn.Linear and transformers Conv1D targets only, got a {kind} "
            f"target (LoRA layer {type(layer).__name__}). Remove it from `target_modules` (e.g. use "
            "target_modules='all-linear')."
        )
    if adapter_name not in layer.lora_A or not isinstance(base, (nn.Linear, Conv1D)):
        raise ValueError(
            f"init_lora_weights='fila' supports nn.Linear and transformers Conv1D targets only, got {kind}; "
            "restrict `target_modules` to linear layers."
        )
    weight = getattr(base, "weight", None)
    if weight is None or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        dtype = None if weight is None else weight.dtype
        raise ValueError(
            f"init_lora_weights='fila' needs a float base weight (fp32/fp16/bf16) to subtract the residual, got "
            f"dtype {dtype} on a {kind} target. Load the model unquantized (for GGUF use "
            "GgufConfig(dequantize=True)) and quantize the residual model afterwards if needed."
        )
    return base


def _fila_reset(layer: nn.Module, adapter_name: str, original: Any) -> None:
    base = _check_fila_target(layer, adapter_name)
    original(layer, adapter_name, True)  # kaiming A, zero B: the adapter is a no-op until FILA runs
    attached = getattr(base, IMPORTANCE_ATTR, None)
    if attached is not None and layer.lora_A[adapter_name].weight.device.type != "meta":
        from .init import init_layer_from_attached_importance

        init_layer_from_attached_importance(layer, adapter_name, attached)
        try:
            delattr(base, IMPORTANCE_ATTR)
        except AttributeError:  # pragma: no cover - the attribute was removed concurrently
            pass
        return
    mark_pending(layer, adapter_name)


def _wrap_reset_lora_parameters(original: Any) -> Any:
    @functools.wraps(original)
    def reset_lora_parameters(self, adapter_name, init_lora_weights, *args, **kwargs):
        if is_fila_init(init_lora_weights):
            return _fila_reset(self, adapter_name, original)
        return original(self, adapter_name, init_lora_weights, *args, **kwargs)

    setattr(reset_lora_parameters, _GUARD, original)
    return reset_lora_parameters


def _wrap_check_new_adapter_config(original: Any) -> Any:
    @functools.wraps(original)
    def _check_new_adapter_config(self, config, *args, **kwargs):
        result = original(self, config, *args, **kwargs)
        if is_fila_init(getattr(config, "init_lora_weights", None)):
            from .config import validate_fila_lora_config

            validate_fila_lora_config(config)
        return result

    setattr(_check_new_adapter_config, _GUARD, original)
    return _check_new_adapter_config


def _wrap_save_pretrained(original: Any) -> Any:
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, fila_portable: bool = True, **kwargs):
        from .saving import fila_save_pretrained, is_fila_model

        if not is_fila_model(self):
            return original(self, save_directory, *args, **kwargs)
        return fila_save_pretrained(self, original, save_directory, *args, fila_portable=fila_portable, **kwargs)

    setattr(save_pretrained, _GUARD, original)
    save_pretrained.__doc__ = (original.__doc__ or "") + (
        "\n        peft_unlearn: for models with a FILA adapter (init_lora_weights='fila') this writes the portable "
        "rank-2r plain LoRA by default; pass `fila_portable=False` for the raw rank-r adapter plus `_fila_init/`.\n"
    )
    return save_pretrained


def _targets() -> list[tuple[type, str, Any]]:
    from peft import PeftModel
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import LoraModel

    return [
        (LoraLayer, "reset_lora_parameters", _wrap_reset_lora_parameters),
        (LoraModel, "_check_new_adapter_config", _wrap_check_new_adapter_config),
        (PeftModel, "save_pretrained", _wrap_save_pretrained),
    ]


def is_registered() -> bool:
    """Return True if every FILA wrapper is installed."""
    return all(hasattr(cls.__dict__.get(attr), _GUARD) for cls, attr, _ in _targets())


def register_fila() -> bool:
    """Install the FILA hooks into PEFT (idempotent; called by ``import peft_unlearn``).

    Returns:
        True if at least one wrapper was installed by this call, False if everything was in place.

    Raises:
        RuntimeError: If this PEFT version lacks one of the patched methods (unsupported version).
    """
    installed = False
    for cls, attr, wrap in _targets():
        current = cls.__dict__.get(attr)
        if current is None:
            raise RuntimeError(
                f"peft_unlearn cannot register FILA: {cls.__module__}.{cls.__name__}.{attr} does not exist in this "
                "PEFT version (tested with peft>=0.21,<0.23)."
            )
        if hasattr(current, _GUARD):
            continue
        setattr(cls, attr, wrap(current))
        installed = True
    return installed


def unregister_fila() -> bool:
    """Remove the FILA hooks and restore PEFT's original methods (mainly for tests).

    Returns:
        True if anything was removed.
    """
    removed = False
    for cls, attr, _ in _targets():
        current = cls.__dict__.get(attr)
        original = getattr(current, _GUARD, None)
        if original is not None:
            setattr(cls, attr, original)
            removed = True
    return removed
