"""Configuration of FILA (Fisher-weighted LoRA initialisation).

Two dataclasses live here:

* `FilaConfig` holds the knobs of the initialisation itself (SVD iterations, seed, the
  epsilon of the relative importance, an optional floor on the row weights, exact or randomized
  SVD, fp32 or bf16 Fisher accumulation).
* `FilaLoraConfig` is a `peft.LoraConfig` that sets ``init_lora_weights="fila"``,
  carries a ``fila_config`` and rejects the LoRA options that FILA cannot support (see
  `validate_fila_lora_config`).

Plain ``LoraConfig(init_lora_weights="fila")`` works as well once `peft_unlearn` is imported;
the same validation then runs when PEFT injects the adapter.

Examples:
    >>> from peft_unlearn.fila.config import FilaConfig, FilaLoraConfig
    >>> cfg = FilaLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], fila_config=FilaConfig(seed=0))
    >>> cfg.init_lora_weights
    'fila'
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig

from .registry import FILA_INIT_NAME, inits_with_settings

__all__ = [
    "FILA_INIT_NAME",
    "FilaConfig",
    "check_factor_scale",
    "FilaLoraConfig",
    "get_fila_config",
    "validate_fila_lora_config",
]


#: Accepted values of `FilaConfig.b0_form`.
B0_FORMS = ("projection", "official")


@dataclass
class FilaConfig:
    """Settings of the FILA initialisation (Fisher-weighted low-rank init, arXiv 2408.06621, Section 3).

    Args:
        niter: Subspace iterations of the randomized SVD (``torch.svd_lowrank``; the official code uses 2).
        seed: Seed of the randomized SVD (official: 42). The global RNG state is saved and restored around it.
        eps: Epsilon in ``F_hat = (F_f/N_f) / (eps + F_r/N_r)`` and in ``1 / (w + eps)``.
        row_weight_floor: If set, row weights are clamped to at least ``row_weight_floor * max(w)`` (a fraction
            in ``[0, 1]``), which limits the ``1/(w + eps)`` amplification of rows without forget signal.
            ``None`` (default) keeps the official behaviour.
        exact_svd: ``True``: always use the exact ``torch.linalg.svd``; ``False``: randomized SVD whenever
            possible (the official behaviour); ``"auto"`` (default): exact for small layers
            (``min(out, in) <= exact_svd_max_dim``) and whenever the rank exceeds half of ``min(out, in)``,
            randomized otherwise. The randomized SVD needs ``rank <= min(out, in)``; larger ranks are an error.
        exact_svd_max_dim: Size threshold used by ``exact_svd="auto"`` (default 256: layers with
            ``min(out, in) <= 256`` get the exact SVD, larger ones the randomized one, which is much faster on CPU).
        b0_form: How ``B0`` is formed from the truncated SVD ``diag(w) W ~= U diag(S) V^T``.
            ``"projection"`` (default): ``B0 = diag(w / (w + eps)) W V diag(1 / sqrt(S s))``;
            ``"official"``: ``B0 = diag(1 / (w + eps)) U diag(sqrt(S / s))``, the official code's formula. With an
            exact SVD the two are the same (``U = diag(w) W V diag(1 / S)``). With the randomized SVD they differ:
            ``s B0 A0`` is ``diag(w / (w + eps)) W V V^T`` (the best weighted approximation with the row space found,
            so never farther from the weighted optimum) versus ``diag(1 / (w + eps)) U S V^T``; an independent check
            against the official code found the two products 12-25% apart on Gemma-3 270M's q/gate/up projections. ``"projection"`` is the default because it is
            at least as close to the weighted optimum and never amplifies rounding noise of rows with ``w ~ 0`` by
            ``1 / eps``.
        fp32_accumulation: Accumulate the Fisher statistics in fp32 (default). ``False`` accumulates in the
            model's dtype, like the official bf16 code (parity mode, loses small squares).
        factor_scale: Scale ``c`` of the trainable factors, which start at ``c * A0`` and ``c * B0``; the
            model output is unchanged at init for every ``c`` (the initial product ``s * c**2 * B0 A0`` is
            cancelled), but the size of each Adam update of ``s * B A`` grows with ``c``.
            ``"stable"`` (default): a per-layer ``c`` chosen so that the first Adam step moves ``s * B A`` about as
            much as it moves a default LoRA at the same learning rate. Adam's first step changes every
            entry by about ``lr``; default LoRA moves only ``B`` (``A``'s gradient is 0 because ``B = 0``),
            so ``||delta||_F ~ s * lr * sqrt(out * r / 3)`` for PEFT's kaiming-uniform ``A``
            (``||A||_F**2 ~ r / 3``), while FILA moves both factors:
            ``||delta||_F ~ s * lr * c * (sqrt(out) * ||A0||_F + sqrt(in) * ||B0||_F)``. Hence
            ``c = sqrt(out * r / 3) / (sqrt(out) * ||A0||_F + sqrt(in) * ||B0||_F)``.
            ``"paper"``: ``c = 1``, the paper's magnitudes ``sqrt(S / s)``, which need a learning rate about
            10x lower than default LoRA's (at lr 1e-3 one step destroys Gemma-3 270M).
            A positive number: that ``c`` for every layer.
            The default is ``"stable"`` because in the forget-versus-keep benchmark on Gemma-3 270M (IHL +
            retain NLL, r = 8) it is sound at the learning rate that suits default LoRA (1e-3: 4 steps to
            forget vs LoRA's 5, same heldout retention), while the paper scale is not.

    Examples:
        >>> FilaConfig(niter=4).niter
        4
    """

    niter: int = field(default=2, metadata={"help": "Subspace iterations of torch.svd_lowrank."})
    seed: int = field(default=42, metadata={"help": "Seed of the randomized SVD."})
    eps: float = field(default=1e-5, metadata={"help": "Epsilon of the relative importance and of 1/(w+eps)."})
    row_weight_floor: float | None = field(
        default=None, metadata={"help": "Clamp row weights to >= floor * max(w); None keeps them as they are."}
    )
    exact_svd: bool | Literal["auto"] = field(
        default="auto", metadata={"help": "True: exact SVD, False: randomized SVD, 'auto': exact for small layers."}
    )
    exact_svd_max_dim: int = field(default=256, metadata={"help": "Largest min(out, in) for exact SVD in auto."})
    b0_form: Literal["projection", "official"] = field(
        default="projection",
        metadata={
            "help": "B0 from the truncated SVD: 'projection' (diag(w/(w+eps)) W V diag(1/sqrt(S s)), the default) or "
            "'official' (diag(1/(w+eps)) U diag(sqrt(S/s)), the official code); equal under an exact SVD."
        },
    )
    fp32_accumulation: bool = field(
        default=True, metadata={"help": "Accumulate Fisher statistics in fp32 (False: model dtype, parity mode)."}
    )
    factor_scale: str | float = field(
        default="stable",
        metadata={
            "help": "Scale c of the trainable factors (c*A0, c*B0; the output at init is unchanged for any c): "
            "'paper' (c=1, the paper's sqrt(S/s) magnitudes), 'stable' (per-layer c so that the first Adam "
            "step moves s*B*A as much as it moves a default LoRA at the same learning rate) or a positive number."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.niter, bool) or not isinstance(self.niter, int) or self.niter < 0:
            raise ValueError(f"`niter` must be a non-negative integer, got {self.niter!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise ValueError(f"`eps` must be a positive float, got {self.eps!r}; the paper uses 1e-5.")
        if self.row_weight_floor is not None and not (
            isinstance(self.row_weight_floor, (int, float)) and 0.0 <= self.row_weight_floor <= 1.0
        ):
            raise ValueError(
                f"`row_weight_floor` must be None or a fraction of the largest row weight in [0, 1], "
                f"got {self.row_weight_floor!r}."
            )
        if self.exact_svd not in (True, False, "auto"):
            raise ValueError(f"`exact_svd` must be True, False or 'auto', got {self.exact_svd!r}.")
        if isinstance(self.exact_svd_max_dim, bool) or not isinstance(self.exact_svd_max_dim, int):
            raise ValueError(f"`exact_svd_max_dim` must be an integer, got {self.exact_svd_max_dim!r}.")
        if self.b0_form not in B0_FORMS:
            raise ValueError(
                f"`b0_form` must be one of {list(B0_FORMS)}, got {self.b0_form!r}; 'official' matches the official "
                "code's B0 = diag(1/(w+eps)) U sqrt(S/s)."
            )
        if not isinstance(self.fp32_accumulation, bool):
            raise ValueError(f"`fp32_accumulation` must be a bool, got {self.fp32_accumulation!r}.")
        self.factor_scale = check_factor_scale(self.factor_scale)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: FilaConfig | dict[str, Any] | None) -> FilaConfig:
        """Build a config from an instance, a dict (e.g. read from ``adapter_config.json``) or ``None``.

        Args:
            value: A `FilaConfig`, a dict of its fields (unknown keys are an error) or ``None``
                (defaults).

        Returns:
            A `FilaConfig`.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"`fila_config` has unknown keys {unknown}; expected a subset of {sorted(known)}.")
            return cls(**value)
        raise TypeError(f"`fila_config` must be a FilaConfig, a dict or None, got {type(value).__name__}.")


FACTOR_SCALE_NAMES = ("paper", "stable")


def check_factor_scale(value: Any) -> str | float:
    """Validate a ``factor_scale`` setting (``"paper"``, ``"stable"`` or a positive number; shared by the inits).

    Returns:
        The lower-case name or the number as a float.
    """
    if isinstance(value, str):
        if value.lower() in FACTOR_SCALE_NAMES:
            return value.lower()
        raise ValueError(
            f"`factor_scale` must be 'paper', 'stable' or a positive number, got {value!r}; 'paper' keeps the "
            "paper's factor magnitudes, 'stable' matches default LoRA's first update size."
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"`factor_scale` must be 'paper', 'stable' or a positive finite number, got {value!r}; e.g. "
            "factor_scale=0.1 starts the trainable factors at 0.1 * A0 and 0.1 * B0."
        )
    return float(value)


def validate_fila_lora_config(config: LoraConfig) -> None:
    """Reject LoRA options that FILA cannot support.

    FILA moves a rank-r part of every target weight into the adapter and publishes a rank-2r plain LoRA
    built from ``lora_A``/``lora_B`` only, so everything else the adapter might carry would be lost or
    wrong: DoRA magnitudes, ``modules_to_save``, ``trainable_token_indices``, ``lora_bias``, trained
    base biases (``bias="all"``/``"lora_only"``),
    ``target_parameters``, and rslora combined with ``rank_pattern``/``alpha_pattern`` (whose scaling
    cannot be kept when the rank doubles).

    Args:
        config: A LoRA config whose ``init_lora_weights`` is ``"fila"``.

    Raises:
        ValueError: Naming the offending option, its value and how to fix it.
    """
    init = str(getattr(config, "init_lora_weights", "fila")).lower()
    prefix = f"init_lora_weights={init!r} does not support"
    if getattr(config, "use_dora", False):
        raise ValueError(f"{prefix} use_dora=True (DoRA magnitudes cannot be converted); set use_dora=False.")
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"{prefix} modules_to_save={config.modules_to_save!r} (the portable adapter holds lora_A/lora_B only); "
            "set modules_to_save=None or train those modules without FILA."
        )
    if getattr(config, "trainable_token_indices", None):
        raise ValueError(
            f"{prefix} trainable_token_indices={config.trainable_token_indices!r}; set trainable_token_indices=None."
        )
    bias = getattr(config, "bias", "none")
    if bias not in (None, "none"):
        raise ValueError(
            f"{prefix} bias={bias!r} (trained base biases are not part of the portable rank-2r adapter, so saving "
            "would fail after training); set bias='none'."
        )
    if getattr(config, "lora_bias", False):
        raise ValueError(f"{prefix} lora_bias=True (the bias would be lost on conversion); set lora_bias=False.")
    if getattr(config, "target_parameters", None):
        raise ValueError(
            f"{prefix} target_parameters={config.target_parameters!r}; target nn.Linear/Conv1D modules with "
            "target_modules instead."
        )
    if getattr(config, "use_rslora", False) and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            f"{prefix} use_rslora=True together with rank_pattern/alpha_pattern (the scaling cannot be kept when "
            "the portable adapter doubles the rank); drop the patterns or set use_rslora=False."
        )
    fila_config = getattr(config, "fila_config", None)
    if fila_config is not None:
        FilaConfig.from_value(fila_config)


