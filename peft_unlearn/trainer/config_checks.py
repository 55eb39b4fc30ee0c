"""Checks of an `UnlearningConfig` beyond single-field choices: finite numbers and options the mode ignores.

Both run from `UnlearningConfig.__post_init__`:

- [`check_finite_fields`][peft_unlearn.trainer.config_checks.check_finite_fields] rejects NaN and infinite values
  in every float setting (a `learning_rate=inf` or `retain_weight=inf` would only train the model to NaN);
- [`warn_ignored_options`][peft_unlearn.trainer.config_checks.warn_ignored_options] warns about settings that the
  chosen objective does not read (e.g. `beta` with `forget_loss="inverted_hinge"`), so a typo in the objective
  does not go unnoticed.

Examples:
    >>> from types import SimpleNamespace
    >>> check_finite_fields(SimpleNamespace(learning_rate=1e-4))
    >>> check_finite_fields(SimpleNamespace(learning_rate=float("inf")))
    Traceback (most recent call last):
    ...
    ValueError: `learning_rate` must be a finite number, got inf; NaN and infinite settings train the model to NaN. Pass a finite value.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

__all__ = ["check_finite_fields", "warn_ignored_options"]

# Defaults of the mode-specific options (kept here so the warnings compare against the documented values).
_DEFAULT_KL_MASK = "labels"
_DEFAULT_ASSISTANT_TURNS = "all"
_DEFAULT_RMU_COEFF = 6.5


def _settings(config: Any) -> dict[str, Any]:
    fields = getattr(config, "__dataclass_fields__", None)
    names = list(fields) if fields is not None else list(vars(config))
    return {name: getattr(config, name, None) for name in names}


def check_finite_fields(config: Any) -> None:
    """Raise if any float setting of `config` is NaN or infinite.

    Args:
        config: A dataclass (e.g. an `UnlearningConfig`) or any object with attributes.

    Raises:
        ValueError: Naming the first non-finite field and its value.
    """
    for name, value in _settings(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"`{name}` must be a finite number, got {value!r}; NaN and infinite settings train the model to NaN. "
                "Pass a finite value."
            )
    lr = getattr(config, "learning_rate", None)
    if isinstance(lr, (int, float)) and lr < 0:
        raise ValueError(
            f"`learning_rate` must be >= 0, got {lr!r}; a negative rate ascends the loss. To ascend the forget "
            "likelihood use forget_loss='gradient_ascent' with a positive learning rate."
        )


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def warn_ignored_options(config: Any) -> list[str]:
    """Warn (``UserWarning``) about options that the chosen objective ignores; return the messages.

    Checked: `beta` without NPO/SimNPO, `simnpo_delta` without SimNPO, `kl_mask` without the KL retain loss,
    `rmu_layer` / `rmu_steering_coeff` without RMU,
    `retain_weight` without a retain loss, `idk_answers` without `forget_loss="idk"`, `assistant_turns` with
    `completion_only_loss=False`, and the EL settings with `eval_compute_el=False`.

    Args:
        config: An `UnlearningConfig` (after the `beta` default was applied).

    Returns:
        The warning messages (empty when every option is used).
    """
    forget_loss = getattr(config, "forget_loss", None)
    retain_loss = getattr(config, "retain_loss", None)
    messages: list[str] = []
    if getattr(config, "beta", None) is not None and forget_loss not in ("npo", "simnpo"):
        messages.append(
            f"`beta`={config.beta!r} is ignored: only forget_loss='npo' or 'simnpo' uses it (forget_loss="
            f"{forget_loss!r}). Remove it, or pick the loss that needs it."
        )
    if getattr(config, "simnpo_delta", 0.0) not in (0, 0.0) and forget_loss != "simnpo":
        messages.append(
            f"`simnpo_delta`={config.simnpo_delta!r} is ignored: only forget_loss='simnpo' uses it (forget_loss="
            f"{forget_loss!r})."
        )
    if getattr(config, "kl_mask", _DEFAULT_KL_MASK) != _DEFAULT_KL_MASK and retain_loss != "kl":
        messages.append(
            f"`kl_mask`={config.kl_mask!r} is ignored: only retain_loss='kl' uses it (retain_loss={retain_loss!r})."
        )
    if retain_loss is None and getattr(config, "retain_weight", 1.0) != 1.0:
        messages.append(
            f"`retain_weight`={config.retain_weight!r} is ignored: retain_loss=None trains on the forget loss alone. "
            "Set retain_loss='nll' or 'kl' to use it."
        )
    uses_rmu = "rmu" in (forget_loss, retain_loss)
    if not uses_rmu and getattr(config, "rmu_layer", None) is not None:
        messages.append(f"`rmu_layer`={config.rmu_layer!r} is ignored: only forget_loss or retain_loss='rmu' uses it.")
    if forget_loss != "rmu" and getattr(config, "rmu_steering_coeff", _DEFAULT_RMU_COEFF) != _DEFAULT_RMU_COEFF:
        messages.append(
            f"`rmu_steering_coeff`={config.rmu_steering_coeff!r} is ignored: only forget_loss='rmu' uses it."
        )
    if getattr(config, "idk_answers", None) is not None and forget_loss != "idk":
        messages.append(f"`idk_answers` is ignored: only forget_loss='idk' uses it (forget_loss={forget_loss!r}).")
    if (
        getattr(config, "assistant_turns", _DEFAULT_ASSISTANT_TURNS) != _DEFAULT_ASSISTANT_TURNS
        and getattr(config, "completion_only_loss", True) is False
    ):
        messages.append(
            f"`assistant_turns`={config.assistant_turns!r} is ignored: completion_only_loss=False supervises every "
            "token."
        )
    if getattr(config, "eval_compute_el", True) is False and (
        list(getattr(config, "eval_el_n", [10])) != [10] or getattr(config, "eval_el_prefix_stride", 1) != 1
    ):
        messages.append("`eval_el_n` / `eval_el_prefix_stride` are ignored: eval_compute_el=False skips EL.")
    for message in messages:
        _warn(message)
    return messages
