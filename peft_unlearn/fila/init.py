"""FILA: Fisher-weighted initialisation of LoRA layers (Cha et al., ICLR 2025, section 3).

For one layer with weight ``W`` [out, in], relative importance ``F_hat`` [out, in], rank ``r`` and
LoRA scaling ``s``:

1. row weights ``w_i = sqrt(sum_j F_hat_ij)`` (optionally floored),
2. truncated SVD of the row-weighted weight ``diag(w) W ~= U diag(S) V^T`` (rank r, fp32; seeded
   randomized SVD, or an exact SVD: by default, ``exact_svd="auto"``, for layers with ``min(out, in) <= 256``),
3. ``S <- S / s``,
4. ``A0 = (V diag(sqrt S))^T`` [r, in], ``B0 = diag(1 / (w + eps)) U diag(sqrt S)`` [out, r]
   (by default evaluated as ``diag(w / (w + eps)) W V diag(1 / sqrt(S s))``: the same for an exact SVD, and rows
   with ``w ~ 0`` do not get rounding noise amplified by ``1 / eps``; under the randomized SVD the two differ,
   ``FilaConfig(b0_form="official")`` uses the official ``U`` form),
5. the trainable factors start at ``A_init = c * A0``, ``B_init = c * B0`` (``FilaConfig.factor_scale``;
   ``c = 1`` is the paper),
6. the initial product ``s * B_init A_init`` is cancelled by a frozen copy of the initial factors
   (`peft_unlearn.fila.offset`): the base weight is never modified and the model output is
   unchanged at init. The paper instead rewrites the base to ``W_res = W - s * B0 A0``; that is
   the same function with the same gradients, but it mutates the user's model and does not work
   on quantized or sharded bases.

``s * B0 A0 = diag(1/(w+eps)) U_r S_r V_r^T`` is the minimiser of ``||diag(w) (W - M)||_F`` over
rank-r ``M`` (when eps is negligible): the forget-important principal directions start inside the
adapter.

Entry points:

* `fila_init_layer`: the pure per-layer computation (testable alone).
* `initialize_fila_weights`: estimate the Fisher information of a PeftModel (or take given
  statistics) and initialise every layer of the adapter, one layer at a time.
* `peft_unlearn.fila.preprocess.preprocess_fila`: the LoRA-GA-style alternative.

Examples:
    >>> import peft_unlearn
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights="fila"))  # doctest: +SKIP
    >>> stats = initialize_fila_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
"""

from __future__ import annotations

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
from .fisher import FisherStatistics, estimate_fisher
from .offset import get_offset, set_offset
from .state import (
    DATA_DRIVEN_INITS,
    FLOAT_DTYPES,
    IMPORTANCE_ATTR,
    adapter_lora_config,
    check_target_layer,
    clear_pending,
    copy_into_,
    dense_weight,
    init_name,
    is_pending,
    is_sharded,
    iter_lora_layers,
    peak_memory,
)

