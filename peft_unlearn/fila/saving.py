"""Saving data-driven adapters (FILA, VILA): the portable rank-2r plain LoRA and the raw format.

A trained adapter acts as ``W + s * B A - s * B0 A0`` (``A0``, ``B0``: the frozen initial factors,
`peft_unlearn.fila.offset`). On the original base ``W`` that is the plain LoRA

    A' = [A ; A0]   (2r x in)        B' = [B | -B0]   (out x 2r)
    r' = 2r,  lora_alpha' = 2 * alpha  (sqrt(2) * alpha with rslora),  rank/alpha patterns doubled

with the same scaling (the conversion PEFT itself applies to PiSSA adapters). This is what
``PeftModel.save_pretrained`` / ``push_to_hub`` write for such models after ``import peft_unlearn``
(`export_portable_adapter`); stock PEFT loads it with ``init_lora_weights=true``, on any base it
supports (also a quantized copy of the same base).

The raw format (``save_pretrained(..., fila_portable=False)``, used for Trainer checkpoints) is the
rank-r adapter whose config keeps ``"fila"`` (stock PEFT refuses it loudly) plus ``_fila_init/``
(`save_fila_state`): ``A0``/``B0`` per layer in ``fila_init.safetensors`` and ``fila_meta.json``
(adapter, rank, scaling, dtypes). A fresh process re-attaches the offset with `restore_fila_state`;
the base model is never involved.

``merge_and_unload()`` gives ``W + s * B A - s * B0 A0``, the unlearned model; ``unload()`` gives the
original model.

Examples:
    >>> model.save_pretrained("out")                         # portable plain LoRA  # doctest: +SKIP
    >>> model.save_pretrained("ckpt", fila_portable=False)   # raw + _fila_init/    # doctest: +SKIP
    >>> restore_fila_state(fresh_model, "ckpt")              # re-attach A0/B0       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..save_policy import FILA_OVERWRITE_SWITCH, policy_write, remove_if_ours
from .config import get_fila_config
from .offset import get_offset, set_offset
from .state import (
    adapter_lora_config,
    clear_pending,
    data_driven_adapters,
    dense_weight,
    init_name,
    is_data_driven_init,
    is_pending,
    iter_lora_layers,
    normalize_module_name,
)

__all__ = [
    "INIT_DIR",
    "RAW_NOTE",
    "check_not_a_resumable_checkpoint",
    "export_portable_adapter",
    "fila_adapters",
    "has_data_driven_adapter",
    "is_fila_model",
    "load_fila_state",
    "pending_data_driven_adapters",
    "pending_fila_adapters",
    "portable_lora_config",
    "restore_fila_residual",
    "restore_fila_state",
    "save_fila_state",
]

#: Folder (inside a save directory) holding A0/B0; the leading underscore keeps it out of Hub pushes.
INIT_DIR = "_fila_init"
#: Note written next to a raw adapter: stock PEFT cannot read the raw format (it fails with "Unknown initialization
#: init_lora_weights='fila'" and reads no hint from the folder), so the folder says how to load or export it.
RAW_NOTE = "HOW_TO_LOAD.txt"
_RAW_NOTE_TEXT = """\
This folder holds a RAW peft_unlearn adapter (init_lora_weights="{init}"), e.g. a trainer checkpoint for
resume_from_checkpoint. Stock PEFT cannot load it: PeftModel.from_pretrained fails with
"Unknown initialization init_lora_weights='{init}'". The adapter acts as W + s*B*A - s*B0*A0, and the
frozen initial factors A0/B0 are stored in {init_dir}/.

Load it (pip install peft_unlearn), on the original base model:

    from peft_unlearn.models import load_adapter
    model = load_adapter(base_model, "path/to/this/folder")

Export the portable adapter (a plain rank-2r LoRA that stock PEFT loads without peft_unlearn) into
another folder:

    model.save_pretrained("path/to/portable")

