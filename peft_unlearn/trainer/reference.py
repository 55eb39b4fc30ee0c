"""The reference model of NPO and KL: the starting model, computed without a second copy when possible.

One mechanism: for a PEFT model the reference is the model with its adapters disabled
(``disable_adapter()``), which is the starting model whenever the adapter starts as a no-op on an
unmodified base: PEFT's default LoRA init (``B = 0``) and the data-driven inits of this package
(FILA, VILA cancel their initial product with a frozen offset and never touch the base). Any other
model, or a PEFT adapter that already changes the model when training starts (a trained or loaded
adapter, PiSSA-style inits that rewrite the base), needs an explicit ``ref_model``: a frozen copy of
the starting model.

Examples:
    >>> with reference_forward(peft_model) as ref:  # doctest: +SKIP
    ...     ref_logits = ref(input_ids=ids).logits
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ..fila.offset import get_offset, has_offset
from ..fila.state import is_data_driven_init, is_pending
from ..utils import is_peft_model

__all__ = ["check_reference", "reference_forward"]


def _moved_from_initial_factors(module: nn.Module, adapter: str) -> bool | None:
    """Whether a data-driven adapter's ``lora_A``/``lora_B`` differ from its frozen initial factors.

    Its output is ``s * B A - s * B0 A0``, zero exactly while ``(A, B) == (A0, B0)``. None when that cannot be
    told here (a ZeRO-3 partitioned parameter).
    """
    offset = get_offset(module, adapter)
    if offset is None:
        return None
    for param, initial in ((module.lora_A[adapter].weight, offset[0]), (module.lora_B[adapter].weight, offset[1])):
        if hasattr(param, "ds_id"):
            return None
        value = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2 DTensor
        value = value.detach()
        if value.shape != initial.shape or not torch.equal(value, initial.to(value.device, value.dtype)):
            return True
    return False


def _changing_layer(model: nn.Module, adapter_names: list[str]) -> tuple[str, bool] | None:
    """The first LoRA layer where an active adapter already changes the output, and whether it is data-driven.

    A default-init LoRA changes the output once ``lora_B`` is non-zero. A data-driven (FILA/VILA) adapter starts as
    a no-op (its initial product is cancelled by the frozen offset) and changes the output once its factors moved
    away from the initial ones (a trained adapter, or one reloaded from a raw checkpoint). A data-driven adapter
    still pending (initialised from the data when training starts) is a no-op then.
    """
    configs = getattr(model, "peft_config", {}) or {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in adapter_names:
            if adapter not in module.lora_B:
                continue
            if is_data_driven_init(getattr(configs.get(adapter), "init_lora_weights", None)) or has_offset(
                module, adapter
            ):
                if is_pending(module, adapter):
                    continue
                if _moved_from_initial_factors(module, adapter):
                    return name, True
                continue
            if bool(module.lora_B[adapter].weight.detach().ne(0).any()):
                return name, False
    return None


def check_reference(model: nn.Module, ref_model: nn.Module | None, needed_by: str | None) -> None:
    """Check that a reference model is available before training starts.

    Args:
        model: The model to train (a PeftModel or a plain model).
        ref_model: The explicit reference model, or None.
        needed_by: The option that needs the reference (e.g. ``"forget_loss='npo'"``), None if none does.

    Raises:
        ValueError: If the reference is needed, no ``ref_model`` is given, and ``model`` is not a PEFT
            model whose adapters start as a no-op on the base.
    """
    if needed_by is None or ref_model is not None:
        return
    if not is_peft_model(model):
        raise ValueError(
            f"{needed_by} needs a reference model: pass `ref_model=` (a frozen copy of the initial model) or train a "
            "PEFT adapter (`peft_config=` or a PeftModel), whose disabled-adapter model then serves as reference."
        )
    active = model.active_adapters if hasattr(model, "active_adapters") else [model.active_adapter]
    active = [active] if isinstance(active, str) else list(active)
    found = _changing_layer(model, active)
    if found is not None:
        layer, data_driven = found
        why = (
            "its lora_A/lora_B differ from the frozen initial factors A0/B0: a trained FILA/VILA adapter, e.g. one "
            "reloaded with load_adapter from a raw checkpoint; to continue that run instead, resume it with "
            "train(resume_from_checkpoint=...) on a fresh adapter"
            if data_driven
            else "non-zero lora_B: a trained or loaded adapter, or an init such as PiSSA that rewrites the base"
        )
        raise ValueError(
            f"{needed_by} uses the model with adapters disabled as the reference (the starting model), but adapter(s) "
            f"{active} already change the model at layer {layer} ({why}). Pass `ref_model=` (a frozen copy of the "
            "starting model), or start from a fresh adapter."
        )


@contextlib.contextmanager
def reference_forward(
    model: nn.Module, ref_model: nn.Module | None = None, *, unwrapped: nn.Module | None = None
) -> Iterator[nn.Module]:
    """Context manager yielding a module that computes the reference model, in eval mode, without gradients.

    With ``ref_model`` that model. Otherwise ``model`` (possibly wrapped, e.g. by DDP) with the adapters
    of ``unwrapped`` (default: ``model``) disabled. Train mode and every ``requires_grad`` flag are
    restored on exit.

    Args:
        model: The trained model, as called in the training step.
        ref_model: An explicit reference model.
        unwrapped: The PeftModel inside ``model`` (``accelerator.unwrap_model(model)``).

    Raises:
        ValueError: Without ``ref_model`` when the model is not a PEFT model.
    """
    if ref_model is not None:
        with torch.no_grad():
            yield ref_model
        return
    unwrapped = model if unwrapped is None else unwrapped
    if not is_peft_model(unwrapped):
        raise ValueError("No reference model: pass `ref_model=` or train a PEFT adapter.")
    flags = [(p, p.requires_grad) for p in unwrapped.parameters()]
    was_training = unwrapped.training
    unwrapped.eval()
    try:
        with unwrapped.disable_adapter(), torch.no_grad():
            yield model
    finally:
        unwrapped.train(was_training)
        for param, flag in flags:
            param.requires_grad_(flag)
