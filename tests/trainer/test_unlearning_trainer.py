"""Tests of UnlearningTrainer on tiny offline models (CPU, a few steps each)."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertModel, TrainingArguments

from peft_unlearn.losses import nll_loss, reference_users, rmu_control_vector
from peft_unlearn.testing import TINY_CORPUS, tiny_causal_lm, tiny_tokenizer
from peft_unlearn.trainer import (
    UnlearningConfig,
    UnlearningTrainer,
    collate_causal_lm,
    tokenize_dataset,
)
from tests.helpers import quick_cpu_config

FORGET = [
    {"prompt": "Question: Where was the author born? Answer:", "completion": " She was born in Paris."},
    {"prompt": "Question: What does Jane Doe write?", "completion": " Mystery novels, mostly."},
    {"prompt": "Question: When was she born?", "completion": " In 1970."},
    {"prompt": "Question: Who is Ishmael?", "completion": " A sailor who tells the story of a whale hunt."},
]
RETAIN = [{"text": t} for t in TINY_CORPUS]


def _args(tmp_path, **kwargs) -> UnlearningConfig:
    return quick_cpu_config(str(tmp_path / "out"), **{"max_steps": 5, "seed": 0, **kwargs})


def _lora(r: int = 4, **kwargs) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", **kwargs)


def _token_nll(model, examples) -> float:
    """Independent token NLL of tokenized examples (eval mode, one padded batch)."""
    batch = collate_causal_lm(examples, pad_token_id=0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    return nll_loss(logits, batch["labels"]).item()


@pytest.fixture(scope="module")
def memorized_state(tokenizer):
    """A tiny llama fine-tuned until it memorizes the forget and retain sets (so unlearning has work to do)."""
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    examples = tokenize_dataset(FORGET, tokenizer, completion_only_loss=False) + tokenize_dataset(RETAIN, tokenizer)
    batch = collate_causal_lm(examples, pad_token_id=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nll_loss(logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def memorized(tokenizer, memorized_state):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model.load_state_dict(memorized_state)
    return model.eval()


def _lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------------------------------------
# every loss combination unlearns
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retain_loss", ["nll", "kl", None])
@pytest.mark.parametrize("forget_loss", ["inverted_hinge", "gradient_ascent", "npo", "simnpo", "idk"])
def test_every_combination_unlearns(tmp_path, tokenizer, memorized, forget_loss, retain_loss):
    forget_examples = tokenize_dataset(FORGET, tokenizer)
    before = _token_nll(memorized, forget_examples)
    trainer = UnlearningTrainer(
        memorized,
        _args(tmp_path, forget_loss=forget_loss, retain_loss=retain_loss, learning_rate=2e-2),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora(r=8),
    )
    trainer.train()
    after = _token_nll(trainer.model, forget_examples)
    assert after > before + 1.0, f"forget NLL {before:.3f} -> {after:.3f}"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 5
    for h in logs:
        assert "forget_loss" in h and "forget_nll" in h
        assert ("retain_loss" in h and "retain_nll" in h) == (retain_loss is not None)
    # forget_nll logged at step 1 is the NLL of the (memorized) forget set before any update
    assert logs[0]["forget_nll"] == pytest.approx(before, abs=0.05)


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation is exact
# ---------------------------------------------------------------------------------------------------------------


def _one_sgd_step(tmp_path, tokenizer, batch_size, accumulation, forget_loss, retain_loss, naive=False, **extra):
    torch.manual_seed(0)
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model = get_peft_model(base, _lora(init_lora_weights=False))  # random B: every LoRA factor gets a gradient
    args = _args(
        tmp_path,
        forget_loss=forget_loss,
        retain_loss=retain_loss,
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        retain_pairing="cycle",
        **extra,
    )
    # random B: the adapter is not a no-op, so losses with a reference get an explicit frozen copy of the start
    ref = copy.deepcopy(model) if reference_users(forget_loss, retain_loss) else None
    trainer = UnlearningTrainer(
        model, args, forget_dataset=FORGET, retain_dataset=RETAIN[:4], processing_class=tokenizer, ref_model=ref
    )
    before = _lora_params(trainer.model)
    if naive:  # per-micro-batch means averaged over micro-batches: what exact accumulation must differ from
        trainer.get_batch_samples = lambda it, n, dev: (
            UnlearningTrainer.get_batch_samples(trainer, it, n, dev)[0],
            None,
        )
        trainer.loss_is_scaled_for_ga = False
    trainer.train()
    after = _lora_params(trainer.model)
    return {n: after[n] - before[n] for n in before}


@pytest.mark.parametrize(
    ("forget_loss", "retain_loss", "extra"),
    [
        ("inverted_hinge", "nll", {}),
        ("gradient_ascent", "kl", {}),
        ("npo", "nll", {}),
        ("simnpo", None, {"beta": 0.05}),  # the default beta saturates the sigmoid on a random model (no gradient)
        ("idk", "nll", {}),
        ("rmu", "rmu", {"rmu_layer": 1, "rmu_steering_coeff": 20.0}),
    ],
)
def test_gradient_accumulation_equivalence(tmp_path, tokenizer, forget_loss, retain_loss, extra):
    full = _one_sgd_step(tmp_path, tokenizer, 4, 1, forget_loss, retain_loss, **extra)
    accumulated = _one_sgd_step(tmp_path, tokenizer, 2, 2, forget_loss, retain_loss, **extra)
    assert max(d.abs().max().item() for d in full.values()) > 1e-3  # the step is not trivial
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], atol=1e-6, rtol=1e-5, msg=name)


def test_naive_accumulation_would_differ(tmp_path, tokenizer):
    """The forget/retain micro-batches have unequal token counts, so the mean of means is not the exact mean."""
    full = _one_sgd_step(tmp_path, tokenizer, 4, 1, "inverted_hinge", "nll")
    naive = _one_sgd_step(tmp_path, tokenizer, 2, 2, "inverted_hinge", "nll", naive=True)
    assert max((naive[n] - full[n]).abs().max().item() for n in full) > 1e-4


def _layer_states(model, examples, layer):
    """Hidden states of decoder layer `layer` on the supervised tokens of `examples` ([n_tokens, d])."""
    batch = collate_causal_lm(examples, pad_token_id=0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer + 1][batch["labels"] != -100].float()


def _rmu_run(tmp_path, tokenizer, state, retain_loss, layer, coeff):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model.load_state_dict(state)
    args = _args(
        tmp_path,
        forget_loss="rmu",
        retain_loss=retain_loss,
        retain_weight=10.0,  # RMU's alpha
        rmu_layer=layer,
        rmu_steering_coeff=coeff,
        max_steps=10,
    )
    trainer = UnlearningTrainer(
        model.eval(),
        args,
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora(r=8),
    )
    trainer.train()
    return trainer


def test_rmu_moves_forget_activations_and_keeps_retain(tmp_path, tokenizer, memorized_state):
    """RMU through the registry: forget activations approach c * u; the retain term keeps retain activations."""
    layer, coeff = 1, 20.0
    forget_examples, retain_examples = tokenize_dataset(FORGET, tokenizer), tokenize_dataset(RETAIN, tokenizer)
    initial = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    initial.load_state_dict(memorized_state)
    initial.eval()
    target = rmu_control_vector(initial.config.hidden_size, coeff, seed=0)
    forget_before = (_layer_states(initial, forget_examples, layer) - target).pow(2).mean().item()
    retain_before = _layer_states(initial, retain_examples, layer)
    drift = {}
    for retain_loss in ("rmu", None):
        trainer = _rmu_run(tmp_path / str(retain_loss), tokenizer, memorized_state, retain_loss, layer, coeff)
        model = trainer.model.eval()
        forget_after = (_layer_states(model, forget_examples, layer) - target).pow(2).mean().item()
        assert forget_after < 0.7 * forget_before, f"forget MSE to c*u {forget_before:.3f} -> {forget_after:.3f}"
        drift[retain_loss] = (_layer_states(model, retain_examples, layer) - retain_before).pow(2).mean().item()
        logs = [h for h in trainer.state.log_history if "forget_loss" in h]
        assert logs[-1]["forget_loss"] < logs[0]["forget_loss"]
        if retain_loss is not None:
            assert logs[0]["retain_loss"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts at the reference model
    assert drift["rmu"] < 0.5 * drift[None], f"retain drift with / without the RMU retain term: {drift}"


def test_rmu_layer_out_of_range(tmp_path, tokenizer):
    trainer = UnlearningTrainer(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        _args(tmp_path, forget_loss="rmu", retain_loss=None, rmu_layer=7, max_steps=1),
        forget_dataset=FORGET,
        processing_class=tokenizer,
        peft_config=_lora(),
    )
    with pytest.raises(ValueError, match=r"rmu_layer=7 is out of range: the model has 2 decoder layers"):
        trainer.train()


# ---------------------------------------------------------------------------------------------------------------
# reference adapter, saving, resuming
# ---------------------------------------------------------------------------------------------------------------


def test_reference_is_the_disabled_adapter_model_and_nothing_extra_is_saved(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), _lora())
    ids = torch.tensor([tokenizer("Jane Doe was born in Paris in 1970.")["input_ids"]])
    with torch.no_grad():
        initial = model(input_ids=ids).logits
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = UnlearningTrainer(
        model,
        _args(tmp_path, forget_loss="npo", retain_loss="kl", max_steps=3, learning_rate=5e-2),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
    )
    trainer.train()
    model.eval()
    with torch.no_grad():
        current = model(input_ids=ids).logits
        with trainer.reference_model() as ref:
            reference = ref(input_ids=ids).logits
    assert (current - initial).abs().max().item() > 1e-3  # the adapter was trained
    torch.testing.assert_close(reference, initial, atol=1e-5, rtol=1e-5)
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").exists()
    assert [p.name for p in out.iterdir() if p.is_dir()] == []
    card = (out / "README.md").read_text()
    assert "peft-unlearn" in card and "npo" in card and "arxiv.org/abs/2408.06621" in card
    # the saved adapter reloads on a fresh base and reproduces the trained logits
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama", vocab_size=len(tokenizer)), str(out))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, current, atol=1e-5, rtol=1e-5)


def test_reference_needs_ref_model_when_the_adapter_already_changes_the_model(tmp_path, tokenizer):
    model = get_peft_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), _lora(init_lora_weights=False))
    with pytest.raises(ValueError, match=r"forget_loss='npo' uses the model with adapters disabled.*non-zero lora_B"):
        _make(tmp_path, tokenizer, model=model, args=_args(tmp_path, forget_loss="npo"))
    _make(tmp_path, tokenizer, model=model, args=_args(tmp_path, forget_loss="npo"), ref_model=copy.deepcopy(model))
    _make(tmp_path, tokenizer, model=model, args=_args(tmp_path))  # IHL needs no reference


@pytest.mark.parametrize(("forget_loss", "retain_loss"), [("inverted_hinge", "nll"), ("npo", "kl")])
def test_resume_equivalence(tmp_path, tokenizer, forget_loss, retain_loss):
    def make():
        torch.manual_seed(0)
        return tiny_causal_lm("llama", vocab_size=len(tokenizer))

    def trainer_for(model):
        args = _args(
            tmp_path,
            forget_loss=forget_loss,
            retain_loss=retain_loss,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            learning_rate=1e-2,
        )
        return UnlearningTrainer(
            model, args, forget_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer, peft_config=_lora()
        )

    straight = trainer_for(make())
    straight.train()  # 4 steps = 2 epochs of 2 steps (random pairing redrawn in epoch 2)
    expected = _lora_params(straight.model)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    assert [p.name for p in checkpoint.iterdir() if p.is_dir()] == []  # no helper adapter
    assert straight.train_dataset.epoch == 1

    resumed = trainer_for(make())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    got = _lora_params(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_memorization_metrics(tmp_path, tokenizer, memorized):
    trainer = UnlearningTrainer(
        memorized,
        _args(tmp_path, eval_el_n=[2, 3], per_device_eval_batch_size=3),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora(),
        eval_dataset={"forget": FORGET, "retain": RETAIN[:3]},
    )
    metrics = trainer.evaluate()
    for name in ("forget", "retain"):
        for key in ("loss", "ma", "el2", "el3", "nll", "ppl"):
            assert f"eval_{name}_{key}" in metrics, f"eval_{name}_{key} missing from {sorted(metrics)}"
    expected_nll = _token_nll(trainer.model, tokenize_dataset(FORGET, tokenizer))
    assert metrics["eval_forget_nll"] == pytest.approx(expected_nll, abs=1e-4)
    assert metrics["eval_forget_ppl"] == pytest.approx(torch.tensor(expected_nll).exp().item(), rel=1e-3)
    assert metrics["eval_forget_ma"] > 0.8  # memorized
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"eval_forget_ma", "eval_retain_nll"} <= logged

    single = trainer.evaluate(eval_dataset=FORGET[:2])
    assert "eval_forget_ma" in single and "eval_forget_loss" in single


def test_best_model_metric(tmp_path, tokenizer):
    args = _args(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_forget_ma",
        greater_is_better=False,
        eval_compute_el=False,
    )
    trainer = UnlearningTrainer(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args,
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora(),
        eval_dataset=FORGET,
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint is not None
    assert trainer.state.best_metric is not None
    with pytest.raises(ValueError, match=r"no `eval_loss`.*metric_for_best_model"):
        UnlearningTrainer(
            tiny_causal_lm("llama", vocab_size=len(tokenizer)),
            _args(tmp_path, eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True),
            forget_dataset=FORGET,
            retain_dataset=RETAIN,
            processing_class=tokenizer,
            peft_config=_lora(),
            eval_dataset=FORGET,
        )


# ---------------------------------------------------------------------------------------------------------------
# other features
# ---------------------------------------------------------------------------------------------------------------


def test_activation_checkpointing_matches(tmp_path, tokenizer):
    def run(checkpointing):
        torch.manual_seed(0)
        model = get_peft_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), _lora(init_lora_weights=False))
        trainer = UnlearningTrainer(
            model,
            _args(tmp_path, max_steps=2, activation_checkpointing=checkpointing, forget_loss="npo", retain_loss="kl"),
            forget_dataset=FORGET,
            retain_dataset=RETAIN,
            processing_class=tokenizer,
            ref_model=copy.deepcopy(model),  # random B: the disabled-adapter model is not the starting model
        )
        trainer.train()
        return _lora_params(trainer.model)

    plain, checkpointed = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_and_kl_parity_mode(tmp_path, tokenizer):
    trainer = UnlearningTrainer(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        _args(tmp_path, max_steps=2, bf16=True, forget_loss="npo", retain_loss="kl", kl_mask="none"),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora(),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(torch.isfinite(torch.tensor([h["loss"], h["forget_nll"], h["retain_loss"]])).all() for h in logs)


def test_fila_initialisation_reference_and_saving(tmp_path, tokenizer):
    fila = pytest.importorskip("peft_unlearn.fila")
    torch.manual_seed(0)
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    ids = torch.tensor([tokenizer("Jane Doe was born in Paris in 1970.")["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    trainer = UnlearningTrainer(
        base,
        _args(tmp_path, forget_loss="npo", retain_loss="kl", max_steps=2, save_strategy="steps", save_steps=2),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora(init_lora_weights="fila"),
    )
    assert fila.pending_data_driven_adapters(trainer.model) == ["default"]
    trainer.train()
    assert fila.pending_data_driven_adapters(trainer.model) == []
    assert trainer.fila_stats["default"]["num_layers"] > 0
    assert "fila_seconds" in trainer.state.log_history[0]
    model = trainer.model.eval()
    with torch.no_grad():
        current = model(input_ids=ids).logits
        with trainer.reference_model() as ref:  # adapters disabled == the original model (base untouched)
            torch.testing.assert_close(ref(input_ids=ids).logits, base_logits, atol=0, rtol=0)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "_fila_init").is_dir()
    trainer.save_model(str(tmp_path / "final"))  # portable plain LoRA
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama", vocab_size=len(tokenizer)), str(tmp_path / "final"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, current, atol=1e-5, rtol=1e-5)
    assert "fila" in (tmp_path / "final" / "README.md").read_text()


def test_fila_push_uses_portable_adapter(tmp_path, tokenizer, monkeypatch):
    pytest.importorskip("peft_unlearn.fila")
    import json

    import transformers.trainer

    uploads = []

    class _Done:
        def done(self):
            return True

    class _FakeApi:
        def upload_folder(self, **kwargs):
            uploads.append(kwargs)
            return _Done()

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: _FakeApi())
    trainer = UnlearningTrainer(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        _args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora(init_lora_weights="fila"),
    )
    trainer.train()
    trainer.hub_model_id = "user/unlearned"
    trainer.push_in_progress = None  # set by init_hf_repo when push_to_hub=True (needs the network)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["init_lora_weights"] == "fila"
    trainer._push_from_checkpoint(str(checkpoint))
    pushed = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert pushed["init_lora_weights"] is True and pushed["r"] == 8  # portable rank-2r plain LoRA
    assert uploads and uploads[0]["folder_path"] == str(tmp_path / "out")
    assert "_*" in uploads[0]["ignore_patterns"]

    with pytest.raises(ValueError, match=r"hub_strategy='checkpoint' uploads raw FILA checkpoints"):
        UnlearningTrainer(
            tiny_causal_lm("llama", vocab_size=len(tokenizer)),
            _args(tmp_path, push_to_hub=True, hub_strategy="checkpoint", hub_model_id="user/x"),
            forget_dataset=FORGET,
            retain_dataset=RETAIN,
            processing_class=tokenizer,
            peft_config=_lora(init_lora_weights="fila"),
        )


def test_full_model_with_ref_model_and_model_path(tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    ref = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    ref_before = {n: p.clone() for n, p in ref.named_parameters()}
    trainer = UnlearningTrainer(
        str(base_dir),  # loaded with AutoModelForCausalLM, tokenizer from the same folder
        _args(tmp_path, forget_loss="npo", retain_loss="kl", max_steps=2),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        ref_model=ref,
    )
    trainer.train()
    assert all(torch.equal(p, ref_before[n]) for n, p in ref.named_parameters())
    assert not any(p.requires_grad for p in ref.parameters())
    changed = any(not torch.equal(p, ref_before[n]) for n, p in trainer.model.named_parameters())
    assert changed


def test_tokenizer_without_pad_token(tmp_path, caplog):
    tok = tiny_tokenizer(pad_token=False)
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.trainer.formats"):
        trainer = UnlearningTrainer(
            tiny_causal_lm("llama", vocab_size=len(tok)),
            _args(tmp_path, max_steps=1),
            forget_dataset=FORGET,
            retain_dataset=RETAIN,
            processing_class=tok,
            peft_config=_lora(),
        )
    assert "no pad token" in caplog.text
    assert tok.pad_token_id == tok.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[2]])
    padded = batch["forget_attention_mask"] == 0
    assert padded.any()
    assert (batch["forget_input_ids"][padded] == tok.eos_token_id).all()
    assert (batch["forget_labels"][padded] == -100).all()
    trainer.train()


def test_conversational_and_plain_training_arguments(tmp_path, tokenizer):
    messages = [
        {"messages": [{"role": "user", "content": "Who wrote it?"}, {"role": "assistant", "content": " Jane Doe."}]}
    ] * 2
    plain = TrainingArguments(
        output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, max_steps=1, per_device_train_batch_size=2
    )
    trainer = UnlearningTrainer(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        plain,
        forget_dataset=messages,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora(),
    )
    assert isinstance(trainer.args, UnlearningConfig) and trainer.args.forget_loss == "inverted_hinge"
    trainer.train()
    assert trainer.state.global_step == 1


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def _make(tmp_path, tokenizer, model=None, args=None, **kwargs):
    kwargs.setdefault("forget_dataset", FORGET)
    kwargs.setdefault("retain_dataset", RETAIN)
    kwargs.setdefault("processing_class", tokenizer)
    return UnlearningTrainer(
        model if model is not None else tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args if args is not None else _args(tmp_path),
        **kwargs,
    )


def test_error_empty_forget_dataset(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"The forget dataset is empty"):
        _make(tmp_path, tokenizer, forget_dataset=[], peft_config=_lora())
    with pytest.raises(ValueError, match=r"`forget_dataset` is required"):
        _make(tmp_path, tokenizer, forget_dataset=None, peft_config=_lora())


def test_error_retain_loss_without_retain_dataset(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"retain_loss='nll' needs a `retain_dataset`.*retain_loss=None"):
        _make(tmp_path, tokenizer, retain_dataset=None, peft_config=_lora())


def test_error_unrecognised_columns(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"retain dataset has no recognised columns \(found: \['body'\]\)"):
        _make(tmp_path, tokenizer, retain_dataset=[{"body": "x"}], peft_config=_lora())


def test_error_all_labels_truncated(tmp_path, tokenizer):
    with pytest.raises(
        ValueError, match=r"forget example 0 has no supervised token left after truncation to max_length=4"
    ):
        _make(tmp_path, tokenizer, args=_args(tmp_path, max_length=4), peft_config=_lora())


def test_error_reference_missing(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"forget_loss='npo' needs a reference model: pass `ref_model=`.*peft_config"):
        _make(tmp_path, tokenizer, args=_args(tmp_path, forget_loss="npo"))
    with pytest.raises(ValueError, match=r"retain_loss='kl' needs a reference model"):
        _make(tmp_path, tokenizer, args=_args(tmp_path, retain_loss="kl"))
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=r"`ref_model` must not be the trained model"):
        _make(tmp_path, tokenizer, model=model, args=_args(tmp_path, forget_loss="npo"), ref_model=model)


def test_validate_is_the_one_check_step(tmp_path, tokenizer, monkeypatch):
    """__init__ runs every check through `validate` once; called again after construction it re-checks the run."""
    calls = []
    original = UnlearningTrainer.validate
    monkeypatch.setattr(UnlearningTrainer, "validate", lambda self, **kw: calls.append(kw) or original(self, **kw))
    trainer = _make(tmp_path, tokenizer)  # no PEFT, no reference model: NPO cannot run
    assert len(calls) == 1
    trainer.validate()  # the constructed trainer passes its own checks
    trainer.args.forget_loss = "npo"
    with pytest.raises(ValueError, match=r"forget_loss='npo' needs a reference model"):
        trainer.validate()
    trainer.args.forget_loss = "inverted_hinge"
    trainer.args.retain_loss = "nll"
    trainer._retain_examples = None
    with pytest.raises(ValueError, match=r"retain_loss='nll' needs a `retain_dataset`"):
        trainer.validate()


@pytest.mark.parametrize("model_cls", [BertModel, BertForSequenceClassification])
def test_error_not_causal_lm(tmp_path, tokenizer, model_cls):
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    with pytest.raises(ValueError, match=rf"`model` must be a causal language model .*got {model_cls.__name__}"):
        _make(tmp_path, tokenizer, model=model_cls(config))


def test_error_peft_config(tmp_path, tokenizer):
    peft_model = get_peft_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), _lora())
    with pytest.raises(ValueError, match=r"PeftModel together with `peft_config`"):
        _make(tmp_path, tokenizer, model=peft_model, peft_config=_lora())
    with pytest.raises(TypeError, match=r"`peft_config` must be a peft.PeftConfig.*got dict"):
        _make(tmp_path, tokenizer, peft_config={"r": 8})


def test_error_idk_without_questions(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"forget_loss='idk' needs a question"):
        _make(tmp_path, tokenizer, args=_args(tmp_path, forget_loss="idk"), forget_dataset=RETAIN, peft_config=_lora())


def test_error_bad_args_and_config(tmp_path, tokenizer):
    with pytest.raises(TypeError, match=r"`args` must be an UnlearningConfig or TrainingArguments"):
        _make(tmp_path, tokenizer, args={"forget_loss": "npo"}, peft_config=_lora())
    with pytest.raises(ValueError, match=r"`forget_loss` must be one of"):
        _args(tmp_path, forget_loss="forget_everything")


def test_output_dir_untouched_without_saving(tmp_path, tokenizer):
    trainer = _make(tmp_path, tokenizer, args=_args(tmp_path, max_steps=1), peft_config=_lora())
    trainer.train()
    assert not os.path.exists(tmp_path / "out" / "checkpoint-1")


def test_full_finetune_at_the_adapter_learning_rate_warns(tmp_path, tokenizer):
    """The default 1e-3 suits adapters; on a full model the trainer warns and names a rate that suits it."""
    forget = [{"text": TINY_CORPUS[0]}]
    args = quick_cpu_config(tmp_path, retain_loss=None)
    assert args.learning_rate >= 1e-3
    with pytest.warns(UserWarning, match=r"without a PEFT adapter.*learning_rate=1e-5"):
        UnlearningTrainer(
            model=tiny_causal_lm("llama", vocab_size=len(tokenizer)),
            args=args,
            forget_dataset=forget,
            processing_class=tokenizer,
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        low = quick_cpu_config(tmp_path, retain_loss=None, learning_rate=1e-5)
        UnlearningTrainer(
            model=tiny_causal_lm("llama", vocab_size=len(tokenizer)), args=low, forget_dataset=forget,
            processing_class=tokenizer,
        )  # fmt: skip
        adapter = quick_cpu_config(tmp_path, retain_loss=None)
        UnlearningTrainer(
            model=get_peft_model(tiny_causal_lm("llama", vocab_size=len(tokenizer)), _lora()), args=adapter,
            forget_dataset=forget, processing_class=tokenizer,
        )  # fmt: skip