def get_fila_config(config: Any) -> FilaConfig:
    """Return the `FilaConfig` carried by a LoRA config (defaults when it has none).

    Args:
        config: A `FilaLoraConfig`, a plain ``LoraConfig`` or any object.

    Returns:
        The FILA settings.
    """
    return FilaConfig.from_value(getattr(config, "fila_config", None))


_INIT_FIELD = LoraConfig.__dataclass_fields__["init_lora_weights"]


@dataclass
class FilaLoraConfig(LoraConfig):
    """A `peft.LoraConfig` preset for FILA (and VILA).

    ``init_lora_weights`` defaults to ``"fila"`` and may be ``"vila"`` (the same weighted init from a
    gradient-variance importance); ``fila_config`` holds the
    `FilaConfig` (a dict is converted, which is how it comes back from JSON). Unsupported LoRA
    options raise at construction (`validate_fila_lora_config`). ``get_peft_model`` accepts it as
    any LoRA config; saved configs reload as plain ``LoraConfig`` (PEFT drops the unknown
    ``fila_config`` key with a warning), and the published portable adapter is a plain LoRA anyway.

    Every `peft.LoraConfig` argument is accepted too.

    Args:
        fila_config: FILA settings; ``None`` uses the defaults.

    Examples:
        >>> cfg = FilaLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        >>> cfg.fila_config.seed
        42
    """

    init_lora_weights: bool | str = field(default=FILA_INIT_NAME, metadata=dict(_INIT_FIELD.metadata))
    fila_config: FilaConfig | None = field(
        default=None, metadata={"help": "FILA settings (FilaConfig or dict); None uses the defaults."}
    )

    def __post_init__(self) -> None:
        if self.init_lora_weights is True:
            self.init_lora_weights = FILA_INIT_NAME
        accepted = inits_with_settings("fila_config")  # the registered inits that end in FILA's weighted SVD
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() in accepted:
            self.init_lora_weights = self.init_lora_weights.lower()
        else:
            raise ValueError(
                f"FilaLoraConfig needs init_lora_weights={' or '.join(map(repr, accepted))}, got "
                f"{self.init_lora_weights!r}; use a "
                "plain peft.LoraConfig (or the init's own preset, e.g. RilaLoraConfig) for other initialisations."
            )
        super().__post_init__()
        self.fila_config = FilaConfig.from_value(self.fila_config)
        validate_fila_lora_config(self)
