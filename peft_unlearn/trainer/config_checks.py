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
from dataclasses import MISSING
from typing import Any

from ..losses import loss_options

__all__ = ["check_finite_fields", "warn_ignored_options"]

_DEFAULT_ASSISTANT_TURNS = "all"


def _default(config: Any, name: str) -> Any:
    """The declared default of a dataclass field of `config` (`None` for other objects or fields)."""
    field = getattr(config, "__dataclass_fields__", {}).get(name)
    return None if field is None or field.default is MISSING else field.default


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

    Checked: every loss-specific option (`UnlearningLoss.options` in the loss registry, e.g. `beta` without
    NPO/SimNPO, `kl_mask` without the KL retain loss, `rmu_layer` without RMU, `idk_answers` without IDK) set to
    a non-default value while no chosen loss reads it, `retain_weight` without a retain loss, `assistant_turns`
    with `completion_only_loss=False`, and the EL settings with `eval_compute_el=False`.

    Args:
        config: An `UnlearningConfig` (after the `beta` default was applied).

    Returns:
        The warning messages (empty when every option is used).
    """
    forget_loss = getattr(config, "forget_loss", None)
    retain_loss = getattr(config, "retain_loss", None)
    chosen = {f"forget_loss={forget_loss!r}"} | (
        {f"retain_loss={retain_loss!r}"} if retain_loss is not None else set()
    )
    messages: list[str] = []
    for option, users in loss_options().items():  # the registry says which loss reads which option
        if chosen & set(users) or not hasattr(config, option):
            continue
        value = getattr(config, option)
        if value is None or value == _default(config, option):
            continue
        shown = f"`{option}`" if isinstance(value, (list, tuple)) else f"`{option}`={value!r}"
        messages.append(
            f"{shown} is ignored: only {' or '.join(users)} uses it (forget_loss={forget_loss!r}, retain_loss="
            f"{retain_loss!r}). Remove it, or pick the loss that needs it."
        )
    if retain_loss is None and getattr(config, "retain_weight", 1.0) != 1.0:
        messages.append(
            f"`retain_weight`={config.retain_weight!r} is ignored: retain_loss=None trains on the forget loss alone. "
            "Set retain_loss='nll' or 'kl' to use it."
        )
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