Evaluate it directly: peft-unlearn eval --adapter path/to/this/folder ...
"""
_TENSORS_FILE = "fila_init.safetensors"
_META_FILE = "fila_meta.json"
_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 also stored base-weight fingerprints, which are no longer needed
_TRAINER_STATE = "trainer_state.json"  # written by `Trainer` into every checkpoint folder
# The base check of a raw checkpoint: each target's base weight times a fixed random probe vector (float64) is stored
# next to A0/B0; on restore, a weight whose probe product moved by more than this fraction of its norm is another
# base. (A dtype cast, e.g. fp32 -> bf16, moves it by well under 1%; another model by ~100%.)
_PROBE_SEED = 20240813
_BASE_TOLERANCE = 0.02


def has_data_driven_adapter(model: nn.Module) -> bool:
    """Return True if the model has at least one data-driven adapter (pending or initialised).

    Examples:
        >>> has_data_driven_adapter(torch.nn.Linear(2, 2))
        False
    """
    return bool(data_driven_adapters(model))


def pending_data_driven_adapters(model: nn.Module) -> list[str]:
    """Data-driven adapters (FILA, VILA, RILA) whose weights are not computed yet.

    An adapter counts as pending if any of its layers is flagged pending (fresh ``get_peft_model``, or
    a raw checkpoint loaded without `restore_fila_state`), or if none of its layers carries the
    frozen initial factors.

    Args:
        model: A PeftModel.

    Returns:
        Sorted list of adapter names (empty if nothing is pending or the model has no such adapter).

    Examples:
        >>> pending_data_driven_adapters(torch.nn.Linear(2, 2))
        []
    """
    result = []
    for adapter_name in data_driven_adapters(model):
        layers = iter_lora_layers(model, adapter_name)
        if any(is_pending(layer, adapter_name) for _, layer in layers) or not any(
            get_offset(layer, adapter_name) is not None for _, layer in layers
        ):
            result.append(adapter_name)
    return sorted(result)


def _deprecated(old: str, new: Any) -> Any:
    def alias(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"{old} is deprecated; use {new.__name__}.", DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated alias of `{new.__name__}` (the data-driven inits are not only FILA)."
    return alias


is_fila_model = _deprecated("is_fila_model", has_data_driven_adapter)
pending_fila_adapters = _deprecated("pending_fila_adapters", pending_data_driven_adapters)
fila_adapters = _deprecated("fila_adapters", data_driven_adapters)


def _require_initialized(model: nn.Module, adapter_names: Sequence[str]) -> None:
    pending = [a for a in pending_data_driven_adapters(model) if a in adapter_names]
    if pending:
        raise ValueError(
            f"Data-driven adapter(s) {pending} are not initialised yet (they still hold PEFT's default init), so "
            "saving them would publish a wrong adapter: call peft_unlearn.fila.initialize_adapter_weights(model, "
            "forget_dataloader, retain_dataloader) first, or restore_fila_state() after loading a raw checkpoint."
        )


def _init_states(model: nn.Module, adapter_name: str) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    states = {}
    for name, layer in iter_lora_layers(model, adapter_name):
        state = get_offset(layer, adapter_name)
        if state is None:
            raise ValueError(
                f"Layer {name} of adapter {adapter_name!r} has no stored initial factors A0/B0; it was not "
                "initialised by initialize_adapter_weights/restore_fila_state."
            )
        states[name] = (layer, state[0], state[1])
    return states


def check_not_a_resumable_checkpoint(directory: str | os.PathLike) -> None:
    """Refuse a portable save into a resumable raw checkpoint (a `Trainer` checkpoint holding ``_fila_init/``).

    The portable rank-2r adapter would replace the checkpoint's raw rank-r adapter and its ``_fila_init/`` would
    be removed as stale, so ``resume_from_checkpoint`` on that folder would fail afterwards.

    Args:
        directory: The folder a portable save is about to write into.

    Raises:
        SaveConflictError: If `directory` holds ``trainer_state.json`` and ``_fila_init/``; nothing is written.
    """
    from ..save_policy import SaveConflictError

    root = Path(directory)
    if (root / _TRAINER_STATE).is_file() and (root / INIT_DIR).is_dir():
        raise SaveConflictError(
            f"Refusing to save the portable adapter into {str(root)!r}: it is a resumable trainer checkpoint (it holds "
            f"{_TRAINER_STATE} and {INIT_DIR}/), and the portable rank-2r adapter would replace its raw adapter and "
            f"remove {INIT_DIR}/, so resume_from_checkpoint on it would fail. Save to another folder (e.g. "
            f"{str(root.parent / 'final')!r}), or pass fila_portable=False to rewrite the raw checkpoint."
        )


# ----------------------------------------------------------------------------------------------------------------
# portable export
# ----------------------------------------------------------------------------------------------------------------


def portable_lora_config(config: Any) -> Any:
    """Return the plain ``LoraConfig`` of the portable rank-2r adapter for a data-driven adapter config.

    ``init_lora_weights=True``, ``r`` and ``lora_alpha`` doubled (``sqrt(2) * alpha`` with rslora), rank and
    alpha patterns doubled, ``fila_config`` dropped, ``inference_mode=True``.

    Args:
        config: The FILA adapter's ``LoraConfig`` / ``FilaLoraConfig``.

    Returns:
        A new ``peft.LoraConfig``.
    """
    from peft import LoraConfig

    values = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init and hasattr(config, f.name)
    }
    values = {k: (v.copy() if isinstance(v, (dict, list, set)) else v) for k, v in values.items()}
    values["init_lora_weights"] = True
    values["r"] = 2 * config.r
    values["lora_alpha"] = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    values["rank_pattern"] = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    values["alpha_pattern"] = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    values["inference_mode"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        portable = LoraConfig(**values)
    for attr in ("base_model_name_or_path", "revision", "task_type", "peft_type"):
        if hasattr(config, attr):
            setattr(portable, attr, getattr(config, attr))
    return portable


def _auto_mapping(model: nn.Module, config: Any) -> dict[str, str] | None:
    if config.task_type is not None or not hasattr(model, "_get_base_model_class"):
        return None
    base_cls = model._get_base_model_class(is_prompt_tuning=False)
    return {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}


def _embedding_prefixes(peft_model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes (``"<module name>."``) of the model's input and output embedding layers."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        with contextlib.suppress(AttributeError, NotImplementedError):
            layer = getattr(peft_model, getter)()
            if layer is not None:
                layers.append(layer)
    if not layers:
        return ()
    prefixes = []
    for name, module in peft_model.named_modules():
        if any(module is layer or getattr(module, "base_layer", None) is layer for layer in layers):
            prefixes.append(f"{name}.")
    return tuple(prefixes)


def export_portable_adapter(
    peft_model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    safe_serialization: bool = True,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    save_embedding_layers: str | bool = "auto",
    overwrite_output: bool = False,
) -> Path:
    """Write a FILA/VILA adapter as a plain rank-2r LoRA that stock PEFT loads onto the original base.

    ``W + s * [B | -B0] [A ; A0] = W + s * B A - s * B0 A0``: the trained model.

    Args:
        peft_model: A PeftModel with an initialised FILA adapter.
        save_directory: Folder for ``adapter_config.json`` and ``adapter_model.safetensors`` (``.bin``
            when ``safe_serialization=False``).
        adapter_name: The FILA adapter to export.
        safe_serialization: Use safetensors.
        is_main_process: Only the main process writes (DDP).
        state_dict: Optional full state dict to take the trained weights from (as PEFT's ``save_pretrained``).
        save_embedding_layers: Passed to ``get_peft_model_state_dict`` (``"auto"``: ``True`` when an embedding layer
            such as ``lm_head`` is among the targets, as PEFT does). The embedding weights it adds are the base
            weights (never changed by a data-driven adapter) and are written as they are.
        overwrite_output: Allow replacing files in `save_directory` that peft_unlearn did not write (see
            [`peft_unlearn.save_policy`][peft_unlearn.save_policy]); without it such a save raises
            `SaveConflictError` and writes nothing.

    Returns:
        The directory written.

    Examples:
        >>> export_portable_adapter(model, "portable")  # doctest: +SKIP
        >>> PeftModel.from_pretrained(original_base, "portable")  # stock PEFT, no peft_unlearn  # doctest: +SKIP
    """
    from peft.utils import get_peft_model_state_dict
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    config = adapter_lora_config(peft_model, adapter_name)
    if not is_data_driven_init(config.init_lora_weights):
        raise ValueError(
            f"Adapter {adapter_name!r} is not a FILA/VILA adapter (init_lora_weights={config.init_lora_weights!r}); save it "
            "with save_pretrained."
        )
    _require_initialized(peft_model, [adapter_name])
    states = _init_states(peft_model, adapter_name)
    trained = get_peft_model_state_dict(
        peft_model, state_dict=state_dict, adapter_name=adapter_name, save_embedding_layers=save_embedding_layers
    )
    embedding_prefixes = _embedding_prefixes(peft_model)
    converted: dict[str, torch.Tensor] = {}
    seen = set()
    for key, value in trained.items():
        if ".lora_" not in key and key.startswith(embedding_prefixes):
            # the full embedding / lm_head weight that PEFT saves when an embedding layer is targeted
            # (`save_embedding_layers`): the base weight, which a data-driven adapter never changes; kept as is
            converted[key] = value.detach()
            continue
        for part, dim in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                name = normalize_module_name(key[: -len(part)])
                if name not in states:
                    raise ValueError(f"No FILA initial state for the adapter tensor {key!r}.")
                _, lora_a0, lora_b0 = states[name]
                initial = lora_a0 if dim == 0 else -lora_b0
                converted[key] = torch.cat(
                    [value.detach(), initial.to(device=value.device, dtype=value.dtype)], dim=dim
                )
                seen.add((name, dim))
                break
        else:
            raise ValueError(
                f"The FILA adapter {adapter_name!r} holds the tensor {key!r}, which the portable rank-2r conversion "
                "cannot represent (only lora_A/lora_B are supported)."
            )
    missing = sorted(name for name in states if (name, 0) not in seen or (name, 1) not in seen)
    if missing:
        raise ValueError(f"The adapter state dict lacks lora_A/lora_B of {missing[:3]}; cannot convert.")

    out = Path(save_directory)
    if not is_main_process:
        return out
    converted = {k: v.to("cpu").contiguous() for k, v in converted.items()}
    portable = portable_lora_config(config)
    if portable.base_model_name_or_path is None:
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else None
        portable.base_model_name_or_path = getattr(base, "name_or_path", None) or None

    def write(folder: Path) -> None:
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(converted, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            torch.save(converted, folder / WEIGHTS_NAME)
        portable.save_pretrained(str(folder), auto_mapping_dict=_auto_mapping(peft_model, config))

    # the save policy: never overwrite a file peft_unlearn did not write (peft_unlearn.save_policy)
    policy_write(out, write, overwrite=overwrite_output, switch=FILA_OVERWRITE_SWITCH)
    return out


# ----------------------------------------------------------------------------------------------------------------
# raw format: _fila_init/
# ----------------------------------------------------------------------------------------------------------------


def _base_probe(layer: nn.Module) -> torch.Tensor | None:
    """The target's base weight (dense, ``[out, in]``) times a fixed random probe, in float64 on the CPU.

    None when the weight cannot be read here (e.g. on the meta device).
    """
    from peft.utils.integrations import gather_params_ctx

    base = layer.get_base_layer()
    if getattr(getattr(base, "weight", None), "is_meta", False):
        return None
    with gather_params_ctx(base.weight, modifier_rank=None), torch.no_grad():  # read-only gather under ZeRO-3
        weight = dense_weight(base)
        generator = torch.Generator().manual_seed(_PROBE_SEED)
        probe = torch.randn(weight.shape[1], generator=generator, dtype=torch.float64)
        return weight.to("cpu", torch.float64) @ probe


def _check_same_base(
    name: str, layer: nn.Module, stored: torch.Tensor, directory: str | os.PathLike, base_name: Any
) -> None:
    current = _base_probe(layer)
    if current is None:
        return
    if current.shape != stored.shape:
        raise ValueError(
            f"Layer {name}: the base weight has {current.shape[0]} output features but the checkpoint {str(directory)!r} "
            f"was trained on one with {stored.shape[0]}; load the base model it was trained from"
            f"{f' ({base_name!r})' if base_name else ''}."
        )
    distance = float((current - stored.to(torch.float64)).norm() / stored.to(torch.float64).norm().clamp_min(1e-30))
    if distance > _BASE_TOLERANCE:
        raise ValueError(
            f"Layer {name}: the base weight differs from the one the raw checkpoint {str(directory)!r} was trained on "
            f"(relative distance {distance:.3g} of their fingerprints, tolerance {_BASE_TOLERANCE}), so its frozen A0/B0 "
            "would not reproduce the trained model. Load the base model the checkpoint was trained from"
            f"{f' ({base_name!r})' if base_name else ''}; to attach it anyway, call restore_fila_state(..., "
            "check_base=False) yourself."
        )


def save_fila_state(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_names: Sequence[str] | None = None,
    *,
    overwrite_output: bool = False,
) -> Path:
    """Write ``directory/_fila_init/`` with the frozen initial factors of the data-driven adapters.

    Holds, per adapter and layer, ``A0``/``B0`` (exactly the values the adapter was initialised with) and a
    fingerprint of the base weight (the weight times a fixed random probe vector), which `restore_fila_state`
    checks so that a checkpoint is not resumed on another base; ``fila_meta.json`` records the init, rank,
    scaling, shapes, dtypes and the base model's name.

    Args:
        model: A PeftModel with initialised FILA/VILA adapter(s).
        directory: The checkpoint / save folder.
        adapter_names: Adapters to store (default: every data-driven adapter).

    Returns:
        The ``_fila_init`` folder.
    """
    from safetensors.torch import save_file

    names = list(adapter_names) if adapter_names is not None else data_driven_adapters(model)
    if not names:
        raise ValueError("The model has no FILA/VILA adapter (init_lora_weights='fila'/'vila'); nothing to store.")
    _require_initialized(model, names)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format_version": _FORMAT_VERSION, "adapters": {}}
    for adapter in names:
        config = model.peft_config[adapter]
        layers_meta = {}
        for name, (layer, lora_a0, lora_b0) in _init_states(model, adapter).items():
            key = f"{adapter}::{name}"
            tensors[f"{key}::A0"] = lora_a0.detach().to("cpu").contiguous()
            tensors[f"{key}::B0"] = lora_b0.detach().to("cpu").contiguous()
            probe = _base_probe(layer)
            if probe is not None:  # checked by restore_fila_state: the checkpoint belongs to this base
                tensors[f"{key}::base_probe"] = probe
            layers_meta[name] = {
                "r": int(layer.r[adapter]),
                "scaling": float(layer.scaling[adapter]),
                "shape": [int(lora_b0.shape[0]), int(lora_a0.shape[1])],
                "lora_dtype": str(lora_a0.dtype).removeprefix("torch."),
            }
        meta["adapters"][adapter] = {
            "base_model_name_or_path": getattr(config, "base_model_name_or_path", None),
            "init_lora_weights": init_name(config.init_lora_weights),
            "r": int(config.r),
            "lora_alpha": config.lora_alpha,
            "use_rslora": bool(config.use_rslora),
            "fila_config": get_fila_config(config).to_dict(),
            "layers": layers_meta,
        }

    def write(root: Path) -> None:
        folder = root / INIT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            tensors, str(folder / _TENSORS_FILE), metadata={"format": f"peft_unlearn.fila_init/{_FORMAT_VERSION}"}
        )
        (folder / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    # the save policy: a `_fila_init/` that peft_unlearn did not write is never replaced (peft_unlearn.save_policy)
    policy_write(Path(directory), write, overwrite=overwrite_output, switch=FILA_OVERWRITE_SWITCH)
    return Path(directory) / INIT_DIR


def load_fila_state(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``directory/_fila_init`` (or the ``_fila_init`` folder itself).

    Returns:
        ``(meta, tensors)`` as written by `save_fila_state`.

    Raises:
        FileNotFoundError: If the folder holds no FILA state.
        ValueError: For an unknown format version.
    """
    from safetensors.torch import load_file

    folder = Path(directory)
    if folder.name != INIT_DIR:
        folder = folder / INIT_DIR
    if not (folder / _META_FILE).is_file() or not (folder / _TENSORS_FILE).is_file():
        raise FileNotFoundError(
            f"No FILA initial state in {folder} (expected {_META_FILE} and {_TENSORS_FILE}); it is written by "
            "save_pretrained(..., fila_portable=False) / save_fila_state()."
        )
    meta = json.loads((folder / _META_FILE).read_text())
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise ValueError(
            f"Unsupported FILA state format {meta.get('format_version')!r} in {folder}; this version of "
            f"peft_unlearn reads {list(_READABLE_VERSIONS)}."
        )
    return meta, load_file(str(folder / _TENSORS_FILE))


@torch.no_grad()
def restore_fila_state(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_names: Sequence[str] | None = None,
    *,
    check_base: bool = True,
) -> dict[str, int]:
    """Re-attach the frozen initial factors stored in ``directory/_fila_init`` (resume in a new process).

    Given a PeftModel on the original base with the checkpoint's LoRA config (a fresh
    ``get_peft_model(base, LoraConfig(init_lora_weights="fila", ...))``, or ``PeftModel.from_pretrained``
    of the raw checkpoint), attach each layer's ``A0``/``B0`` so that the adapter acts as
    ``s * B A - s * B0 A0`` again. Neither the base nor the adapter weights are touched (load the
    checkpoint with ``load_adapter`` before or after); calling it twice is harmless. The pending flags
    are cleared.

    Args:
        model: The PeftModel.
        directory: A folder containing ``_fila_init/`` (e.g. a Trainer checkpoint).
        adapter_names: Restore only these adapters (default: all stored ones).
        check_base: Refuse a base whose target weights differ from those the checkpoint was trained on (their
            stored fingerprints; checkpoints written before the fingerprints were stored are not checked).

    Returns:
        ``{"restored": layers whose initial factors were attached}``.

    Raises:
        ValueError: If an adapter/layer is missing, ranks, scalings or shapes differ, or (with `check_base`) the
            base model is not the one the checkpoint was trained on.
    """
    if not isinstance(check_base, bool):
        raise TypeError(f"`check_base` must be a bool, got {check_base!r}.")
    meta, tensors = load_fila_state(directory)
    stored = meta["adapters"]
    names = list(adapter_names) if adapter_names is not None else list(stored)
    configs = getattr(model, "peft_config", None) or {}
    restored = 0
    for adapter in names:
        if adapter not in stored:
            raise ValueError(f"Adapter {adapter!r} is not stored in {directory}; stored: {sorted(stored)}.")
        if adapter not in configs:
            raise ValueError(
                f"The model has no adapter {adapter!r}; create it with the checkpoint's LoRA config first (stored: "
                f"{sorted(stored)}, model: {sorted(configs)})."
            )
        layers = dict(iter_lora_layers(model, adapter))
        layer_meta = stored[adapter]["layers"]
        missing = sorted(set(layer_meta) - set(layers))
        extra = sorted(set(layers) - set(layer_meta))
        if missing or extra:
            raise ValueError(
                f"Adapter {adapter!r} targets other layers than the stored FILA state: missing {missing[:3]}, "
                f"unexpected {extra[:3]}. Use the same LoRA config as the checkpoint."
            )
        if check_base:  # every layer is checked before any is attached: a refusal leaves the model as it was
            base_name = stored[adapter].get("base_model_name_or_path")
            for name in layer_meta:
                stored_probe = tensors.get(f"{adapter}::{name}::base_probe")
                if stored_probe is not None:
                    _check_same_base(name, layers[name], stored_probe, directory, base_name)
        for name, info in layer_meta.items():
            layer = layers[name]
            if int(layer.r[adapter]) != info["r"] or not torch.isclose(
                torch.tensor(float(layer.scaling[adapter])), torch.tensor(info["scaling"])
            ):
                raise ValueError(
                    f"Layer {name}: rank/scaling ({layer.r[adapter]}, {layer.scaling[adapter]}) differ from the stored "
                    f"({info['r']}, {info['scaling']}); use the checkpoint's r/lora_alpha."
                )
            key = f"{adapter}::{name}"
            set_offset(layer, adapter, tensors[f"{key}::A0"], tensors[f"{key}::B0"])  # checks the shapes
            clear_pending(layer, adapter)
            restored += 1
        if configs[adapter].init_lora_weights is True:
            configs[adapter].init_lora_weights = stored[adapter].get("init_lora_weights") or "fila"
    return {"restored": restored}


def restore_fila_residual(
    model: nn.Module, directory: str | os.PathLike, adapter_names: Sequence[str] | None = None
) -> dict[str, int]:
    """Deprecated alias of `restore_fila_state` (the base is no longer rewritten to a residual)."""
    warnings.warn(
        "restore_fila_residual is deprecated: FILA no longer rewrites the base weights; use restore_fila_state.",
        DeprecationWarning,
        stacklevel=2,
    )
    return restore_fila_state(model, directory, adapter_names)


# ----------------------------------------------------------------------------------------------------------------
# the patched save_pretrained
# ----------------------------------------------------------------------------------------------------------------


def fila_save_pretrained(
    model: nn.Module,
    original: Any,
    save_directory: str | os.PathLike,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    save_embedding_layers: str | bool = "auto",
    is_main_process: bool = True,
    path_initial_model_for_weight_conversion: str | None = None,
    *,
    fila_portable: bool = True,
    overwrite_output: bool = False,
    **kwargs: Any,
) -> None:
    """``PeftModel.save_pretrained`` for models with a FILA/VILA adapter (installed by `register_fila`).

    * ``fila_portable=True`` (default): every selected data-driven adapter is written as the portable
      rank-2r plain LoRA (`export_portable_adapter`); a stale ``_fila_init/`` in the folder is removed if
      peft_unlearn wrote it (a folder with other files is left in place, with a warning). A resumable trainer
      checkpoint (``trainer_state.json`` plus ``_fila_init/``) is refused (`check_not_a_resumable_checkpoint`).
    * ``fila_portable=False``: the raw rank-r adapter (config keeps ``"fila"``) plus ``_fila_init/`` and
      ``HOW_TO_LOAD.txt`` (how to load it with peft_unlearn and export the portable adapter: stock PEFT cannot
      read the raw format).
    * Other selected adapters (all adapters when ``selected_adapters=None``) are saved by PEFT as they
      are: they act on the unmodified base, so they are valid on the original model.
    * ``path_initial_model_for_weight_conversion`` given: PEFT's own conversion runs unchanged.
    * The [save policy][peft_unlearn.save_policy] applies: files in `save_directory` that peft_unlearn did
      not write are not overwritten (`SaveConflictError`, nothing written) unless ``overwrite_output=True``;
      a user's README.md is kept.
    """
    if not isinstance(fila_portable, bool):
        raise TypeError(f"`fila_portable` must be a bool, got {fila_portable!r}.")
    if not isinstance(overwrite_output, bool):
        raise TypeError(f"`overwrite_output` must be a bool, got {overwrite_output!r}.")
    passthrough = {
        "safe_serialization": safe_serialization,
        "save_embedding_layers": save_embedding_layers,
        "is_main_process": is_main_process,
        **kwargs,
    }
    fila_names = data_driven_adapters(model)
    selected = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [a for a in selected if a not in model.peft_config]
    if unknown:
        raise ValueError(
            f"`selected_adapters` contains unknown adapters {unknown}; the model has {sorted(model.peft_config)}."
        )
    fila_selected = [a for a in selected if a in fila_names]
    plain_selected = [a for a in selected if a not in fila_names]
    _require_initialized(model, fila_selected)

    if path_initial_model_for_weight_conversion is not None:
        original(
            model,
            save_directory,
            selected_adapters=selected,
            path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
            **passthrough,
        )
        return
    root = Path(save_directory)
    if root.is_file():
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    if is_main_process and fila_selected and fila_portable:
        check_not_a_resumable_checkpoint(root)  # the portable save would break resume_from_checkpoint there

    def write(folder: Path) -> None:
        if plain_selected:
            original(model, str(folder), selected_adapters=plain_selected, **passthrough)
        if not fila_selected:
            return
        if not fila_portable:
            original(model, str(folder), selected_adapters=fila_selected, **passthrough)
            if is_main_process:
                save_fila_state(model, folder, fila_selected)
                init = init_name(model.peft_config[fila_selected[0]].init_lora_weights) or "fila"
                (folder / RAW_NOTE).write_text(_RAW_NOTE_TEXT.format(init=init, init_dir=INIT_DIR), encoding="utf-8")
            return
        for adapter in fila_selected:
            export_portable_adapter(
                model,
                folder if adapter == "default" else folder / adapter,
                adapter,
                safe_serialization=safe_serialization,
                is_main_process=is_main_process,
                state_dict=kwargs.get("state_dict"),
                save_embedding_layers=save_embedding_layers,
            )
        if is_main_process and hasattr(model, "create_or_update_model_card"):
            model.create_or_update_model_card(str(folder))

    # the save policy (peft_unlearn.save_policy): staged, checked against the folder's files, then moved
    policy_write(
        root, write, is_main_process=is_main_process, overwrite=overwrite_output, switch=FILA_OVERWRITE_SWITCH
    )
    if is_main_process and fila_selected and fila_portable:
        remove_if_ours(root, INIT_DIR)  # a raw save's stale initial factors; never a folder we did not write
        remove_if_ours(root, RAW_NOTE)
