"""FILA: Fisher-weighted initialisation of LoRA layers (paper-notes section 3.2-3.3).

For one layer with weight ``W`` [out, in], relative importance ``F_hat`` [out, in], rank ``r`` and
LoRA scaling ``s``:

1. row weights ``w_i = sqrt(sum_j F_hat_ij)`` (optionally floored),
2. truncated SVD of the row-weighted weight ``diag(w) W ~= U diag(S) V^T`` (rank r, fp32; seeded
   randomized SVD or exact SVD),
3. ``S <- S / s``,
4. ``A0 = (V diag(sqrt S))^T`` [r, in], ``B0 = diag(1 / (w + eps)) U diag(sqrt S)`` [out, r]
   (evaluated as ``diag(w / (w + eps)) W V diag(1 / sqrt(S s))``, the same for an exact SVD, so that
   rows with ``w ~ 0`` do not get rounding noise amplified by ``1 / eps``),
5. the trainable factors start at ``c * A0``, ``c * B0`` (``FilaConfig.factor_scale``; ``c = 1`` is the
   paper),
6. residual base ``W_res = W - s * B_init @ A_init`` of those initial factors (fp32 product of the adapter-dtype factors, cast to the
   base dtype), so ``W_res + s * B0 A0 = W`` and the model output is unchanged at init.

``s * B0 A0 = diag(1/(w+eps)) U_r S_r V_r^T`` is the minimiser of ``||diag(w) (W - M)||_F`` over
rank-r ``M`` (when eps is negligible): the forget-important principal directions start inside the
adapter.

Entry points:

* :func:`fila_init_layer`: the pure per-layer computation (testable alone).
* :func:`initialize_fila_weights`: estimate the Fisher information of a PeftModel (or take given
  statistics) and initialise every layer of a FILA adapter, one layer at a time.
* :func:`preprocess_fila`: the LoRA-GA-style alternative; attach statistics to a plain model so that
  ``get_peft_model`` initialises FILA layers directly.

Examples:
    >>> import peft_unlearn
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights="fila"))  # doctest: +SKIP
    >>> stats = initialize_fila_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import FILA_INIT_NAME, FilaConfig, get_fila_config, validate_fila_lora_config
from .fisher import FisherStatistics, estimate_fisher, resolve_fisher_targets
from .registration import (
    IMPORTANCE_ATTR,
    _check_fila_target,
    clear_pending,
    get_init_state,
    is_fila_init,
    is_pending,
    iter_lora_layers,
    set_init_state,
)

__all__ = [
    "add_fila_reference_adapter",
    "fila_init_layer",
    "initialize_fila_weights",
    "preprocess_fila",
    "residual_weight",
    "resolve_factor_scale",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# the pure per-layer computation
# ----------------------------------------------------------------------------------------------------------------


def _use_exact_svd(rank: int, shape: tuple[int, int], config: FilaConfig) -> bool:
    if config.exact_svd is True:
        return True
    if config.exact_svd is False:
        return False
    small = min(shape)
    return small <= config.exact_svd_max_dim or rank > small // 2


def _truncated_svd(
    matrix: torch.Tensor, rank: int, config: FilaConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD ``matrix ~= U diag(S) V^T`` in fp32; returns ``U [m, r], S [r], V [n, r]``."""
    if _use_exact_svd(rank, tuple(matrix.shape), config):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].mT
    device = matrix.device
    work = matrix if device.type in ("cpu", "cuda") else matrix.cpu()
    fork_devices = [work.device] if work.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        if work.device.type == "cuda":
            with torch.cuda.device(work.device):
                torch.cuda.manual_seed(config.seed)
        else:
            torch.default_generator.manual_seed(config.seed)
        u, s, v = torch.svd_lowrank(work, q=rank, niter=config.niter)
    return u.to(device), s.to(device), v.to(device)


