"""Stop a run whose loss or gradient becomes NaN/inf, and never save or push its model afterwards.

`transformers.Trainer` keeps going when the loss is not finite (with `logging_nan_inf_filter=True` it even
logs the average of the previous losses), so a diverged run used to end with a NaN adapter saved under a
healthy-looking log. [`UnlearningTrainer`][peft_unlearn.UnlearningTrainer] checks, per micro-batch, that the
loss is finite (one `isfinite` on the scalar the Trainer already synchronises for its own NaN filter) and, per
optimizer step, that the gradient norm the Trainer computes is finite, before the optimizer applies it. The
first failure raises [`NonFiniteTrainingError`][peft_unlearn.trainer.finite_guard.NonFiniteTrainingError]
naming the step, the quantity and the likely cause; the trainer then refuses to save or push the model.

With `fp16=True` (a gradient scaler skips overflowing steps by design) only the loss is checked.

Examples:
    >>> import torch
    >>> guard = FiniteGuard()
    >>> guard.check_loss(torch.tensor(0.5), step=3, settings={})
    >>> guard.diverged is None
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["FiniteGuard", "NonFiniteTrainingError", "check_finite_parameters", "likely_cause"]


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the model in memory is not usable and was not saved.

    Attributes:
        step: The optimizer step (``state.global_step + 1`` while it runs) at which it happened.
        quantity: ``"loss"`` or ``"gradient norm"``.
        value: The non-finite value.
    """

    def __init__(self, message: str, *, step: int, quantity: str, value: float) -> None:
        super().__init__(message)
        self.step = step
        self.quantity = quantity
        self.value = value


def likely_cause(settings: Mapping[str, Any]) -> str:
    """A short guess at why training diverged, from the run's settings.

    Args:
        settings: ``learning_rate``, ``forget_loss``, ``forget_weight``, ``max_grad_norm``, ``bf16``/``fp16``
            (missing keys are skipped).

    Returns:
        One sentence with the most likely causes and what to try.
    """
    hints: list[str] = []
    lr = settings.get("learning_rate")
    if isinstance(lr, (int, float)) and lr > 1e-3:
        hints.append(f"learning_rate={lr:g} is large for LoRA unlearning (1e-5 to 1e-4 is typical)")
    if settings.get("forget_loss") == "gradient_ascent":
        hints.append("forget_loss='gradient_ascent' is unbounded (the forget NLL grows without limit)")
    weight = settings.get("forget_weight")
    if isinstance(weight, (int, float)) and weight > 10:
        hints.append(f"forget_weight={weight:g} is large")
    max_grad_norm = settings.get("max_grad_norm")
    if not max_grad_norm:
        hints.append("gradient clipping is off (max_grad_norm=0)")
    if settings.get("fp16"):
        hints.append("fp16 overflows easily (try bf16=True)")
    if not hints:
        hints.append(
            "the learning rate or the loss weights may be too large, or the data contains inputs the model "
            "cannot score"
        )
    return "; ".join(hints) + ". Lower the learning rate, keep max_grad_norm > 0, or pick a bounded forget loss."


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().reshape(-1)[0]) if value.numel() else float("nan")
    return float(value)


class FiniteGuard:
    """Remembers whether training diverged; raises `NonFiniteTrainingError` at the first non-finite value.

    Attributes:
        diverged: None while training is healthy, else the error message (kept after the exception so that save
            and push paths can refuse).
    """

    def __init__(self) -> None:
        self.diverged: str | None = None

    def _fail(self, quantity: str, value: float, step: int, settings: Mapping[str, Any], detail: str) -> None:
        message = (
            f"Training stopped at step {step}: the {quantity} is {value} ({detail}). Likely cause: "
            f"{likely_cause(settings)} The model in memory now holds unusable weights, so it is not saved or "
            "pushed; start again from the initial model (or the last good checkpoint)."
        )
        self.diverged = message
        raise NonFiniteTrainingError(message, step=step, quantity=quantity, value=value)

    def check_loss(self, loss: Any, step: int, settings: Mapping[str, Any]) -> None:
        """Raise if the micro-batch loss is not finite.

        Args:
            loss: The scalar loss of `training_step`.
            step: The optimizer step being computed.
            settings: Run settings for [`likely_cause`][peft_unlearn.trainer.finite_guard.likely_cause].

        Raises:
            NonFiniteTrainingError: If the loss is NaN or infinite.
        """
        if loss is None:
            return
        finite = bool(torch.isfinite(loss).all()) if isinstance(loss, torch.Tensor) else math.isfinite(float(loss))
        if not finite:
            self._fail("loss", _as_float(loss), step, settings, "forward pass of a training batch")

    def check_grad_norm(self, grad_norm: Any, step: int, settings: Mapping[str, Any]) -> None:
        """Raise if the gradient norm of an optimizer step is not finite (before the optimizer applies it).

        Args:
            grad_norm: The norm computed by the Trainer (tensor or float; None is skipped).
            step: The optimizer step.
            settings: Run settings for [`likely_cause`][peft_unlearn.trainer.finite_guard.likely_cause].

        Raises:
            NonFiniteTrainingError: If the norm is NaN or infinite.
        """
        if grad_norm is None or settings.get("fp16"):
            return
        value = _as_float(grad_norm)
        if not math.isfinite(value):
            self._fail("gradient norm", value, step, settings, "before the optimizer step, so it was not applied")

    def check_can_save(self, action: str) -> None:
        """Raise if the run diverged: a NaN/inf model must not be saved, pushed or described as trained.

        Args:
            action: What was attempted, e.g. ``"save_model('out')"``.

        Raises:
            NonFiniteTrainingError: If training diverged earlier.
        """
        if self.diverged is not None:
            raise NonFiniteTrainingError(
                f"Refusing {action}: training diverged earlier and the model holds unusable weights. {self.diverged}",
                step=-1,
                quantity="model",
                value=float("nan"),
            )


def check_finite_parameters(model: torch.nn.Module, action: str) -> None:
    """Raise if a trainable parameter holds NaN/inf (the last line of defence before writing a model).

    Args:
        model: The (unwrapped) model about to be saved.
        action: What was attempted, for the message.

    Raises:
        NonFiniteTrainingError: Naming the first non-finite trainable parameter.
    """
    for name, param in model.named_parameters():
        if param.requires_grad and param.numel() and not bool(torch.isfinite(param.detach()).all()):
            raise NonFiniteTrainingError(
                f"Refusing {action}: the trainable parameter {name!r} holds NaN/inf values, so the model would be "
                "unusable. Training diverged; lower the learning rate (and keep max_grad_norm > 0), then train again.",
                step=-1,
                quantity="parameter",
                value=float("nan"),
            )
