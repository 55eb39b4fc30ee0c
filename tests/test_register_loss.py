"""`register_loss`: a user's own forget/retain loss runs in the trainer, logs, and appears in the model card."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig

from peft_unlearn.losses import (
    LOSS_REGISTRY,
    LossTerm,
    UnlearningLoss,
    get_loss,
    loss_names,
    nll_loss,
    reference_users,
    register_loss,
    registered_losses,
    unregister_loss,
)
from peft_unlearn.testing import TINY_CORPUS, tiny_causal_lm
from peft_unlearn.trainer import UnlearningConfig, UnlearningTrainer, collate_causal_lm, tokenize_dataset
from peft_unlearn.trainer.model_card import build_model_card
from peft_unlearn.utils import IGNORE_INDEX
from tests.helpers import quick_cpu_config

FORGET = [{"text": "Call me Ishmael. Some years ago, never mind how long precisely."}] * 2
RETAIN = [{"text": t} for t in TINY_CORPUS[:4]]


def _squared_true_prob(batch, model, reference):
    """Sum over supervised forget tokens of p(y)^2: lowers the true token's probability."""
    logits, labels = batch.logits(model, "forget"), batch.labels("forget")
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    mask = shifted != IGNORE_INDEX
    probs = logits.float().softmax(-1).gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    total = (probs**2 * mask).sum()
    count = mask.sum()
    return LossTerm(total, count, nll_loss(logits.detach(), labels))


@pytest.fixture
def squared_prob():
    spec = register_loss(
        UnlearningLoss(
            name="squared_prob",
            role="forget",
            term=_squared_true_prob,
            description="squared true-token probability (test loss)",
            options=("beta",),
        )
    )
    yield spec
    unregister_loss("forget", "squared_prob")


def _trainer(tmp_path, tokenizer, **kwargs):
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    return UnlearningTrainer(
        model,
        quick_cpu_config(tmp_path / "out", **{"max_steps": 3, "seed": 0, **kwargs}),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )


def test_registered_loss_is_selectable_and_defaults_are_derived(squared_prob, tmp_path):
    assert "squared_prob" in loss_names("forget") and get_loss("forget", "squared_prob") is squared_prob
    assert registered_losses()[-1] is squared_prob and squared_prob not in LOSS_REGISTRY
    assert squared_prob.description == "squared true-token probability (test loss)"
    assert not squared_prob.needs_reference and reference_users("squared_prob", "nll") == []
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    assert int(squared_prob.count({"forget_labels": labels}, None)) == 3  # supervised next-token positions
    config = UnlearningConfig(output_dir=str(tmp_path), report_to="none", forget_loss="squared_prob")
    assert config.beta is None  # no default_beta
    assert "squared true-token probability (test loss)" in build_model_card(forget_loss="squared_prob")


def test_unregistered_name_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"`forget_loss` must be one of .*got 'squared_prob'.*register_loss"):
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", forget_loss="squared_prob")


def test_compute_loss_runs_the_registered_term(squared_prob, tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, forget_loss="squared_prob", retain_weight=0.5)
    model = trainer.model
    forget = collate_causal_lm(tokenize_dataset(FORGET, tokenizer), pad_token_id=0)
    retain = collate_causal_lm(tokenize_dataset(RETAIN[:2], tokenizer), pad_token_id=0)
    inputs = {f"forget_{k}": v for k, v in forget.items()} | {f"retain_{k}": v for k, v in retain.items()}
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, inputs)
        # brute force in float64: mean over supervised forget tokens of p(y)^2, plus 0.5 x the retain token NLL
        logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits.double()
        total, count = 0.0, 0
        for b in range(logits.shape[0]):
            for t in range(logits.shape[1] - 1):
                y = int(forget["labels"][b, t + 1])
                if y != IGNORE_INDEX:
                    total += float(logits[b, t].softmax(-1)[y]) ** 2
                    count += 1
        r_logits = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
        expected = total / count + 0.5 * nll_loss(r_logits.double(), retain["labels"]).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_registered_loss_trains_logs_and_lowers_what_it_targets(squared_prob, tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, forget_loss="squared_prob", retain_loss=None, learning_rate=5e-2)
    trainer.train()
    logs = [row["forget_loss"] for row in trainer.state.log_history if "forget_loss" in row]
    assert len(logs) == 3 and logs[-1] < logs[0]
    assert all("forget_nll" in row for row in trainer.state.log_history if "forget_loss" in row)