def fila_init_layer(
    weight: torch.Tensor,
    importance: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    config: FilaConfig | None = None,
    lora_dtype: torch.dtype | None = None,
    layer_name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute the FILA factors and the residual weight of one layer.

    Args:
        weight: Base weight ``W`` in ``nn.Linear`` layout ``[out, in]`` (transpose Conv1D weights first),
            any float dtype.
        importance: Relative Fisher importance ``F_hat`` ``[out, in]`` (non-negative).
        rank: LoRA rank ``r``, ``1 <= r <= min(out, in)``.
        scaling: LoRA scaling ``s`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rslora).
        config: :class:`FilaConfig` (seed, niter, eps, floor, SVD choice); defaults if None.
        lora_dtype: dtype of the returned factors (the adapter dtype); default fp32. The residual is
            computed from the factors *after* this cast, so ``W_res + s * B0 @ A0`` reproduces ``W``.
        layer_name: Used in warnings and errors.

    Returns:
        ``(A0 [r, in], B0 [out, r], W_res [out, in])``; the factors in ``lora_dtype``, ``W_res`` in
        ``weight.dtype``, all on ``weight``'s device.

    Examples:
        >>> import torch
        >>> W, F = torch.randn(6, 4), torch.rand(6, 4)
        >>> A0, B0, W_res = fila_init_layer(W, F, rank=2, scaling=2.0)
        >>> torch.allclose(W_res + 2.0 * B0 @ A0, W, atol=1e-5)
        True
    """
    config = config or FilaConfig()
    if weight.dim() != 2:
        raise ValueError(f"`weight` of {layer_name} must be 2-D [out, in], got shape {tuple(weight.shape)}.")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`weight` of {layer_name} must be a float tensor, got dtype {weight.dtype}.")
    out_features, in_features = weight.shape
    if tuple(importance.shape) != (out_features, in_features):
        raise ValueError(
            f"`importance` of {layer_name} has shape {tuple(importance.shape)}, expected {(out_features, in_features)} "
            "([out, in], nn.Linear layout; transpose Conv1D statistics)."
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"`rank` of {layer_name} must be an integer in [1, min(out, in)] = [1, {min(out_features, in_features)}], "
            f"got {rank!r}; lower `r` (or use rank_pattern) for this layer."
        )
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"`scaling` of {layer_name} must be a positive finite number, got {scaling!r}.")
    lora_dtype = lora_dtype or torch.float32

    work = torch.float64 if weight.dtype == torch.float64 else torch.float32  # fp32 math (fp64 stays fp64)
    w_mat = weight.detach().to(work)
    imp = importance.detach().to(device=w_mat.device, dtype=work)
    if not torch.isfinite(imp).all():
        raise ValueError(f"The Fisher importance of {layer_name} contains NaN/inf; recompute the Fisher statistics.")
    row_w = imp.clamp_min(0).sum(dim=1).sqrt()
    del imp
    top = row_w.max()
    if not top > 0:
        warnings.warn(
            f"FILA: every Fisher row weight of {layer_name} is zero (no forget signal reaches this layer); using "
            "uniform row weights (plain PiSSA) for it.",
            stacklevel=2,
        )
        row_w = torch.ones_like(row_w)
    elif config.row_weight_floor is not None:
        row_w = row_w.clamp_min(config.row_weight_floor * top)

    _, s, v = _truncated_svd(row_w[:, None] * w_mat, rank, config)
    s = s.clamp_min(0)
    lora_a = (v * (s / scaling).sqrt()).mT
    # B0 = diag(1/(w+eps)) U diag(sqrt(S/s)) with U = diag(w) W V diag(1/S), i.e. diag(w/(w+eps)) W V diag(1/sqrt(S s)):
    # identical for an exact SVD, but rows with w ~ 0 get exactly their (tiny) share instead of U's rounding noise
    # divided by eps. Directions with S = 0 carry nothing (their A0 row is 0).
    tiny = s.max() * torch.finfo(work).eps * max(w_mat.shape)
    inv_root = torch.where(s > tiny, (s * scaling).clamp_min(torch.finfo(work).tiny).rsqrt(), 0.0)
    lora_b = (row_w / (row_w + config.eps))[:, None] * (w_mat @ v) * inv_root
    factor = resolve_factor_scale(config.factor_scale, lora_a, lora_b)
    lora_a = (factor * lora_a).contiguous().to(lora_dtype)
    lora_b = (factor * lora_b).contiguous().to(lora_dtype)
    return lora_a, lora_b, residual_weight(weight, lora_a, lora_b, scaling)


def resolve_factor_scale(factor_scale: str | float, lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    """The scale ``c`` of the trainable factors for ``FilaConfig.factor_scale`` (see its docstring).

    ``"paper"`` is 1; ``"stable"`` is ``sqrt(out * r / 3) / (sqrt(out) * ||A0||_F + sqrt(in) * ||B0||_F)``,
    which makes the first Adam step's ``||s * delta(B A)||_F`` about that of a default LoRA (``B = 0``,
    kaiming-uniform ``A``) at the same learning rate; a number is returned as it is.

    Args:
        factor_scale: ``"paper"``, ``"stable"`` or a positive number.
        lora_a: ``A0`` ``[r, in]``.
        lora_b: ``B0`` ``[out, r]``.

    Returns:
        ``c`` as a Python float (1.0 for a zero layer under ``"stable"``).

    Examples:
        >>> resolve_factor_scale("paper", torch.ones(2, 3), torch.ones(4, 2))
        1.0
        >>> round(resolve_factor_scale("stable", torch.ones(2, 3), torch.ones(4, 2)), 4)
        0.1667
    """
    if factor_scale == "paper":
        return 1.0
    if factor_scale != "stable":
        return float(factor_scale)
    rank, in_features = lora_a.shape
    out_features = lora_b.shape[0]
    moved = math.sqrt(out_features) * float(lora_a.float().norm()) + math.sqrt(in_features) * float(
        lora_b.float().norm()
    )
    return math.sqrt(out_features * rank / 3.0) / moved if moved > 0 else 1.0


def residual_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W_res = W - s * B0 @ A0`` with FILA's arithmetic (used by the init and by the resume rebuild).

    The product of the (adapter-dtype) factors and the subtraction run in fp32 (fp64 for fp64 weights);
    the result is cast to ``weight.dtype``.

    Args:
        weight: ``W`` in ``[out, in]`` layout.
        lora_a: ``A0`` ``[r, in]``.
        lora_b: ``B0`` ``[out, r]``.
        scaling: LoRA scaling ``s``.

    Returns:
        ``W_res`` in ``weight.dtype`` on ``weight``'s device.

    Examples:
        >>> residual_weight(torch.ones(2, 2), torch.ones(1, 2), torch.ones(2, 1), 0.5)
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    product = lora_b.to(weight.device, work) @ lora_a.to(weight.device, work)
    return (weight.detach().to(work) - scaling * product).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------------
# applying the init to PEFT layers
# ----------------------------------------------------------------------------------------------------------------


def _apply_to_layer(
    layer: nn.Module,
    adapter_name: str,
    importance: torch.Tensor,
    config: FilaConfig,
    lora_dtype: torch.dtype,
    layer_name: str,
) -> None:
    from peft.utils.integrations import gather_params_ctx
    from transformers.pytorch_utils import Conv1D

    base = layer.get_base_layer()
    transposed = isinstance(base, Conv1D)
    with gather_params_ctx(base.weight), torch.no_grad():
        weight = base.weight.mT if transposed else base.weight
        lora_a, lora_b, residual = fila_init_layer(
            weight,
            importance,
            layer.r[adapter_name],
            float(layer.scaling[adapter_name]),
            config=config,
            lora_dtype=lora_dtype,
            layer_name=layer_name,
        )
        a_param = layer.lora_A[adapter_name].weight
        b_param = layer.lora_B[adapter_name].weight
        a_param.data = lora_a.to(a_param.device)
        b_param.data = lora_b.to(b_param.device)
        base.weight.data = (residual.mT if transposed else residual).contiguous()
    set_init_state(layer, adapter_name, lora_a, lora_b)
    clear_pending(layer, adapter_name)


@dataclass
class _AttachedImportance:
    """Relative importance attached to a base layer by :func:`preprocess_fila`."""

    importance: torch.Tensor
    config: FilaConfig
    name: str


def init_layer_from_attached_importance(layer: nn.Module, adapter_name: str, attached: Any) -> None:
    """Initialise a layer during ``get_peft_model`` from statistics attached by :func:`preprocess_fila`.

    The factors are cast to the base weight dtype first (PEFT moves the adapter to that dtype right after
    the init and may upcast it later, which is exact), and the residual is computed from the cast factors.
    """
    if not isinstance(attached, _AttachedImportance):
        raise TypeError(f"Unexpected object in `{IMPORTANCE_ATTR}`: {type(attached).__name__}.")
    dtype = layer.get_base_layer().weight.dtype
    _apply_to_layer(layer, adapter_name, attached.importance, attached.config, dtype, attached.name)


def preprocess_fila(
    model: nn.Module,
    lora_config: Any,
    forget_dataloader: Iterable[Mapping[str, Any]],
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    *,
    max_batches: int | None = None,
    cache_path: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> FisherStatistics:
    """Attach FILA statistics to a plain model so that ``get_peft_model`` initialises FILA directly.

    Mirrors PEFT's ``preprocess_loraga``: call it on the plain model with the LoRA config you will pass to
    ``get_peft_model``; every target layer gets its relative importance attached, which the FILA init
    consumes (and deletes) during injection. Layers without attached statistics stay pending.

    Args:
        model: The plain (not yet PEFT-wrapped) model.
        lora_config: The ``LoraConfig`` (``init_lora_weights="fila"``) that selects the targets.
        forget_dataloader: Forget batches (``input_ids``, ``attention_mask``, ``labels``).
        retain_dataloader: Retain batches or None.
        max_batches: Limit on forget batches.
        cache_path: Fisher cache file (see :func:`estimate_fisher`).
        show_progress: Show a progress bar.

    Returns:
        The Fisher statistics that were used.

    Examples:
        >>> preprocess_fila(base, cfg, forget_loader, retain_loader)  # doctest: +SKIP
        >>> model = get_peft_model(base, cfg)  # FILA weights computed during injection  # doctest: +SKIP
    """
    if hasattr(model, "peft_config"):
        raise ValueError(
            "`preprocess_fila` expects the plain model before get_peft_model; for a PeftModel call "
            "initialize_fila_weights(model, forget_dataloader, retain_dataloader) instead."
        )
    if not is_fila_init(getattr(lora_config, "init_lora_weights", None)):
        raise ValueError(
            f"`lora_config.init_lora_weights` must be 'fila', got {getattr(lora_config, 'init_lora_weights', None)!r}."
        )
    validate_fila_lora_config(lora_config)
    fila_config = get_fila_config(lora_config)
    names = _config_target_names(model, lora_config)
    stats = estimate_fisher(
        model,
        forget_dataloader,
        retain_dataloader,
        target_modules=names,
        max_batches=max_batches,
        show_progress=show_progress,
        cache_path=cache_path,
        fp32_accumulation=fila_config.fp32_accumulation,
    )
    modules = resolve_fisher_targets(model, names)
    for name, module in modules.items():
        setattr(
            module,
            IMPORTANCE_ATTR,
            _AttachedImportance(stats.layer_relative_importance(name, fila_config.eps), fila_config, name),
        )
    return stats


def _config_target_names(model: nn.Module, lora_config: Any) -> list[str]:
    from peft.tuners.lora.model import LoraModel
    from transformers.pytorch_utils import Conv1D

    targets = lora_config.target_modules
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = LoraModel.target_module_mapping.get(model_type)
        if defaults is None:
            raise ValueError("`lora_config.target_modules` is None and PEFT has no default for this model; set it.")
        probe = lora_config.__class__(**{**lora_config.to_dict(), "target_modules": list(defaults)})
        names = [n for n, _ in linear if LoraModel._check_target_module_exists(probe, n)]
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        names = [n for n, m in linear if m is not output]
    else:
        names = [n for n, _ in linear if LoraModel._check_target_module_exists(lora_config, n)]
    if not names:
        raise ValueError(f"`lora_config.target_modules`={targets!r} matches no nn.Linear/Conv1D module of the model.")
    return names


# ----------------------------------------------------------------------------------------------------------------
# reference adapter (hf-integration.md section 5, option 1)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def add_fila_reference_adapter(
    peft_model: nn.Module, adapter_name: str = "default", reference_name: str = "ref"
) -> str:
    """Add a frozen plain-LoRA adapter holding ``A0``/``B0``, so that it reproduces the original model.

    With FILA the base holds ``W_res``, so ``disable_adapter()`` is *not* the starting model. Activating
    the returned adapter instead gives ``W_res + s * B0 A0 = W`` (e.g. for NPO/KL reference passes:
    ``model.set_adapter(ref, inference_mode=True)`` ... ``model.set_adapter(adapter_name)``). The adapter
    has ``init_lora_weights=True`` and no dropout; ``save_pretrained`` skips it by default. Every existing
    parameter keeps its ``requires_grad`` flag. This is the reference that
    :class:`~peft_unlearn.trainer.UnlearningTrainer` creates (adapter ``"ref"``) for NPO and KL.

    Args:
        peft_model: A PeftModel with an initialised FILA adapter.
        adapter_name: The FILA adapter.
        reference_name: Name of the new adapter.

    Returns:
        ``reference_name``.

    Examples:
        >>> ref = add_fila_reference_adapter(model)  # doctest: +SKIP
        >>> model.set_adapter(ref, inference_mode=True); ref_logits = model(**batch).logits  # doctest: +SKIP
        >>> model.set_adapter("default")  # doctest: +SKIP
    """
    from .saving import portable_lora_config

    configs = getattr(peft_model, "peft_config", None) or {}
    if adapter_name not in configs or not is_fila_init(configs[adapter_name].init_lora_weights):
        raise ValueError(
            f"`adapter_name`={adapter_name!r} is not a FILA adapter of the model (have {sorted(configs)})."
        )
    if reference_name in configs:
        raise ValueError(f"`reference_name`={reference_name!r} already exists; pick another name or delete it first.")
    layers = iter_lora_layers(peft_model, adapter_name)
    states = {name: get_init_state(layer, adapter_name) for name, layer in layers}
    if any(is_pending(layer, adapter_name) for _, layer in layers) or any(s is None for s in states.values()):
        raise ValueError(f"FILA adapter {adapter_name!r} is not initialised yet: call initialize_fila_weights first.")
    source = configs[adapter_name]
    # a plain LoraConfig copy of the FILA config (portable_lora_config doubles the rank; undo that)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = dataclasses.replace(
            portable_lora_config(source),
            r=source.r,
            lora_alpha=source.lora_alpha,
            rank_pattern=dict(source.rank_pattern or {}),
            alpha_pattern=dict(source.alpha_pattern or {}),
            lora_dropout=0.0,
        )
    active = peft_model.active_adapter
    flags = [(param, param.requires_grad) for param in peft_model.parameters()]
    peft_model.add_adapter(reference_name, reference)
    ref_layers = dict(iter_lora_layers(peft_model, reference_name))
    for name, (lora_a0, lora_b0) in states.items():
        layer = ref_layers.get(name)
        if layer is None:
            raise ValueError(f"The reference adapter did not reach layer {name}; the target patterns differ.")
        a_param, b_param = layer.lora_A[reference_name].weight, layer.lora_B[reference_name].weight
        # copies: the reference must not share storage with the stored initial state
        a_param.data = lora_a0.to(device=a_param.device, dtype=a_param.dtype, copy=True)
        b_param.data = lora_b0.to(device=b_param.device, dtype=b_param.dtype, copy=True)
        a_param.requires_grad_(False)
        b_param.requires_grad_(False)
    if peft_model.active_adapter != active:
        peft_model.set_adapter(active)
    for param, flag in flags:  # adding an adapter must not change what is trained
        param.requires_grad_(flag)
    return reference_name


# ----------------------------------------------------------------------------------------------------------------
# initialize_fila_weights
# ----------------------------------------------------------------------------------------------------------------


def _check_adapter(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, Mapping):
        raise TypeError(
            f"`peft_model` must be a PeftModel (from get_peft_model), got {type(peft_model).__name__}; wrap the "
            "model with get_peft_model(model, LoraConfig(init_lora_weights='fila', ...)) first."
        )
    if adapter_name not in configs:
        raise ValueError(f"`adapter_name`={adapter_name!r} is not an adapter of the model; have {sorted(configs)}.")
    config = configs[adapter_name]
    init = getattr(config, "init_lora_weights", None)
    if not (is_fila_init(init) or init is True):
        raise ValueError(
            f"Adapter {adapter_name!r} has init_lora_weights={init!r}; FILA needs 'fila' (or True for the patch-free "
            "path on a fresh adapter)."
        )
    validate_fila_lora_config(config)
    layers = iter_lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no LoRA layer.")
    for name, layer in layers:
        _check_fila_target(layer, adapter_name)
        state = layer.__dict__.get("_fila_init_state", {})
        others = [a for a in state if a != adapter_name]
        if others:
            raise ValueError(
                f"Layer {name} already carries the FILA adapter {others[0]!r}: its base holds that adapter's residual, "
                "and two FILA adapters on one layer are not supported. Delete the other adapter first."
            )
        if get_init_state(layer, adapter_name) is not None and not is_pending(layer, adapter_name):
            raise ValueError(
                f"Adapter {adapter_name!r} is already FILA-initialised (layer {name}); running FILA again would "
                "subtract the residual twice. Create a fresh adapter to start over."
            )
        if not is_fila_init(init) and bool(layer.lora_B[adapter_name].weight.detach().ne(0).any()):
            raise ValueError(
                f"Adapter {adapter_name!r} (init_lora_weights=True) has a non-zero lora_B in layer {name}: it was "
                "trained or loaded. initialize_fila_weights needs a fresh adapter."
            )
    return layers


def _peak_memory(devices: set[torch.device]) -> int:
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


@torch.no_grad()
def initialize_fila_weights(
    peft_model: nn.Module,
    forget_dataloader: Iterable[Mapping[str, Any]] | None = None,
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    adapter_name: str = "default",
    fisher: FisherStatistics | str | os.PathLike | None = None,
    max_batches: int | None = None,
    cache_path: str | os.PathLike | None = None,
    show_progress: bool = True,
    fila_config: FilaConfig | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute the FILA weights of one adapter of a PeftModel (modelled on ``initialize_lora_eva_weights``).

    The Fisher information is estimated on the base weights (adapters disabled) unless ``fisher`` is
    given; then every LoRA layer of the adapter gets ``A0``, ``B0`` and its base weight becomes
    ``W_res``, one layer at a time (each layer's statistics are dropped after use). The model output
    is unchanged. The adapter's config is set to ``init_lora_weights="fila"`` (so saving converts it)
    and the pending flags are cleared. Under ``torch.distributed`` every rank computes the same init.

    Args:
        peft_model: A PeftModel whose adapter was created with ``init_lora_weights="fila"`` (pending), or
            with ``init_lora_weights=True`` and not trained yet (patch-free path).
        forget_dataloader: Forget batches (``input_ids``, ``attention_mask``, ``labels``); required
            unless ``fisher`` is given.
        retain_dataloader: Retain batches or None (then ``F_hat = F_f / N_f``).
        adapter_name: The adapter to initialise.
        fisher: Precomputed :class:`FisherStatistics` (or the path of a saved file).
        max_batches: Limit on forget batches for the Fisher pass.
        cache_path: Fisher cache file (see :func:`estimate_fisher`).
        show_progress: Show a progress bar.
        fila_config: FILA settings; default: the adapter config's ``fila_config`` or :class:`FilaConfig`.

    Returns:
        Statistics: ``fisher_seconds``, ``svd_seconds``, ``seconds`` (total), ``peak_memory_bytes`` (CUDA
        max allocated since the last ``torch.cuda.reset_peak_memory_stats``, or on CPU the RSS high-water
        mark of the whole process so far, which includes anything that ran before the initialisation),
        ``num_layers``, ``f_count``, ``r_count``, ``num_batches``.

    Examples:
        >>> info = initialize_fila_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
        >>> info["num_layers"]  # doctest: +SKIP
        14
    """
    start = time.perf_counter()
    layers = _check_adapter(peft_model, adapter_name)
    config = peft_model.peft_config[adapter_name]
    cfg = FilaConfig.from_value(fila_config) if fila_config is not None else get_fila_config(config)

    devices = {layer.get_base_layer().weight.device for _, layer in layers}
    for device in devices:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    names = [name for name, _ in layers]
    owned = False
    if fisher is None:
        if forget_dataloader is None:
            raise ValueError(
                "initialize_fila_weights needs `forget_dataloader` (and ideally `retain_dataloader`) or precomputed "
                "`fisher` statistics."
            )
        with torch.enable_grad():
            fisher = estimate_fisher(
                peft_model,
                forget_dataloader,
                retain_dataloader,
                target_modules=names,
                max_batches=max_batches,
                show_progress=show_progress,
                cache_path=cache_path,
                fp32_accumulation=cfg.fp32_accumulation,
            )
        owned = True
    elif isinstance(fisher, (str, os.PathLike)):
        fisher = FisherStatistics.load(fisher)
        owned = True
    elif not isinstance(fisher, FisherStatistics):
        raise TypeError(f"`fisher` must be FisherStatistics, a path or None, got {type(fisher).__name__}.")
    missing = [n for n in names if n not in fisher.importance_f]
    if missing:
        raise ValueError(
            f"The Fisher statistics lack {len(missing)} layer(s) of adapter {adapter_name!r}, e.g. {missing[:3]}; "
            "they were computed for other target modules."
        )
    fisher_seconds = time.perf_counter() - start

    svd_start = time.perf_counter()
    near_zero_layers = []
    for name, layer in layers:
        importance = fisher.layer_relative_importance(name, cfg.eps)
        if owned:  # free this layer's accumulators as soon as they are used
            fisher.importance_f.pop(name, None)
            fisher.importance_r.pop(name, None)
        if bool((importance.sum(dim=1).sqrt() <= cfg.eps).any()) and cfg.row_weight_floor is None:
            near_zero_layers.append(name)
        lora_dtype = layer.lora_A[adapter_name].weight.dtype
        _apply_to_layer(layer, adapter_name, importance, cfg, lora_dtype, name)
        del importance
    svd_seconds = time.perf_counter() - svd_start
    if near_zero_layers:
        warnings.warn(
            f"FILA: {len(near_zero_layers)} layer(s) have output rows with (near-)zero Fisher weight (w <= eps), e.g. "
            f"{near_zero_layers[:3]}; those rows barely enter the adapter. Set FilaConfig(row_weight_floor=...) to "
            "floor them, or use more forget data.",
            stacklevel=2,
        )
    config.init_lora_weights = FILA_INIT_NAME
    return {
        "fisher_seconds": fisher_seconds,
        "svd_seconds": svd_seconds,
        "seconds": time.perf_counter() - start,
        "peak_memory_bytes": _peak_memory(devices),
        "num_layers": len(layers),
        "f_count": fisher.f_count,
        "r_count": fisher.r_count,
        "num_batches": fisher.num_batches,
    }
