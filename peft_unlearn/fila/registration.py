"""The idempotent, never-fatal hook that teaches stock PEFT ``init_lora_weights="fila"`` (and ``"vila"``).

PEFT has no registry for LoRA initialisations: ``LoraLayer.update_layer`` dispatches the strings it
knows and sends every other truthy value to ``LoraLayer.reset_lora_parameters``, which raises for
unknown names. `register_fila` (called by ``import peft_unlearn``) installs small wrappers, each
keeping the original and delegating everything that is not a data-driven init:

* ``LoraLayer.reset_lora_parameters``: for ``"fila"``/``"vila"`` on an ``nn.Linear`` (bitsandbytes
  4-bit/8-bit included) or GPT-2 ``Conv1D`` target it applies PEFT's default init (``B = 0``, so the
  model output is unchanged) and marks the layer *pending* until
  `peft_unlearn.fila.initialize_adapter_weights` computes the real weights. When
  `peft_unlearn.fila.preprocess.preprocess_fila` attached Fisher statistics to the base layer, the
  layer is initialised right away instead (like PEFT's LoRA-GA).
* ``LoraModel._check_new_adapter_config`` and, for ``get_peft_model(..., mixed=True)``,
  ``MixedModel._check_new_adapter_config``: validate data-driven configs when PEFT injects an
  adapter (`peft_unlearn.fila.config.validate_fila_lora_config`), reject AdaLoRA, and check every
  matched target module **before any layer is swapped** (embeddings and convolutions are refused
  with the model left as it was).
* ``PeftModel.save_pretrained``: data-driven adapters save the portable rank-2r plain LoRA by
  default and accept ``fila_portable=False`` for the raw format (`peft_unlearn.fila.saving`).

If this PEFT version lacks one of these methods, nothing is installed: a `FilaUnavailableWarning`
is issued once and FILA/VILA are disabled, while losses, metrics and the trainer keep working.

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

from torch import nn

from .config import validate_fila_lora_config
from .init import init_layer_from_attached_importance
from .offset import remove_offset, unwrap_delta_weights
from .registry import FILA_INIT_NAME
from .saving import fila_save_pretrained, has_data_driven_adapter
from .state import (
    IMPORTANCE_ATTR,
    DataDrivenInitPendingWarning,
    FilaNotInitializedWarning,
    check_target,
    check_target_layer,
    config_targets,
    init_name,
    iter_lora_layers,
    mark_pending,
    normalize_module_name,
)

__all__ = [
    "SUPPORTED_PEFT",
    "DataDrivenInitPendingWarning",
    "FilaNotInitializedWarning",
    "FilaUnavailableWarning",
    "is_registered",
    "iter_lora_layers",  # re-exported from `state` for code written against the earlier layout
    "normalize_module_name",
    "register_fila",
    "unregister_fila",
]

#: The PEFT versions this hook is tested with (``>=`` first, ``<`` second); pyproject.toml pins the same range.
SUPPORTED_PEFT = ("0.21", "0.23")
_GUARD = "_peft_unlearn_fila_wrapper"
_WARNED: set[str] = set()


class FilaUnavailableWarning(UserWarning):
    """The installed PEFT lacks a method the FILA hook wraps; FILA/VILA are disabled."""


# ----------------------------------------------------------------------------------------------------------------
# the wrappers
# ----------------------------------------------------------------------------------------------------------------


def _data_driven_reset(layer: nn.Module, adapter_name: str, init: str, original: Any) -> None:
    base = check_target_layer(layer, adapter_name, init)
    original(layer, adapter_name, True)  # kaiming A, zero B: the adapter is a no-op until the init runs
    remove_offset(layer, adapter_name)  # a stale offset of a deleted adapter with the same name
    attached = getattr(base, IMPORTANCE_ATTR, None)
    if init == FILA_INIT_NAME and attached is not None and layer.lora_A[adapter_name].weight.device.type != "meta":
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
        init = init_name(init_lora_weights)
        if init is not None:
            return _data_driven_reset(self, adapter_name, init, original)
        return original(self, adapter_name, init_lora_weights, *args, **kwargs)

    setattr(reset_lora_parameters, _GUARD, original)
    return reset_lora_parameters


def validate_targets(model: nn.Module, config: Any) -> None:
    """Reject targets a data-driven init cannot handle, before PEFT swaps any layer (`check_target` on each).

    Args:
        model: The model the adapter is injected into.
        config: A ``LoraConfig`` whose ``init_lora_weights`` is a data-driven init.

    Raises:
        ValueError: Naming the first unsupported target module, its type and the fix.
    """
    init = init_name(config.init_lora_weights)
    try:
        targets = config_targets(model, config)
    except ValueError:  # no default targets for this model: PEFT raises its own error next
        return
    for name, module in targets:
        check_target(module, init, name)


def _check_data_driven_config(tuner: Any, config: Any) -> None:
    init = init_name(getattr(config, "init_lora_weights", None))
    if init is None:
        return
    peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
    if peft_type.upper() != "LORA":
        raise ValueError(
            f"init_lora_weights={init!r} is a LoRA initialisation; it is not supported by {peft_type} "
            f"({type(config).__name__}), which would silently use its default init. Use peft.LoraConfig."
        )
    validate_fila_lora_config(config)
    model = getattr(tuner, "model", None)
    if isinstance(model, nn.Module):
        validate_targets(model, config)


def _wrap_check_new_adapter_config(original: Any) -> Any:
    @functools.wraps(original)
    def _check_new_adapter_config(self, config, *args, **kwargs):
        _check_data_driven_config(self, config)
        return original(self, config, *args, **kwargs)

    setattr(_check_new_adapter_config, _GUARD, original)
    return _check_new_adapter_config


def _wrap_save_pretrained(original: Any) -> Any:
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, fila_portable: bool = True, **kwargs):
        if not has_data_driven_adapter(self):
            return original(self, save_directory, *args, **kwargs)
        return fila_save_pretrained(self, original, save_directory, *args, fila_portable=fila_portable, **kwargs)

    setattr(save_pretrained, _GUARD, original)
    save_pretrained.__doc__ = (original.__doc__ or "") + (
        "\n        peft_unlearn: for models with a FILA/VILA adapter this writes the portable rank-2r plain LoRA by "
        "default; pass `fila_portable=False` for the raw rank-r adapter plus `_fila_init/`.\n"
    )
    return save_pretrained


# ----------------------------------------------------------------------------------------------------------------
# install / remove
# ----------------------------------------------------------------------------------------------------------------


def _targets() -> list[tuple[Any, str, Any]]:
    from peft import PeftModel
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.mixed.model import MixedModel

    return [
        (LoraLayer, "reset_lora_parameters", _wrap_reset_lora_parameters),
        (LoraModel, "_check_new_adapter_config", _wrap_check_new_adapter_config),
        (MixedModel, "_check_new_adapter_config", _wrap_check_new_adapter_config),
        (PeftModel, "save_pretrained", _wrap_save_pretrained),
    ]


def _warn_once(key: str, message: str, category: type[Warning] = FilaUnavailableWarning) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, category, stacklevel=3)


def _peft_version_supported() -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    low, high = SUPPORTED_PEFT
    return Version(low) <= Version(version("peft")) < Version(high)


def is_registered() -> bool:
    """Return True if every FILA wrapper is installed."""
    try:
        return all(hasattr(cls.__dict__.get(attr), _GUARD) for cls, attr, _ in _targets())
    except ImportError:
        return False


def register_fila() -> bool:
    """Install the FILA hooks into PEFT (idempotent, never raises; called by ``import peft_unlearn``).

    All wrappers are installed or none: if this PEFT version lacks one of the wrapped methods, a
    `FilaUnavailableWarning` is issued once and FILA/VILA stay disabled (``init_lora_weights="fila"``
    then fails in PEFT as an unknown init). A PEFT version outside `SUPPORTED_PEFT` only warns.

    Returns:
        True if at least one wrapper was installed by this call, False otherwise.
    """
    try:
        targets = _targets()
    except (ImportError, AttributeError) as error:
        _warn_once("import", f"peft_unlearn: FILA is disabled, PEFT's LoRA internals could not be imported ({error}).")
        return False
    missing = [f"{cls.__module__}.{cls.__name__}.{attr}" for cls, attr, _ in targets if attr not in cls.__dict__]
    if missing:
        _warn_once(
            "missing",
            f"peft_unlearn: FILA/VILA are disabled because this PEFT version lacks {missing} (tested with "
            f"peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}); losses, metrics and UnlearningTrainer work as usual. "
            "Install a supported peft to use init_lora_weights='fila'.",
        )
        return False
    try:
        if not _peft_version_supported():
            _warn_once(
                "version",
                f"peft_unlearn: FILA is tested with peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}; the installed "
                "version may behave differently.",
                UserWarning,
            )
    except Exception:  # noqa: BLE001 - metadata missing (e.g. a source checkout): not a reason to fail
        pass
    installed = False
    for cls, attr, wrap in targets:
        current = cls.__dict__[attr]
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
    removed = unwrap_delta_weights() > 0
    for cls, attr, _ in _targets():
        current = cls.__dict__.get(attr)
        original = getattr(current, _GUARD, None)
        if original is not None:
            setattr(cls, attr, original)
            removed = True
    return removed
