"""Trainer callbacks: memorization evaluation during training and the stop-when-forgotten rule.

- `StopWhenForgottenCallback` reads evaluation metrics (``eval_forget_ma``, ``eval_forget_el10``, as
  logged by ``UnlearningTrainer.evaluate`` or by `UnlearningEvalCallback`) and stops training once the
  forget set is "forgotten": MA below a threshold **and** EL_n below a threshold (Jang et al. 2023; the
  thresholds are usually the model's scores on unseen data).
- `UnlearningEvalCallback` computes `evaluate_memorization` on named token
  sets every N optimizer steps and logs ``{name}_ma``, ``{name}_el10``, ``{name}_nll``, ``{name}_ppl``; it works
  with a stock ``transformers.Trainer`` as well as ``UnlearningTrainer``.
- `RobustnessCallback` runs a cheap subset of `evaluate_robustness` (nf4 reload, export, a short relearning
  run) at the end of training; ``UnlearningTrainer`` puts its verdict into the model card.

Examples:
    >>> from peft_unlearn.trainer.callbacks import StopWhenForgottenCallback
    >>> cb = StopWhenForgottenCallback(ma_threshold=0.30, el_threshold=0.05)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

from ..metrics.memorization import evaluate_memorization

__all__ = ["RobustnessCallback", "StopWhenForgottenCallback", "UnlearningEvalCallback"]

logger = logging.getLogger(__name__)


def _below(value: float | None, threshold: float | None) -> bool:
    """True when no threshold is set, else ``value <= threshold`` (False for a missing / NaN value).

    "At or below" the never-seen level, as the memorized-text rule reads: a never-seen EL10 of exactly 0 must
    be reachable.
    """
    if threshold is None:
        return True
    return value is not None and not math.isnan(value) and value <= threshold


def _check_threshold(name: str, value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value)):
        raise ValueError(f"`{name}` must be a number or None, got {value!r}.")


class StopWhenForgottenCallback(TrainerCallback):
    """Stop training once the forget set's MA and EL_n fall below thresholds (checked at each evaluation).

    At ``on_evaluate`` the callback reads ``{forget_prefix}ma`` and ``{forget_prefix}el{el_n}`` from the
    metrics and sets ``control.should_training_stop = True`` when ``MA < ma_threshold`` **and**
    ``EL_n < el_threshold``. A threshold left at None is not checked (MA only, or EL only).

    With ``reference_set="heldout"`` the thresholds come from the metrics of the evaluation set named
    ``heldout`` (``eval_heldout_ma``, ``eval_heldout_el10``; the prefix is ``eval_{reference_set}_``):

    - ``reference_mode="first"`` (default, Jang's rule): the heldout scores of the **first** evaluation that
      reports them are frozen and used for the rest of training. Use ``eval_on_start=True`` in the training
      arguments so that they are the scores of the model before unlearning.
    - ``reference_mode="current"``: the heldout scores of the **same** evaluation are used (the latest seen
      ones when a stock ``Trainer`` evaluates the sets one after the other, so put ``heldout`` before
      ``forget`` in the eval dict).

    Explicit ``ma_threshold`` / ``el_threshold`` take precedence over the reference set. A stock ``Trainer``
    calls ``on_evaluate`` once per eval dataset; evaluations without the forget keys are ignored. When it
    stops, the reason is logged (INFO) and kept in `stop_reason` / `stopped_at_step`.

    Args:
        ma_threshold: Stop only if the forget MA is below this.
        el_threshold: Stop only if the forget EL_n is below this.
        forget_prefix: Prefix of the forget metrics (``"eval_forget_"`` for ``eval_dataset={"forget": ...}``
            or ``UnlearningTrainer``; ``"forget_"`` for `UnlearningEvalCallback` logs).
        el_n: Which EL key to read (``el10``).
        reference_set: None, or the name of the evaluation set whose scores become the thresholds.
        reference_mode: ``"first"`` or ``"current"`` (see above).

    Examples:
        >>> cb = StopWhenForgottenCallback(reference_set="heldout")
        >>> # Trainer(..., eval_dataset={"forget": f, "heldout": h}, callbacks=[cb], args=...eval_on_start=True)
    """

    def __init__(
        self,
        ma_threshold: float | None = None,
        el_threshold: float | None = None,
        forget_prefix: str = "eval_forget_",
        el_n: int = 10,
        reference_set: str | None = None,
        reference_mode: str = "first",
    ):
        _check_threshold("ma_threshold", ma_threshold)
        _check_threshold("el_threshold", el_threshold)
        if ma_threshold is None and el_threshold is None and reference_set is None:
            raise ValueError(
                "StopWhenForgottenCallback needs `ma_threshold`, `el_threshold` or `reference_set` "
                "(e.g. reference_set='heldout'); with none of them it would never stop."
            )
        if reference_mode not in ("first", "current"):
            raise ValueError(f"`reference_mode` must be 'first' or 'current', got {reference_mode!r}.")
        if not isinstance(el_n, int) or el_n < 1:
            raise ValueError(f"`el_n` must be a positive int, got {el_n!r}.")
        self.ma_threshold = ma_threshold
        self.el_threshold = el_threshold
        self.forget_prefix = forget_prefix
        self.el_n = el_n
        self.reference_set = reference_set
        self.reference_mode = reference_mode
        self.reference: dict[str, float] | None = None
        self.stop_reason: str | None = None
        self.stopped_at_step: int | None = None
        self._seen_forget = False

    @property
    def _ref_prefix(self) -> str:
        return f"eval_{self.reference_set}_"

    def _update_reference(self, metrics: Mapping[str, float]) -> None:
        if self.reference_set is None:
            return
        ma_key, el_key = f"{self._ref_prefix}ma", f"{self._ref_prefix}el{self.el_n}"
        if ma_key not in metrics and el_key not in metrics:
            return
        if self.reference is not None and self.reference_mode == "first":
            return
        self.reference = {"ma": metrics.get(ma_key), "el": metrics.get(el_key)}
        logger.info(
            "StopWhenForgottenCallback: reference thresholds from %r: MA %s, EL%d %s (%s evaluation).",
            self.reference_set,
            self.reference["ma"],
            self.el_n,
            self.reference["el"],
            self.reference_mode,
        )

    def thresholds(self) -> tuple[float | None, float | None]:
        """The (MA, EL) thresholds in force: explicit values first, else the reference set's scores.

        Returns:
            ``(ma_threshold, el_threshold)``; an entry is None when not checked.
        """
        ma_thr, el_thr = self.ma_threshold, self.el_threshold
        if self.reference_set is not None and self.reference is not None:
            if ma_thr is None:
                ma_thr = self.reference["ma"]
            if el_thr is None:
                el_thr = self.reference["el"]
        return ma_thr, el_thr

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        self._update_reference(metrics)
        ma_key, el_key = f"{self.forget_prefix}ma", f"{self.forget_prefix}el{self.el_n}"
        if ma_key not in metrics and el_key not in metrics:
            return control
        self._seen_forget = True
        if (
            self.reference_set is not None
            and self.reference is None
            and (self.ma_threshold is None or self.el_threshold is None)
        ):
            logger.warning(
                "StopWhenForgottenCallback: no %r scores seen yet (keys %sma / %sel%d); not stopping.",
                self.reference_set,
                self._ref_prefix,
                self._ref_prefix,
                self.el_n,
            )
            return control
        ma_thr, el_thr = self.thresholds()
        ma, el = metrics.get(ma_key), metrics.get(el_key)
        if ma_thr is not None and ma is None:
            logger.warning("StopWhenForgottenCallback: %s missing from the metrics; not stopping.", ma_key)
            return control
        if el_thr is not None and el is None:
            logger.warning(
                "StopWhenForgottenCallback: %s missing from the metrics (compute EL with n=%d); not stopping.",
                el_key,
                self.el_n,
            )
            return control
        if _below(ma, ma_thr) and _below(el, el_thr):
            parts = []
            if ma_thr is not None:
                parts.append(f"{ma_key}={ma:.4f} <= {ma_thr:.4f}")
            if el_thr is not None:
                parts.append(f"{el_key}={el:.4f} <= {el_thr:.4f}")
            self.stop_reason = "forget set forgotten: " + " and ".join(parts)
            self.stopped_at_step = state.global_step
            logger.info("StopWhenForgottenCallback: stopping at step %d, %s.", state.global_step, self.stop_reason)
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not self._seen_forget:
            logger.warning(
                "StopWhenForgottenCallback never saw %sma / %sel%d in the evaluation metrics. Evaluate a set "
                "named 'forget' with memorization metrics (UnlearningTrainer, UnlearningEvalCallback, or "
                "compute_metrics=peft_unlearn.metrics.compute_ma_metrics) or set `forget_prefix`.",
                self.forget_prefix,
                self.forget_prefix,
                self.el_n,
            )
        return control


class UnlearningEvalCallback(TrainerCallback):
    """Evaluate memorization metrics on named sets every N optimizer steps and log them.

    At ``on_step_end`` (when ``global_step % every_n_steps == 0``; also at ``on_train_begin`` with
    ``eval_on_start=True``) the callback runs `evaluate_memorization` with the
    trainer's model on every set and logs ``{prefix}{name}_ma``, ``..._el{n}``, ``..._nll``, ``..._ppl``. The
    entry is appended to ``state.log_history`` (with ``step`` and ``epoch``, like ``Trainer.log``) and, when
    the trainer is known (``trainer=`` or `set_trainer`), sent through ``trainer.callback_handler.on_log``
    so TensorBoard / W&B / the console see it. (``Trainer.log`` itself is not called, so a trainer's running
    training-loss averages are not flushed early.) The latest values are also in `last_metrics`.

    When ``ma_threshold`` and/or ``el_threshold`` are given, training stops (``control.should_training_stop``)
    once the set ``forget_name`` has MA below ``ma_threshold`` and EL_n (first ``el_n``) below
    ``el_threshold`` -- the same rule as `StopWhenForgottenCallback`.

    Args:
        eval_datasets: ``{name: data}``; each ``data`` is anything `evaluate_memorization` accepts
            (token-id lists, tokenized ``datasets.Dataset`` with ``input_ids`` (+ ``labels``)).
        every_n_steps: Evaluate every this many optimizer steps.
        el_n: EL n-gram sizes.
        compute_el: False skips EL (MA / NLL only, much cheaper).
        batch_size: Batch size for evaluation.
        el_prefix_stride: Prefix stride for EL.
        pad_token_id: Padding id (default: the trainer's tokenizer pad id, else the model config's, else 0).
        prefix: Prefix for the logged keys (e.g. ``"eval_"`` to get ``eval_forget_ma``).
        trainer: The trainer, to forward the logs to its callbacks (``on_log``).
        eval_on_start: Also evaluate before the first step (step 0).
        ma_threshold: Optional stopping threshold on the forget set's MA.
        el_threshold: Optional stopping threshold on the forget set's EL_n.
        forget_name: Name of the set the thresholds apply to.

    Examples:
        >>> cb = UnlearningEvalCallback({"forget": [[5, 6, 7, 8]]}, every_n_steps=10, el_n=(2,))
        >>> # trainer = Trainer(..., callbacks=[cb]); cb.set_trainer(trainer); trainer.train()
    """

    def __init__(
        self,
        eval_datasets: Mapping[str, Any],
        every_n_steps: int = 50,
        el_n: int | Sequence[int] = (10,),
        compute_el: bool = True,
        batch_size: int = 8,
        el_prefix_stride: int = 1,
        pad_token_id: int | None = None,
        prefix: str = "",
        trainer: Any = None,
        eval_on_start: bool = False,
        ma_threshold: float | None = None,
        el_threshold: float | None = None,
        forget_name: str = "forget",
    ):
        if not isinstance(eval_datasets, Mapping) or not eval_datasets:
            raise ValueError(
                "`eval_datasets` must be a non-empty dict {name: token-id lists or tokenized dataset}, got "
                f"{type(eval_datasets).__name__}."
            )
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive int, got {every_n_steps!r}.")
        _check_threshold("ma_threshold", ma_threshold)
        _check_threshold("el_threshold", el_threshold)
        el_tuple = (el_n,) if isinstance(el_n, int) else tuple(el_n)
        if compute_el and not el_tuple:
            raise ValueError("`el_n` is empty; pass e.g. el_n=(10,) or compute_el=False.")
        if (ma_threshold is not None or el_threshold is not None) and forget_name not in eval_datasets:
            raise ValueError(
                f"Thresholds are set but `forget_name`={forget_name!r} is not in `eval_datasets` "
                f"({sorted(eval_datasets)})."
            )
        if el_threshold is not None and not compute_el:
            raise ValueError("`el_threshold` is set but `compute_el=False`; enable EL or drop the threshold.")
        self.eval_datasets = dict(eval_datasets)
        self.every_n_steps = every_n_steps
        self.el_n = el_tuple
        self.compute_el = compute_el
        self.batch_size = batch_size
        self.el_prefix_stride = el_prefix_stride
        self.pad_token_id = pad_token_id
        self.prefix = prefix
        self.trainer = trainer
        self.eval_on_start = eval_on_start
        self.ma_threshold = ma_threshold
        self.el_threshold = el_threshold
        self.forget_name = forget_name
        self.last_metrics: dict[str, float] = {}
        self.stop_reason: str | None = None

    def set_trainer(self, trainer: Any) -> UnlearningEvalCallback:
        """Remember the trainer so that logs also go through ``trainer.callback_handler.on_log``.

        Args:
            trainer: A ``transformers.Trainer`` (or subclass).

        Returns:
            self.
        """
        self.trainer = trainer
        return self

    def _pad_id(self, model: Any, processing_class: Any) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        for source in (processing_class, getattr(model, "config", None)):
            pad = getattr(source, "pad_token_id", None)
            if pad is not None:
                return int(pad)
        return 0

    def evaluate(self, model: Any, processing_class: Any = None) -> dict[str, float]:
        """Compute the metrics of every set now (no logging).

        Args:
            model: The model to score.
            processing_class: Optional tokenizer (for its pad id).

        Returns:
            ``{f"{prefix}{name}_{metric}": value}``.
        """
        pad = self._pad_id(model, processing_class)
        out: dict[str, float] = {}
        for name, data in self.eval_datasets.items():
            scores = evaluate_memorization(
                model,
                data,
                batch_size=self.batch_size,
                el_n=self.el_n if self.compute_el else (10,),
                el_prefix_stride=self.el_prefix_stride,
                pad_token_id=pad,
                compute_el=self.compute_el,
            )
            out.update({f"{self.prefix}{name}_{k}": v for k, v in scores.items()})
        return out

    def _run(self, args, state, control, model, processing_class) -> None:
        if model is None:
            raise ValueError("UnlearningEvalCallback needs the model; the Trainer passes it as `model=`.")
        logs = self.evaluate(model, processing_class)
        self.last_metrics = dict(logs)
        entry = dict(logs)
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append({**entry, "step": state.global_step})
        if self.trainer is not None:
            handler = self.trainer.callback_handler
            self.trainer.control = handler.on_log(args, state, control, entry)
        self._maybe_stop(state, control, logs)

    def _maybe_stop(self, state, control, logs: Mapping[str, float]) -> None:
        if self.ma_threshold is None and self.el_threshold is None:
            return
        base = f"{self.prefix}{self.forget_name}_"
        ma, el = logs.get(f"{base}ma"), logs.get(f"{base}el{self.el_n[0]}")
        if _below(ma, self.ma_threshold) and _below(el, self.el_threshold):
            parts = []
            if self.ma_threshold is not None:
                parts.append(f"{base}ma={ma:.4f} <= {self.ma_threshold:.4f}")
            if self.el_threshold is not None:
                parts.append(f"{base}el{self.el_n[0]}={el:.4f} <= {self.el_threshold:.4f}")
            self.stop_reason = "forget set forgotten: " + " and ".join(parts)
            logger.info("UnlearningEvalCallback: stopping at step %d, %s.", state.global_step, self.stop_reason)
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.eval_on_start:
            self._run(args, state, control, model, processing_class)
        return control

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step > 0 and state.global_step % self.every_n_steps == 0:
            self._run(args, state, control, model, processing_class)
        return control


class RobustnessCallback(TrainerCallback):
    """Attack the forgetting once at the end of training (`evaluate_robustness` on copies of the model).

    By default the cheap subset: the merged model reloaded in bitsandbytes nf4, the export round trips and a
    relearning LoRA measured after 5 and 15 steps. The result is in `report` (a
    [`RobustnessReport`][peft_unlearn.metrics.RobustnessReport]), a one-line verdict is logged, and
    `UnlearningTrainer`'s model card gets a "Robustness of the forgetting" section. Runs on the main process only;
    the trained model is not modified.

    Args:
        forget: The forget passages (anything `evaluate_robustness` accepts: texts, token-id lists, a tokenized
            dataset).
        heldout: Optional memorized passages never trained on (their MA is reported).
        retain: Optional retain passages.
        attacks: Attack names (see `ROBUSTNESS_ATTACKS`).
        **kwargs: Further `evaluate_robustness` options (default here: ``quantization_modes=("nf4",)``,
            ``relearn_steps=(5, 15)``).

    Examples:
        >>> cb = RobustnessCallback([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]], attacks=("export",))
        >>> # UnlearningTrainer(..., callbacks=[cb]).train(); print(cb.report.to_markdown())
    """

    def __init__(
        self,
        forget: Any,
        heldout: Any = None,
        retain: Any = None,
        attacks: Sequence[str] = ("quantization", "export", "relearning"),
        **kwargs: Any,
    ):
        from ..metrics.robustness import ROBUSTNESS_ATTACKS

        names = (attacks,) if isinstance(attacks, str) else tuple(attacks)
        unknown = [a for a in names if a not in ROBUSTNESS_ATTACKS]
        if not names or unknown:
            raise ValueError(
                f"`attacks` must name registered attacks ({', '.join(ROBUSTNESS_ATTACKS)}), got {attacks!r}."
            )
        if forget is None:
            raise ValueError("`forget` is None; pass the forget passages the attacks measure.")
        self.forget, self.heldout, self.retain, self.attacks = forget, heldout, retain, names
        self.kwargs = {"quantization_modes": ("nf4",), "relearn_steps": (5, 15), **kwargs}
        self.report: Any = None

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return control
        if model is None or processing_class is None:
            raise ValueError(
                "RobustnessCallback needs the model and its tokenizer; pass `processing_class=` to the trainer."
            )
        from ..metrics.robustness import evaluate_robustness

        self.report = evaluate_robustness(
            model, processing_class, self.forget, self.retain, self.heldout, self.attacks, **self.kwargs
        )
        bad = [k for k, v in self.report.recovered().items() if v]
        logger.warning(
            "RobustnessCallback: %s",
            f"forget MA recovered under {', '.join(bad)}" if bad else "the forgetting held under every attack tried",
        )
        return control
