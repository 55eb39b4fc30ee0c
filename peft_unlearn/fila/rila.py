"""RILA: LoRA initialised on the output directions where the forget data dominate the retain data (ReGLU).

ReGLU (Findings of ACL 2026, arXiv 2604.17396, public code ``sustech-nlp/ReGLU``) initialises every target
layer with weight ``W`` [out, in] from the covariances of the layer's outputs ``y = W x`` on the forget and
the retain data (forward passes only, see `peft_unlearn.fila.covariance`):

1. ``C_f = E_forget[y y^T]``, ``C_r = E_retain[y y^T]`` ([out, out], uncentered),
2. ``M = (1 - beta) C_f - beta C_r`` and ``Q`` [out, r] its eigenvectors of the ``r`` largest eigenvalues
   (the output directions with the most forget energy net of retain energy),
3. ``B_init = c * Q``, ``A_init = c * Q^T W`` (``c = 1`` is the paper; `RilaConfig.factor_scale`),
4. the initial product ``s * B_init A_init = s c^2 Q Q^T W`` (``s`` the LoRA scaling) is cancelled by the
   frozen offset (`peft_unlearn.fila.offset`), so the base weight is never modified, the model output is
   unchanged at init, and ``save_pretrained`` writes the portable rank-2r plain LoRA. The official code
   instead rewrites the base to ``W - s B A``: the same function and gradients, but it mutates the model
   and does not work on quantized or sharded bases.

Where this implementation and the official code differ, and why (all choices are settings):

* ``beta``: the official config default is 0.8, its TOFU recipe uses 0.7; the default here is 0.8.
* Vectors: one per sequence, the output **summed over positions** (``pooling="sum"``), as in the official
  code, but over non-padding positions only (the official code includes padding). ``pooling="token"``
  uses every position as a vector.
* ``max_samples`` = 256 sequences per set, the official ``rila_samples_per_split``.
* The ``1e-4 * I`` the official code adds to each covariance is omitted: it shifts every eigenvalue of
  ``M`` by ``(1 - 2 beta) 1e-4`` and leaves the eigenvectors, hence the init, unchanged.
* The covariances are accumulated in fp32 (the official code stacks fp64 copies of the pooled outputs);
  the eigendecomposition and ``Q^T W`` run in fp64, like the official code.
* No division of the factors by ``s`` (unlike FILA): ``B_init`` has orthonormal columns, as in the paper.
* Without retain data, ``Q`` are the top eigenvectors of ``C_f`` (``beta`` is ignored).

The regulariser of the paper (ROL, a penalty on the adapter's ``B`` inside the top retain-output subspace)
works with any init; it is an `UnlearningConfig` option (``retain_subspace_weight``).

Examples:
    >>> import peft_unlearn
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights="rila"))  # doctest: +SKIP
    >>> info = initialize_rila_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from .config import check_factor_scale, validate_fila_lora_config
from .covariance import POOLINGS, OutputCovariance, estimate_output_covariance
from .init import assign_initial_factors, check_fresh_adapter, resolve_factor_scale
from .registry import RILA_INIT_NAME
from .state import FLOAT_DTYPES, dense_weight, init_name, peak_memory

__all__ = [
    "RILA_INIT_NAME",
    "RilaConfig",
    "RilaLoraConfig",
    "get_rila_config",
    "initialize_rila_weights",
    "rila_init_layer",
    "top_eigenvectors",
    "trainer_options",
]


@dataclass
class RilaConfig:
    """Settings of the RILA initialisation (ReGLU, arXiv 2604.17396).

    Args:
        beta: Weight of the retain covariance in ``(1 - beta) C_f - beta C_r``, in ``[0, 1]`` (official
            config default 0.8; its TOFU recipe uses 0.7).
        max_samples: Sequences of each set used for the covariances (official: 256); None: all of them.
        pooling: ``"sum"``: one vector per sequence, the layer output summed over its non-padding positions
            (the official statistics); ``"token"``: one vector per non-padding position.
        factor_scale: Scale ``c`` of the initial factors ``c Q^T W`` and ``c Q``: ``"paper"`` (``c = 1``),
            ``"stable"`` (the per-layer ``c`` that makes the first Adam step move ``s B A`` about as much as a
            default LoRA's, see `FilaConfig.factor_scale`) or a positive number. The output at init is
            unchanged for every ``c``.

    Examples:
        >>> RilaConfig(beta=0.7).beta
        0.7
    """

    beta: float = field(
        default=0.8,
        metadata={"help": "Weight of the retain covariance in (1 - beta) C_f - beta C_r, in [0, 1] (official: 0.8)."},
    )
    max_samples: int | None = field(
        default=256, metadata={"help": "Sequences of each set used for the covariances (official 256); None: all."}
    )
    pooling: str = field(
        default="sum",
        metadata={"help": "'sum': one vector per sequence (summed outputs, official); 'token': one per position."},
    )
    factor_scale: str | float = field(
        default="paper",
        metadata={"help": "Scale c of the initial factors (c Q^T W, c Q): 'paper' (c=1), 'stable' or a number."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"`beta` must be a number in [0, 1], got {self.beta!r}; the official default is 0.8.")
        self.beta = float(self.beta)
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1
        ):
            raise ValueError(f"`max_samples` must be a positive integer or None, got {self.max_samples!r}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {list(POOLINGS)}, got {self.pooling!r}.")
        self.factor_scale = check_factor_scale(self.factor_scale)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: RilaConfig | Mapping[str, Any] | None) -> RilaConfig:
        """Build a config from an instance, a dict (e.g. read from ``adapter_config.json``) or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"`rila_config` has unknown keys {unknown}; expected a subset of {sorted(known)}.")
            return cls(**value)
        raise TypeError(f"`rila_config` must be a RilaConfig, a dict or None, got {type(value).__name__}.")