__all__ = [
    "AttachedImportance",
    "assign_initial_factors",
    "check_fresh_adapter",
    "fila_init_layer",
    "initialize_fila_weights",
    "resolve_factor_scale",
    "trainer_options",
]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the initial FILA factors of one layer.

    Args:
        weight: Base weight ``W`` in ``nn.Linear`` layout ``[out, in]`` (transpose Conv1D weights first),
            any float dtype.
        importance: Relative Fisher importance ``F_hat`` ``[out, in]`` (non-negative).
        rank: LoRA rank ``r``, ``1 <= r <= min(out, in)``.
        scaling: LoRA scaling ``s`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rslora).
        config: `FilaConfig` (seed, niter, eps, floor, SVD choice, factor scale); defaults if None.
        lora_dtype: dtype of the returned factors (the adapter dtype); default fp32.
        layer_name: Used in warnings and errors.

    Returns:
        ``(A_init [r, in], B_init [out, r])`` = ``(c * A0, c * B0)`` with ``c`` from
        ``config.factor_scale``, in ``lora_dtype`` on ``weight``'s device.

    Examples:
        >>> import torch
        >>> W, F = torch.randn(6, 4), torch.ones(6, 4)
        >>> paper = FilaConfig(factor_scale="paper")  # c = 1: s * B0 @ A0 is the weighted rank-r approximation
        >>> A, B = fila_init_layer(W, F, rank=4, scaling=2.0, config=paper)  # full rank, uniform importance
        >>> torch.allclose(2.0 * B @ A, W, atol=1e-4)
        True
    """
    config = config or FilaConfig()
    if weight.dim() != 2:
        raise ValueError(f"`weight` of {layer_name} must be 2-D [out, in], got shape {tuple(weight.shape)}.")
    if weight.dtype not in FLOAT_DTYPES:
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

    u, s, v = _truncated_svd(row_w[:, None] * w_mat, rank, config)
    s = s.clamp_min(0)
    lora_a = (v * (s / scaling).sqrt()).mT
    if config.b0_form == "official":  # the official code's B0 = diag(1/(w+eps)) U diag(sqrt(S/s))
        lora_b = (u / (row_w + config.eps)[:, None]) * (s / scaling).sqrt()
        return _scaled(config, lora_a, lora_b, lora_dtype)
    del u
    # B0 = diag(1/(w+eps)) U diag(sqrt(S/s)) with U = diag(w) W V diag(1/S), i.e. diag(w/(w+eps)) W V diag(1/sqrt(S s)):
    # identical for an exact SVD, but rows with w ~ 0 get exactly their (tiny) share instead of U's rounding noise
    # divided by eps. Directions with S = 0 carry nothing (their A0 row is 0).
    tiny = s.max() * torch.finfo(work).eps * max(w_mat.shape)
    inv_root = torch.where(s > tiny, (s * scaling).clamp_min(torch.finfo(work).tiny).rsqrt(), 0.0)
    lora_b = (row_w / (row_w + config.eps))[:, None] * (w_mat @ v) * inv_root
    return _scaled(config, lora_a, lora_b, lora_dtype)


def _scaled(
    config: FilaConfig, lora_a: torch.Tensor, lora_b: torch.Tensor, lora_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c A0, c B0)`` in ``lora_dtype`` with ``c`` from ``config.factor_scale``."""
    factor = resolve_factor_scale(config.factor_scale, lora_a, lora_b)
    return (factor * lora_a).contiguous().to(lora_dtype), (factor * lora_b).contiguous().to(lora_dtype)


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
    """Set ``lora_A``/``lora_B`` of one layer to the FILA factors and attach the cancelling offset."""
    from peft.utils.integrations import gather_params_ctx

    base = layer.get_base_layer()
    with gather_params_ctx(base.weight, modifier_rank=None), torch.no_grad():  # read-only gather under ZeRO-3
        weight = dense_weight(base)
    with torch.no_grad():
        lora_a, lora_b = fila_init_layer(
            weight,
            importance,
            layer.r[adapter_name],
            float(layer.scaling[adapter_name]),
            config=config,
            lora_dtype=lora_dtype,
            layer_name=layer_name,
        )
        del weight
    assign_initial_factors(layer, adapter_name, lora_a, lora_b)


def assign_initial_factors(layer: nn.Module, adapter_name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Start a LoRA layer's adapter at ``(A_init, B_init)`` and cancel their product with the frozen offset.

    Shared by every data-driven init: the trainable ``lora_A``/``lora_B`` get the values (each rank writes its
    own shard of FSDP2 ``DTensor`` / ZeRO-3 parameters), `peft_unlearn.fila.offset.set_offset` keeps a frozen
    copy so that the output is unchanged, and the layer's pending flag is cleared.

    Args:
        layer: A PEFT LoRA layer holding ``adapter_name``.
        adapter_name: The adapter.
        lora_a: ``A_init`` ``[r, in]`` (the full, unsharded value; the same on every rank).
        lora_b: ``B_init`` ``[out, r]``.
    """
    with torch.no_grad():
        a_param = layer.lora_A[adapter_name].weight
        b_param = layer.lora_B[adapter_name].weight
        if a_param.dtype == lora_a.dtype and not is_sharded(a_param):
            a_param.data = lora_a.to(a_param.device)
            b_param.data = lora_b.to(b_param.device)
        else:  # FSDP2 DTensor / ZeRO-3 parameters: every rank writes its own shard of the same full value
            copy_into_(a_param, lora_a)
            copy_into_(b_param, lora_b)
    set_offset(layer, adapter_name, lora_a, lora_b)
    clear_pending(layer, adapter_name)


@dataclass
class AttachedImportance:
    """Relative importance attached to a base layer by `preprocess_fila`."""

    importance: torch.Tensor
    config: FilaConfig
    name: str


def init_layer_from_attached_importance(layer: nn.Module, adapter_name: str, attached: Any) -> None:
    """Initialise a layer during ``get_peft_model`` from statistics attached by `preprocess_fila`.

    The factors are cast to the base weight dtype first for float bases (PEFT moves the adapter to that
    dtype right after the init and may upcast it later, which is exact), fp32 for quantized bases; the
    offset computes in the adapter's dtype at every forward, so it cancels the initial product.
    """
    if not isinstance(attached, AttachedImportance):
        raise TypeError(f"Unexpected object in `{IMPORTANCE_ATTR}`: {type(attached).__name__}.")
    dtype = layer.get_base_layer().weight.dtype
    dtype = dtype if dtype in FLOAT_DTYPES else torch.float32
    _apply_to_layer(layer, adapter_name, attached.importance, attached.config, dtype, attached.name)


# ----------------------------------------------------------------------------------------------------------------
# initialize_fila_weights
# ----------------------------------------------------------------------------------------------------------------


def check_fresh_adapter(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """The LoRA layers of a data-driven adapter that is ready to be initialised (shared by every init).

    Checks that ``adapter_name`` is an adapter of a PeftModel with a data-driven ``init_lora_weights`` (or
    ``True`` on a fresh adapter, FILA's patch-free path), that its config and every target layer are supported,
    and that it is not initialised (or trained) already.

    Returns:
        ``(normalized_name, lora_layer)`` pairs.

    Raises:
        TypeError / ValueError: Naming what is wrong and how to fix it.
    """
    config = adapter_lora_config(peft_model, adapter_name, FILA_INIT_NAME)
    init = getattr(config, "init_lora_weights", None)
    if not (init_name(init) is not None or init is True):
        raise ValueError(
            f"Adapter {adapter_name!r} has init_lora_weights={init!r}; a data-driven init needs one of "
            f"{list(DATA_DRIVEN_INITS)} (or True for the patch-free path on a fresh adapter)."
        )
    validate_fila_lora_config(config)
    layers = iter_lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no LoRA layer.")
    for name, layer in layers:
        check_target_layer(layer, adapter_name, init_name(init) or FILA_INIT_NAME)
        if get_offset(layer, adapter_name) is not None and not is_pending(layer, adapter_name):
            raise ValueError(
                f"Adapter {adapter_name!r} is already initialised (layer {name}); initialising it again would discard "
                "its trained weights. Create a fresh adapter to start over."
            )
        if init is True and bool(layer.lora_B[adapter_name].weight.detach().ne(0).any()):
            raise ValueError(
                f"Adapter {adapter_name!r} (init_lora_weights=True) has a non-zero lora_B in layer {name}: it was "
                "trained or loaded. initialize_fila_weights needs a fresh adapter."
            )
    return layers


_FISHER_OPTIONS = ("accumulator_device", "layers_per_pass", "max_accumulator_bytes", "train_mode", "on_cache_mismatch")


def _checked_fisher_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"`fisher_options` must be a dict of estimate_fisher options, got {type(options).__name__}.")
    unknown = sorted(set(options) - set(_FISHER_OPTIONS))
    if unknown:
        raise ValueError(
            f"`fisher_options` has unknown keys {unknown}; expected a subset of {list(_FISHER_OPTIONS)} (the other "
            "estimate_fisher arguments are set by initialize_fila_weights itself)."
        )
    return dict(options)


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
    fisher_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute the FILA weights of one adapter of a PeftModel (modelled on ``initialize_lora_eva_weights``).

    The Fisher information is estimated on the base weights (adapters disabled) unless ``fisher`` is
    given; then every LoRA layer of the adapter gets its initial factors and a frozen copy of them that
    cancels their product, one layer at a time (each layer's statistics are dropped after use). The
    base weights are never modified and the model output is unchanged. An adapter created with
    ``init_lora_weights=True`` gets ``"fila"`` in its config (so saving converts it; ``"vila"`` stays
    as it is) and the pending flags are cleared. Under ``torch.distributed`` every rank computes the
    same init. bitsandbytes 4-bit/8-bit bases work (the SVD runs on the dequantized weight).

    Args:
        peft_model: A PeftModel whose adapter was created with ``init_lora_weights="fila"`` (pending; also
            ``"vila"``, whose init calls this with its own importance), or with ``init_lora_weights=True``
            and not trained yet (patch-free path).
        forget_dataloader: Forget batches (``input_ids``, ``attention_mask``, ``labels``); required
            unless ``fisher`` is given.
        retain_dataloader: Retain batches or None (then ``F_hat = F_f / N_f``).
        adapter_name: The adapter to initialise.
        fisher: Precomputed `FisherStatistics` (or the path of a saved file); its ``importance_f`` /
            ``importance_r`` hold full-shape ``[out, in]`` tensors per layer (normalised names).
        max_batches: Limit on forget batches for the Fisher pass.
        cache_path: Fisher cache file (see `estimate_fisher`).
        show_progress: Show a progress bar.
        fila_config: FILA settings; default: the adapter config's ``fila_config`` or `FilaConfig`.
        fisher_options: Extra keyword arguments of `estimate_fisher` for the Fisher pass, e.g. the
            low-memory modes ``{"accumulator_device": "cpu"}`` (fp32 accumulators in host memory) or
            ``{"layers_per_pass": 8}`` / ``{"max_accumulator_bytes": 8 * 2**30}`` (target layers in groups,
            one pass over the data per group), ``train_mode`` or ``on_cache_mismatch``.

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
    layers = check_fresh_adapter(peft_model, adapter_name)
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
                **_checked_fisher_options(fisher_options),
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
    if config.init_lora_weights is True:
        config.init_lora_weights = FILA_INIT_NAME
    return {
        "fisher_seconds": fisher_seconds,
        "svd_seconds": svd_seconds,
        "seconds": time.perf_counter() - start,
        "peak_memory_bytes": peak_memory(devices),
        "num_layers": len(layers),
        "f_count": fisher.f_count,
        "r_count": fisher.r_count,
        "num_batches": fisher.num_batches,
    }


def trainer_options(lora_config: Any, unlearning_config: Any) -> dict[str, Any]:
    """FILA's keyword arguments of `initialize_fila_weights` for a run of `UnlearningTrainer`.

    Args:
        lora_config: The adapter's ``LoraConfig`` (its ``fila_config``, if any, is the starting point).
        unlearning_config: The run's `UnlearningConfig`: ``fila_seed`` (overrides the SVD seed), ``fila_cache``,
            ``fila_accumulator_device`` and ``fila_layers_per_pass`` (the low-memory modes of the Fisher pass).

    Returns:
        ``cache_path``, ``fila_config`` and ``fisher_options``.
    """
    import dataclasses

    fila_config = get_fila_config(lora_config)
    seed = getattr(unlearning_config, "fila_seed", None)
    if seed is not None:
        fila_config = dataclasses.replace(fila_config, seed=seed)
    options = {
        "accumulator_device": getattr(unlearning_config, "fila_accumulator_device", None),
        "layers_per_pass": getattr(unlearning_config, "fila_layers_per_pass", None),
    }
    return {
        "cache_path": getattr(unlearning_config, "fila_cache", None),
        "fila_config": fila_config,
        "fisher_options": {k: v for k, v in options.items() if v is not None},
    }
