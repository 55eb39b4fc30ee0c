"""The trainer on the fused linear + loss path: same update as the full-logits path, errors, Liger interop."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from peft_unlearn.losses import LossBatch, get_loss
from peft_unlearn.losses.fused import FusedLossUnsupportedError
from peft_unlearn.testing import tiny_causal_lm
from peft_unlearn.trainer import UnlearningConfig, UnlearningTrainer
from tests.trainer.test_unlearning_trainer import FORGET, RETAIN, _args, _lora, _one_sgd_step


@pytest.mark.parametrize(
    ("forget_loss", "retain_loss", "extra"),
    [
        ("inverted_hinge", "nll", {}),
        ("inverted_hinge", "nll", {"quantization_margin": 3.0}),
        ("inverted_hinge", "kl", {"kl_mask": "none"}),
        ("gradient_ascent", "kl", {}),
        ("npo", "nll", {}),
        ("simnpo", None, {"beta": 0.05}),
        ("idk", "nll", {}),
        ("rmu", "rmu", {"rmu_layer": 1, "rmu_steering_coeff": 20.0}),
    ],
)
def test_fused_update_equals_unfused(tmp_path, tokenizer, forget_loss, retain_loss, extra):
    """One SGD step (lr 1: the update is the gradient), batch 2 x accumulation 2, fp32: LoRA updates within 1e-4."""
    fused = _one_sgd_step(
        tmp_path, tokenizer, 2, 2, forget_loss, retain_loss, fused_loss=True, loss_chunk_size=3, **extra
    )
    unfused = _one_sgd_step(tmp_path, tokenizer, 2, 2, forget_loss, retain_loss, fused_loss=False, **extra)
    assert max(d.abs().max().item() for d in unfused.values()) > 1e-3
    for name in unfused:
        torch.testing.assert_close(fused[name], unfused[name], atol=1e-6, rtol=1e-4, msg=name)


def _trainer(tmp_path, tokenizer, model=None, peft_config=None, **kwargs):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer)) if model is None else model
    return UnlearningTrainer(
        model,
        _args(tmp_path, max_steps=1, **kwargs),
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        processing_class=tokenizer,
        peft_config=_lora() if peft_config is None else peft_config,
    )


def test_lora_on_lm_head_refused_or_falls_back(tmp_path, tokenizer):
    lora_head = _lora(r=4)
    lora_head.target_modules = {"q_proj", "lm_head"}
    with pytest.raises(FusedLossUnsupportedError, match="fused_loss=True.*lm_head"):
        _trainer(tmp_path, tokenizer, peft_config=lora_head, fused_loss=True)
    trainer = _trainer(tmp_path, tokenizer, peft_config=lora_head)  # auto: the full-logits path
    assert trainer._fused_loss is False
    trainer.train()


def test_fused_is_the_default(tmp_path, tokenizer):
    assert UnlearningConfig(output_dir=str(tmp_path), report_to="none").fused_loss == "auto"
    assert _trainer(tmp_path, tokenizer)._fused_loss is True
    assert _trainer(tmp_path, tokenizer, fused_loss="false")._fused_loss is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fused_loss": "sometimes"}, "`fused_loss` must be True, False or 'auto'"),
        ({"loss_chunk_size": 0}, "`loss_chunk_size` must be an integer >= 1"),
    ],
)
def test_bad_fused_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def _without_logits(model):
    """A model whose forward returns logits=None, like a Liger-Kernel fused-cross-entropy forward."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = None
        return out

    model.forward = forward
    return model


def test_logits_none_uses_fused_path_or_says_what_to_do(tokenizer):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    ids = torch.randint(3, len(tokenizer), (2, 6))
    inputs = {"forget_input_ids": ids, "forget_attention_mask": torch.ones_like(ids), "forget_labels": ids}
    config = UnlearningConfig(output_dir="unused", report_to="none")
    spec = get_loss("forget", "inverted_hinge")
    expected = spec.term(LossBatch(inputs, config, fused=False), model, None).total
    stub = _without_logits(model)
    assert stub(input_ids=ids).logits is None
    fused = spec.term(LossBatch(inputs, config, fused=True), stub, None).total
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="logits=None.*fused_loss='auto'"):
        spec.term(LossBatch(inputs, config, fused=False), stub, None)


def test_trainer_with_logits_none_model_trains(tmp_path, tokenizer):
    model = _without_logits(tiny_causal_lm("llama", vocab_size=len(tokenizer)))
    trainer = _trainer(tmp_path, tokenizer, model=model, retain_loss="kl")
    trainer.train()
    assert trainer.state.global_step == 1


def test_use_liger_kernel_without_liger(tmp_path, tokenizer, caplog):
    pytest.importorskip("transformers")
    from transformers.utils import is_liger_kernel_available

    if is_liger_kernel_available():
        pytest.skip("liger-kernel is installed")
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.trainer.run_checks"):
        trainer = _trainer(tmp_path, tokenizer, use_liger_kernel=True)
    assert "use_liger_kernel=True is ignored" in caplog.text and trainer.args.use_liger_kernel is False
    trainer.train()
    with pytest.raises(ImportError, match="liger-kernel is not installed.*fused_loss='auto'"):
        _trainer(tmp_path, tokenizer, use_liger_kernel=True, fused_loss=False)


@pytest.mark.parametrize("fused_loss", ["auto", False])
def test_evaluate_follows_fused_loss(tmp_path, tokenizer, fused_loss):
    """evaluate() (loss, MA, NLL, EL) builds [B, T, V] logits only with fused_loss=False; same numbers both ways."""
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    trainer = _trainer(tmp_path, tokenizer, model=model, fused_loss=fused_loss, eval_el_n=[2])
    widths = []
    head = trainer.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: widths.append(out.shape[1]))
    metrics = trainer.evaluate(eval_dataset=FORGET)
    hook.remove()
    assert {"eval_forget_loss", "eval_forget_ma", "eval_forget_nll", "eval_forget_el2"} <= set(metrics)
    if fused_loss == "auto":
        assert set(widths) == {1}  # the model's own head only ever sees one position (generation, logits_to_keep)
    else:
        assert max(widths) > 1
    other = "auto" if fused_loss is False else False
    reference = _trainer(tmp_path / "ref", tokenizer, fused_loss=other, eval_el_n=[2])
    ref_metrics = reference.evaluate(eval_dataset=FORGET)
    for key in ("eval_forget_loss", "eval_forget_ma", "eval_forget_nll", "eval_forget_el2"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), key