def get_rila_config(config: Any) -> RilaConfig:
    """The `RilaConfig` carried by a LoRA config (``rila_config``; defaults when it has none)."""
    return RilaConfig.from_value(getattr(config, "rila_config", None))


_INIT_FIELD = LoraConfig.__dataclass_fields__["init_lora_weights"]


@dataclass
class RilaLoraConfig(LoraConfig):
    """A `peft.LoraConfig` preset for RILA: ``init_lora_weights="rila"`` and a ``rila_config``.

    The LoRA options a data-driven init cannot support raise at construction (as for `FilaLoraConfig`).
    Saved configs reload as plain ``LoraConfig``; the published portable adapter is a plain LoRA anyway.

    Args:
        rila_config: RILA settings; ``None`` uses the defaults.

    Examples:
        >>> RilaLoraConfig(r=4, target_modules=["q_proj"], rila_config={"beta": 0.7}).rila_config.beta
        0.7
    """

    init_lora_weights: bool | str = field(default=RILA_INIT_NAME, metadata=dict(_INIT_FIELD.metadata))
    rila_config: RilaConfig | None = field(
        default=None, metadata={"help": "RILA settings (RilaConfig or dict); None uses the defaults."}
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() == RILA_INIT_NAME):
            raise ValueError(
                f"RilaLoraConfig needs init_lora_weights='rila', got {self.init_lora_weights!r}; use a plain "
                "peft.LoraConfig for other initialisations."
            )
        self.init_lora_weights = RILA_INIT_NAME
        super().__post_init__()
        self.rila_config = RilaConfig.from_value(self.rila_config)
        validate_fila_lora_config(self)


# ----------------------------------------------------------------------------------------------------------------
# the pure per-layer computation
# ----------------------------------------------------------------------------------------------------------------


#: Extra columns of the range finder of `top_eigenvectors` beyond the rank bound (and at least ``k``).
RANGE_OVERSAMPLE = 16