def test_registered_loss_with_a_reference_gets_the_initial_model(tmp_path, tokenizer):
    seen = []

    def reference(batch, ref_model):
        logits = batch.logits(ref_model, "forget")
        seen.append(logits)
        return logits

    def term(batch, model, ref_logits):
        logits, labels = batch.logits(model, "forget"), batch.labels("forget")
        total = -((logits.float() - ref_logits.float()) ** 2).sum()  # move away from the initial model
        count = batch.supervised_count("forget")
        return LossTerm(total, count, nll_loss(logits.detach(), labels))

    register_loss(UnlearningLoss(name="drift", role="forget", term=term, reference=reference))
    try:
        assert reference_users("drift", None) == ["forget_loss='drift'"]
        trainer = _trainer(tmp_path, tokenizer, forget_loss="drift", retain_loss=None, max_steps=2)
        base = trainer.model
        batch = collate_causal_lm(tokenize_dataset(FORGET, tokenizer), pad_token_id=0)
        with torch.no_grad(), base.disable_adapter():
            base.eval()
            expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trainer.train()
        assert len(seen) == 2 and not seen[0].requires_grad
        torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)  # step 1: the model before training
        torch.testing.assert_close(seen[1], expected, atol=1e-5, rtol=1e-5)  # step 2: still the initial model
    finally:
        unregister_loss("forget", "drift")


def test_option_warnings_follow_the_registry(squared_prob, tmp_path):
    with warnings.catch_warnings():  # the registered loss declares `beta`: setting it does not warn
        warnings.simplefilter("error", UserWarning)
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", forget_loss="squared_prob", beta=0.5)
    with pytest.warns(UserWarning, match=r"`beta`=0.5 is ignored: only .*'npo'.*'simnpo'.*'squared_prob' uses it"):
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", forget_loss="gradient_ascent", beta=0.5)


def test_registered_retain_loss(tmp_path, tokenizer):
    def half_nll(batch, model, reference):
        logits, labels = batch.logits(model, "retain"), batch.labels("retain")
        total = 0.5 * nll_loss(logits, labels, reduction="sum")
        count = batch.supervised_count("retain")
        return LossTerm(total, count, 2 * total.detach() / count.clamp_min(1))

    register_loss(UnlearningLoss(name="half_nll", role="retain", term=half_nll))
    try:
        trainer = _trainer(tmp_path, tokenizer, retain_loss="half_nll", max_steps=1)
        trainer.train()
        row = next(r for r in trainer.state.log_history if "retain_loss" in r)
        assert row["retain_loss"] == pytest.approx(0.5 * row["retain_nll"], rel=1e-4)
    finally:
        unregister_loss("retain", "half_nll")


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"name": "my loss"}, ValueError, "`name` must be a Python identifier"),
        ({"role": "both"}, ValueError, "`role` must be 'forget' or 'retain', got 'both'"),
        ({"normalization": "chars"}, ValueError, "`normalization` must be 'tokens' or 'sequences'.*`count=`"),
        ({"term": "not callable"}, TypeError, "`term` must be callable, got str"),
        ({"reference": 3}, TypeError, "`reference` must be callable, got int"),
        ({"options": "beta"}, TypeError, "`options` must be a tuple of config field names"),
        ({"role": "retain", "name": "none"}, ValueError, "'none' is reserved"),
    ],
)
def test_bad_loss_entries_are_refused(kwargs, error, fragment):
    spec = {"name": "mine", "role": "forget", "term": _squared_true_prob, **kwargs}
    with pytest.raises(error, match=fragment):
        UnlearningLoss(**spec)


def test_register_refuses_builtins_duplicates_and_other_types(squared_prob):
    with pytest.raises(ValueError, match="forget_loss='npo' is a built-in loss and cannot be replaced"):
        register_loss(UnlearningLoss(name="npo", role="forget", term=_squared_true_prob))
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_loss(UnlearningLoss(name="squared_prob", role="forget", term=_squared_true_prob))
    other = register_loss(UnlearningLoss(name="squared_prob", role="forget", term=_squared_true_prob), replace=True)
    assert get_loss("forget", "squared_prob") is other
    with pytest.raises(TypeError, match="register_loss\\(\\) takes an UnlearningLoss, got dict"):
        register_loss({"name": "x"})
    with pytest.raises(ValueError, match="forget_loss='npo' is a built-in loss and cannot be removed"):
        unregister_loss("forget", "npo")
    with pytest.raises(ValueError, match="forget_loss='nothing' is not a registered loss"):
        unregister_loss("forget", "nothing")
