"""Tests for peft_unlearn.trainer.callbacks with a real transformers.Trainer on a tiny llama."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from peft_unlearn.metrics import compute_ma_metrics, evaluate_memorization, preprocess_logits_for_ma
from peft_unlearn.trainer.callbacks import StopWhenForgottenCallback, UnlearningEvalCallback

SEQ_LEN = 8


def _token_rows(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, SEQ_LEN), generator=g).tolist()


def _dataset(n: int, seed: int) -> Dataset:
    rows = _token_rows(n, seed)
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * SEQ_LEN] * n, "labels": rows})


def _args(tmp_path, **overrides) -> TrainingArguments:
    kw = {
        "output_dir": str(tmp_path),
        "max_steps": 10,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    kw.update(overrides)
    return TrainingArguments(**kw)


class MemorizationTrainer(Trainer):
    """What UnlearningTrainer.evaluate does: eval_{name}_{ma, el2, nll, ppl} for every eval set."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = {}
        for name, data in self.eval_dataset.items():
            scores = evaluate_memorization(self.model, data, el_n=(2,), batch_size=4)
            metrics.update({f"{metric_key_prefix}_{name}_{k}": v for k, v in scores.items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class RecordLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


# ------------------------------------------------------------------------------------------------ Stop... unit


def _evaluate(cb, metrics, step=1):
    state, control = TrainerState(), TrainerControl()
    state.global_step = step
    cb.on_evaluate(None, state, control, metrics=metrics)
    return control.should_training_stop


def test_stop_rule_needs_both_thresholds():
    cb = StopWhenForgottenCallback(ma_threshold=0.3, el_threshold=0.05)
    assert not _evaluate(cb, {"eval_forget_ma": 0.2, "eval_forget_el10": 0.06})
    assert not _evaluate(cb, {"eval_forget_ma": 0.31, "eval_forget_el10": 0.01})  # MA above its threshold
    assert cb.stop_reason is None
    assert _evaluate(cb, {"eval_forget_ma": 0.29, "eval_forget_el10": 0.04}, step=7)
    assert cb.stopped_at_step == 7
    assert "eval_forget_ma=0.2900 <= 0.3000" in cb.stop_reason and "eval_forget_el10" in cb.stop_reason


def test_stop_rule_single_threshold_nan_and_missing(caplog):
    ma_only = StopWhenForgottenCallback(ma_threshold=0.5)
    assert _evaluate(ma_only, {"eval_forget_ma": 0.4})
    assert not _evaluate(ma_only, {"eval_forget_ma": float("nan")})
    el_only = StopWhenForgottenCallback(el_threshold=0.1, el_n=2, forget_prefix="forget_")
    assert _evaluate(el_only, {"forget_el2": 0.05})
    both = StopWhenForgottenCallback(ma_threshold=0.5, el_threshold=0.1)
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.trainer.callbacks"):
        assert not _evaluate(both, {"eval_forget_ma": 0.1})  # EL missing: do not stop
    assert "eval_forget_el10 missing" in caplog.text
    assert not _evaluate(both, {"eval_retain_ma": 0.0})  # another eval set: ignored


def test_stop_rule_reference_first_evaluation():
    cb = StopWhenForgottenCallback(reference_set="heldout")
    first = {"eval_heldout_ma": 0.3, "eval_heldout_el10": 0.05, "eval_forget_ma": 0.9, "eval_forget_el10": 0.5}
    assert not _evaluate(cb, first)
    assert cb.thresholds() == (0.3, 0.05)
    # later heldout scores are ignored in "first" mode
    assert _evaluate(
        cb, {"eval_heldout_ma": 0.01, "eval_heldout_el10": 0.0, "eval_forget_ma": 0.2, "eval_forget_el10": 0.04}
    )
    assert cb.thresholds() == (0.3, 0.05)


def test_stop_rule_reference_current_and_per_dataset_calls():
    cb = StopWhenForgottenCallback(reference_set="heldout", reference_mode="current")
    # a stock Trainer calls on_evaluate once per eval set
    assert not _evaluate(cb, {"eval_heldout_ma": 0.3, "eval_heldout_el10": 0.05})
    assert _evaluate(cb, {"eval_forget_ma": 0.2, "eval_forget_el10": 0.04})
    assert not _evaluate(
        cb, {"eval_heldout_ma": 0.1, "eval_heldout_el10": 0.01, "eval_forget_ma": 0.2, "eval_forget_el10": 0.04}
    )
    # an explicit threshold wins over the reference
    cb = StopWhenForgottenCallback(ma_threshold=0.9, reference_set="heldout", reference_mode="current")
    assert _evaluate(
        cb, {"eval_heldout_ma": 0.1, "eval_heldout_el10": 0.05, "eval_forget_ma": 0.5, "eval_forget_el10": 0.04}
    )


def test_stop_rule_without_reference_scores_does_not_stop(caplog):
    cb = StopWhenForgottenCallback(reference_set="heldout")
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.trainer.callbacks"):
        assert not _evaluate(cb, {"eval_forget_ma": 0.0, "eval_forget_el10": 0.0})
    assert "no 'heldout' scores" in caplog.text


def test_stop_callback_errors():
    with pytest.raises(ValueError, match="ma_threshold"):
        StopWhenForgottenCallback()
    with pytest.raises(ValueError, match="reference_mode"):
        StopWhenForgottenCallback(reference_set="heldout", reference_mode="last")
    with pytest.raises(ValueError, match="ma_threshold"):
        StopWhenForgottenCallback(ma_threshold="low")
    with pytest.raises(ValueError, match="el_n"):
        StopWhenForgottenCallback(ma_threshold=0.1, el_n=0)


# ------------------------------------------------------------------------------------------------ with a Trainer


def test_stop_callback_stops_a_real_trainer_early(tmp_path, tiny_llama):
    cb = StopWhenForgottenCallback(ma_threshold=1.01, el_threshold=1.01, el_n=2)  # always satisfied
    trainer = MemorizationTrainer(
        model=tiny_llama,
        args=_args(tmp_path, eval_strategy="steps", eval_steps=2),
        train_dataset=_dataset(8, 0),
        eval_dataset={"forget": _token_rows(3, 1)},
        callbacks=[cb],
    )
    trainer.train()
    assert trainer.state.global_step == 2 < trainer.args.max_steps
    assert cb.stopped_at_step == 2
    assert any("eval_forget_el2" in entry for entry in trainer.state.log_history)


def test_stop_callback_does_not_stop_when_thresholds_not_met(tmp_path, tiny_llama):
    cb = StopWhenForgottenCallback(ma_threshold=-1.0, el_threshold=-1.0, el_n=2)  # never satisfied
    trainer = MemorizationTrainer(
        model=tiny_llama,
        args=_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=_dataset(8, 0),
        eval_dataset={"forget": _token_rows(3, 1)},
        callbacks=[cb],
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert cb.stop_reason is None


def test_stop_callback_with_stock_trainer_and_compute_metrics(tmp_path, tiny_llama):
    cb = StopWhenForgottenCallback(ma_threshold=1.01)
    trainer = Trainer(
        model=tiny_llama,
        args=_args(tmp_path, eval_strategy="steps", eval_steps=3),
        train_dataset=_dataset(8, 0),
        eval_dataset={"retain": _dataset(4, 2), "forget": _dataset(4, 1)},
        compute_metrics=compute_ma_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_ma,
        callbacks=[cb],
    )
    trainer.train()
    assert trainer.state.global_step == 3
    forget_ma = [e["eval_forget_ma"] for e in trainer.state.log_history if "eval_forget_ma" in e]
    expected = evaluate_memorization(tiny_llama, _dataset(4, 1), compute_el=False)["ma"]
    assert forget_ma[-1] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ UnlearningEval


def test_eval_callback_logs_into_history_and_on_log(tmp_path, tiny_llama):
    sets = {"forget": _token_rows(3, 1), "retain": _dataset(2, 2)}
    cb = UnlearningEvalCallback(sets, every_n_steps=2, el_n=(2,), batch_size=2, eval_on_start=True)
    recorder = RecordLogs()
    trainer = Trainer(
        model=tiny_llama,
        args=_args(tmp_path, max_steps=4),
        train_dataset=_dataset(8, 0),
        callbacks=[cb, recorder],
    )
    cb.set_trainer(trainer)
    trainer.train()
    entries = [e for e in trainer.state.log_history if "forget_ma" in e]
    assert [e["step"] for e in entries] == [0, 2, 4]
    keys = {
        "forget_ma",
        "forget_el2",
        "forget_nll",
        "forget_ppl",
        "retain_ma",
        "retain_el2",
        "retain_nll",
        "retain_ppl",
    }
    assert keys <= set(entries[-1])
    assert sum(1 for logs in recorder.logs if "forget_ma" in logs) == 3  # went through on_log
    final = evaluate_memorization(trainer.model, sets["forget"], el_n=(2,))  # the model at step 4
    assert entries[-1]["forget_ma"] == pytest.approx(final["ma"])
    assert entries[-1]["forget_el2"] == pytest.approx(final["el2"])
    assert cb.last_metrics["forget_nll"] == pytest.approx(final["nll"], rel=1e-5)
    assert all(math.isfinite(entries[-1][k]) for k in keys)


def test_eval_callback_stops_training(tmp_path, tiny_llama):
    cb = UnlearningEvalCallback(
        {"forget": _token_rows(2, 1)}, every_n_steps=2, compute_el=False, ma_threshold=1.01, prefix="eval_"
    )
    trainer = Trainer(model=tiny_llama, args=_args(tmp_path), train_dataset=_dataset(8, 0), callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 2
    assert "eval_forget_ma" in cb.stop_reason
    assert any("eval_forget_ma" in e for e in trainer.state.log_history)


def test_eval_callback_errors():
    with pytest.raises(ValueError, match="eval_datasets"):
        UnlearningEvalCallback({})
    with pytest.raises(ValueError, match="every_n_steps"):
        UnlearningEvalCallback({"forget": [[1, 2]]}, every_n_steps=0)
    with pytest.raises(ValueError, match="forget_name"):
        UnlearningEvalCallback({"retain": [[1, 2]]}, ma_threshold=0.1)
    with pytest.raises(ValueError, match="compute_el"):
        UnlearningEvalCallback({"forget": [[1, 2]]}, el_threshold=0.1, compute_el=False)
    with pytest.raises(ValueError, match="el_n"):
        UnlearningEvalCallback({"forget": [[1, 2]]}, el_n=())


def test_threshold_is_at_or_below():
    from peft_unlearn.trainer.callbacks import _below

    assert _below(0.0, 0.0)  # a never-seen EL10 of exactly 0 can be reached
    assert _below(0.1, 0.2) and not _below(0.3, 0.2)
    assert not _below(float("nan"), 0.2) and not _below(None, 0.2)
    assert _below(0.9, None)


# ----------------------------------------------------------------------------------------------
# RobustnessCallback
# ----------------------------------------------------------------------------------------------
def test_robustness_callback_reports_and_fills_the_model_card(tmp_path, tokenizer):
    """At the end of training the callback attacks the trained model (its numbers are `evaluate_robustness`'s on
    the same model) and `UnlearningTrainer` writes them into the model card."""
    from peft import LoraConfig, get_peft_model

    from peft_unlearn.metrics import evaluate_robustness
    from peft_unlearn.testing import TINY_CORPUS, tiny_causal_lm
    from peft_unlearn.trainer import RobustnessCallback, UnlearningTrainer
    from tests.helpers import quick_cpu_config

    model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)), LoraConfig(r=2, target_modules="all-linear")
    )
    forget = _token_rows(4, seed=3)
    options = {"relearn_steps": (1, 2), "el_n": 2, "el_prefix_stride": 4}
    callback = RobustnessCallback(forget, attacks=("export", "relearning"), **options)
    args = quick_cpu_config(tmp_path / "out", max_steps=2, forget_loss="inverted_hinge", retain_loss="nll")
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=[{"text": t} for t in TINY_CORPUS[:2]],
        retain_dataset=[{"text": t} for t in TINY_CORPUS[2:4]],
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    assert callback.report is not None
    expected = evaluate_robustness(model, tokenizer, forget, attacks=("export", "relearning"), **options)
    assert [r.unlearned_after for r in callback.report.rows] == pytest.approx(
        [r.unlearned_after for r in expected.rows], abs=1e-6
    )
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "## Robustness of the forgetting" in card
    assert "| relearning | steps=2 |" in card and "| export | portable adapter |" in card


def test_robustness_callback_bad_arguments():
    from peft_unlearn.trainer import RobustnessCallback

    with pytest.raises(ValueError, match="`attacks`"):
        RobustnessCallback([[1, 2, 3]], attacks=("nope",))
    with pytest.raises(ValueError, match="`forget` is None"):
        RobustnessCallback(None)