def top_eigenvectors(matrix: torch.Tensor, k: int, *, rank_bound: int | None = None, seed: int = 0) -> torch.Tensor:
    """The eigenvectors of the ``k`` largest eigenvalues of a symmetric matrix, largest first (fp64).

    Without ``rank_bound`` this is a full ``torch.linalg.eigh`` (``O(n^3)``: about 2.6 s for ``n = 2048`` on one
    CPU thread). When the matrix is known to have rank at most ``rank_bound`` (a difference of covariances of
    ``N_f`` and ``N_r`` vectors has rank ``<= N_f + N_r``), a range finder with ``w = rank_bound + max(16, k)``
    random columns spans its whole range, and the eigendecomposition of the ``[w, w]`` projection gives the same
    eigenpairs in ``O(n^2 w)``; the projection's remaining ``w - rank`` directions are orthogonal to the range,
    i.e. eigenvectors of the eigenvalue 0, so they rank above the negative eigenvalues exactly as they do in the
    full decomposition (where the eigenvectors of 0 are just as arbitrary). The full path is taken whenever
    ``2 w >= n``.

    Each column's sign is fixed so that its entry of largest magnitude is positive (the LoRA product and its
    training do not depend on the signs; this makes the result reproducible across the two paths).

    Args:
        matrix: Symmetric ``[n, n]``.
        k: How many, ``1 <= k <= n``.
        rank_bound: An upper bound on the rank of ``matrix`` (None: unknown, full decomposition).
        seed: Seed of the range finder's random test matrix (the result does not depend on it beyond roundoff).

    Returns:
        ``[n, k]`` fp64 with orthonormal columns.

    Examples:
        >>> top_eigenvectors(torch.diag(torch.tensor([1.0, 3.0, 2.0])), 1).flatten().tolist()
        [0.0, 1.0, 0.0]
        >>> y = torch.randn(3, 300, dtype=torch.float64)
        >>> q = top_eigenvectors(y.T @ y, 2, rank_bound=3)
        >>> torch.allclose(q, top_eigenvectors(y.T @ y, 2), atol=1e-8)
        True
    """
    symmetric = matrix.to(torch.float64)
    symmetric = (symmetric + symmetric.mT) / 2
    n = symmetric.shape[0]
    width = None if rank_bound is None else rank_bound + max(RANGE_OVERSAMPLE, k)
    if width is None or 2 * width >= n:
        _, vectors = torch.linalg.eigh(symmetric)
        vectors = vectors[:, -k:].flip(-1)
    else:
        gen = torch.Generator(device=symmetric.device).manual_seed(seed)
        probe = torch.randn(n, width, generator=gen, dtype=symmetric.dtype, device=symmetric.device)
        basis = torch.linalg.qr(symmetric @ probe)[0]
        _, small = torch.linalg.eigh(basis.mT @ symmetric @ basis)
        vectors = basis @ small[:, -k:].flip(-1)
    pivot = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(vectors.gather(0, pivot))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def rila_init_layer(
    weight: torch.Tensor,
    cov_forget: torch.Tensor,
    cov_retain: torch.Tensor | None,
    rank: int,
    *,
    config: RilaConfig | None = None,
    lora_dtype: torch.dtype | None = None,
    layer_name: str = "layer",
    rank_bound: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the initial RILA factors of one layer.

    Args:
        weight: Base weight ``W`` ``[out, in]`` (``nn.Linear`` layout), any float dtype.
        cov_forget: ``C_f`` ``[out, out]``.
        cov_retain: ``C_r`` ``[out, out]``, or None (then ``Q`` are the top eigenvectors of ``C_f``).
        rank: LoRA rank ``r``, ``1 <= r <= out``.
        config: `RilaConfig` (beta, factor scale); defaults if None.
        lora_dtype: dtype of the returned factors; default fp32.
        layer_name: Used in errors.
        rank_bound: Upper bound on the rank of ``M`` (the number of forget plus retain vectors behind the
            covariances); lets `top_eigenvectors` skip the full ``[out, out]`` eigendecomposition.

    Returns:
        ``(A_init [r, in], B_init [out, r]) = (c Q^T W, c Q)`` on ``weight``'s device.

    Examples:
        >>> W = torch.randn(3, 5)
        >>> A, B = rila_init_layer(W, torch.diag(torch.tensor([1.0, 4.0, 0.0])), torch.eye(3), rank=1)
        >>> B.flatten().abs().tolist(), torch.allclose(A, B.T @ W)
        ([0.0, 1.0, 0.0], True)
    """
    config = config or RilaConfig()
    if weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"`weight` of {layer_name} must be a 2-D float tensor, got {tuple(weight.shape)} {weight.dtype}."
        )
    out_features = weight.shape[0]
    for arg, cov in (("cov_forget", cov_forget), ("cov_retain", cov_retain)):
        if cov is not None and tuple(cov.shape) != (out_features, out_features):
            raise ValueError(
                f"`{arg}` of {layer_name} has shape {tuple(cov.shape)}, expected {(out_features, out_features)}."
            )
        if cov is not None and not torch.isfinite(cov).all():
            raise ValueError(f"`{arg}` of {layer_name} contains NaN/inf; check the model and the data.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= out_features:
        raise ValueError(
            f"`rank` of {layer_name} must be an integer in [1, out] = [1, {out_features}], got {rank!r}; lower `r` "
            "(or use rank_pattern) for this layer."
        )
    device = weight.device
    target = cov_forget.to(device, torch.float64)
    if cov_retain is not None:
        target = (1.0 - config.beta) * target - config.beta * cov_retain.to(device, torch.float64)
    q = top_eigenvectors(target, rank, rank_bound=rank_bound)
    lora_b = q
    lora_a = q.mT @ weight.detach().to(torch.float64)
    factor = resolve_factor_scale(config.factor_scale, lora_a, lora_b)
    lora_dtype = lora_dtype or torch.float32
    return (factor * lora_a).contiguous().to(lora_dtype), (factor * lora_b).contiguous().to(lora_dtype)


# ----------------------------------------------------------------------------------------------------------------
# initialize_rila_weights
# ----------------------------------------------------------------------------------------------------------------

_COVARIANCE_OPTIONS = ("accumulator_device", "layers_per_pass")


def _check_rila_adapter(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    layers = check_fresh_adapter(peft_model, adapter_name)
    init = peft_model.peft_config[adapter_name].init_lora_weights
    if not (init is True or init_name(init) == RILA_INIT_NAME):
        raise ValueError(
            f"Adapter {adapter_name!r} has init_lora_weights={init!r}; initialize_rila_weights needs 'rila' (or True "
            "on a fresh adapter). Use peft_unlearn.fila.initialize_adapter_weights to run the adapter's own init."
        )
    return layers


@torch.no_grad()
def initialize_rila_weights(
    peft_model: nn.Module,
    forget_dataloader: Iterable[Mapping[str, Any]] | None = None,
    retain_dataloader: Iterable[Mapping[str, Any]] | None = None,
    adapter_name: str = "default",
    *,
    rila_config: RilaConfig | Mapping[str, Any] | None = None,
    covariance: OutputCovariance | None = None,
    max_batches: int | None = None,
    covariance_options: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Compute the RILA init of one adapter: output covariances, then ``B = Q``, ``A = Q^T W`` per layer.

    Every LoRA layer gets its factors and the frozen offset that cancels their product (the base weight is
    never modified, the output is unchanged). An adapter created with ``init_lora_weights=True`` gets
    ``"rila"`` in its config. Under ``torch.distributed`` every rank computes the same init; bitsandbytes
    4-bit/8-bit bases work (``Q^T W`` uses the dequantized weight).

    Args:
        peft_model: A PeftModel with a fresh ``init_lora_weights="rila"`` adapter.
        forget_dataloader: Forget batches (``input_ids``, ``attention_mask``); required unless ``covariance``.
        retain_dataloader: Retain batches, or None (then ``Q`` comes from ``C_f`` alone).
        adapter_name: The adapter to initialise.
        rila_config: Settings; default: the adapter config's ``rila_config`` or `RilaConfig()`.
        covariance: Precomputed `OutputCovariance` of the adapter's layers (skips the data pass).
        max_batches: Limit on the batches of each set.
        covariance_options: Low-memory modes of the data pass (as for the Fisher pass):
            ``{"accumulator_device": "cpu"}`` and/or ``{"layers_per_pass": N}``.
        show_progress: Show a progress bar.

    Returns:
        ``covariance_seconds`` (the data pass), ``eig_seconds`` (eigendecompositions and factors), ``seconds``,
        ``peak_memory_bytes`` (as in `initialize_fila_weights`), ``num_layers``, ``f_count``, ``r_count``.

    Raises:
        ValueError: On an unsupported adapter or target, bad settings, or data without sequences.

    Examples:
        >>> info = initialize_rila_weights(model, forget_loader, retain_loader)  # doctest: +SKIP
        >>> info["num_layers"]  # doctest: +SKIP
        14
    """
    start = time.perf_counter()
    layers = _check_rila_adapter(peft_model, adapter_name)
    config = peft_model.peft_config[adapter_name]
    cfg = RilaConfig.from_value(rila_config) if rila_config is not None else get_rila_config(config)
    options = dict(covariance_options or {})
    unknown = sorted(set(options) - set(_COVARIANCE_OPTIONS))
    if unknown:
        raise ValueError(
            f"`covariance_options` has unknown keys {unknown}; expected a subset of {list(_COVARIANCE_OPTIONS)}."
        )
    devices = {layer.get_base_layer().weight.device for _, layer in layers}
    for device in devices:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    names = [name for name, _ in layers]
    if covariance is None:
        if forget_dataloader is None:
            raise ValueError(
                "initialize_rila_weights needs `forget_dataloader` (and ideally `retain_dataloader`) or a precomputed "
                "`covariance`."
            )
        covariance = estimate_output_covariance(
            peft_model,
            forget_dataloader,
            retain_dataloader,
            target_modules=names,
            max_samples=cfg.max_samples,
            max_batches=max_batches,
            pooling=cfg.pooling,
            show_progress=show_progress,
            **options,
        )
    missing = [n for n in names if n not in covariance.forget]
    if missing:
        raise ValueError(
            f"The output covariance lacks {len(missing)} layer(s) of adapter {adapter_name!r}, e.g. {missing[:3]}."
        )
    covariance_seconds = time.perf_counter() - start

    from peft.utils.integrations import gather_params_ctx

    eig_start = time.perf_counter()
    has_retain = covariance.r_count > 0 and bool(covariance.retain)
    # C_f and C_r are sums of f_count / r_count outer products: M has at most that rank
    rank_bound = covariance.f_count + (covariance.r_count if has_retain else 0)
    for name, layer in layers:
        base = layer.get_base_layer()
        with gather_params_ctx(base.weight, modifier_rank=None):
            weight = dense_weight(base)
        cov_r = covariance.retain_covariance(name) if has_retain else None
        lora_a, lora_b = rila_init_layer(
            weight,
            covariance.forget_covariance(name),
            cov_r,
            layer.r[adapter_name],
            config=cfg,
            lora_dtype=layer.lora_A[adapter_name].weight.dtype,
            layer_name=name,
            rank_bound=rank_bound,
        )
        del weight, cov_r
        covariance.pop(name)
        assign_initial_factors(layer, adapter_name, lora_a, lora_b)
    if config.init_lora_weights is True:
        config.init_lora_weights = RILA_INIT_NAME
    return {
        "covariance_seconds": covariance_seconds,
        "eig_seconds": time.perf_counter() - eig_start,
        "seconds": time.perf_counter() - start,
        "peak_memory_bytes": peak_memory(devices),
        "num_layers": len(layers),
        "f_count": covariance.f_count,
        "r_count": covariance.r_count,
    }


def trainer_options(lora_config: Any, unlearning_config: Any) -> dict[str, Any]:
    """RILA's keyword arguments of `initialize_rila_weights` for a run of `UnlearningTrainer`.

    Args:
        lora_config: The adapter's ``LoraConfig`` (its ``rila_config``, if any).
        unlearning_config: The run's `UnlearningConfig`: ``fila_accumulator_device`` and ``fila_layers_per_pass``
            (the low-memory modes, shared with the Fisher pass).

    Returns:
        ``rila_config`` and ``covariance_options``.
    """
    options = {
        "accumulator_device": getattr(unlearning_config, "fila_accumulator_device", None),
        "layers_per_pass": getattr(unlearning_config, "fila_layers_per_pass", None),
    }
    return {
        "rila_config": get_rila_config(lora_config),
        "covariance_options": {k: v for k, v in options.items() if v is not None},
    }
