"""The fused linear + loss path equals the unfused losses on full logits: values and gradients.

Tolerances: float64 1e-6 (measured ~1e-14), float32 1e-4 relative (measured ~1e-6), bf16 2e-2 relative on the
loss and 5e-2 relative (max-norm) on gradients (both paths round the logits to bf16; the fused path keeps the
softmax in fp32 and rounds once less).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_unlearn.losses import (
    inverted_hinge_loss,
    kl_loss,
    nll_loss,
    quantization_margin_loss,
    sequence_log_probs,
)
from peft_unlearn.losses.fused import (
    FusedLossUnsupportedError,
    OutputHead,
    fused_inverted_hinge_loss,
    fused_kl_loss,
    fused_nll_loss,
    fused_quantization_margin_loss,
    fused_sequence_log_probs,
    fused_token_statistics,
    model_hidden_states,
    output_head,
)
from peft_unlearn.testing import tiny_causal_lm

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def _labels(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :3] = -100  # prompt
    labels[-1, -2:] = -100  # padding
    return labels


def _losses(labels: torch.Tensor, ref_hidden: torch.Tensor, ref_head: OutputHead, chunk: int):
    """(name, fused(h, head), unfused(logits)) for every loss that reads token probabilities."""
    weights = torch.arange(1.0, labels.shape[0] + 1, dtype=ref_hidden.dtype)
    return [
        (
            "ihl",
            lambda h, head: fused_inverted_hinge_loss(h, head, labels, chunk_rows=chunk),
            lambda z: inverted_hinge_loss(z, labels),
        ),
        (
            "quantization_margin",
            lambda h, head: fused_quantization_margin_loss(h, head, labels, 1.5, reduction="sum", chunk_rows=chunk),
            lambda z: quantization_margin_loss(z, labels, 1.5, reduction="sum"),
        ),
        (
            "ihl_plus_margin",
            lambda h, head: (
                fused_inverted_hinge_loss(h, head, labels, chunk_rows=chunk)
                + fused_quantization_margin_loss(h, head, labels, 0.5, chunk_rows=chunk)
            ),
            lambda z: inverted_hinge_loss(z, labels) + quantization_margin_loss(z, labels, 0.5),
        ),
        (
            "nll",
            lambda h, head: fused_nll_loss(h, head, labels, reduction="sum", chunk_rows=chunk),
            lambda z: nll_loss(z, labels, reduction="sum"),
        ),
        (
            "sequence_log_probs",
            lambda h, head: (fused_sequence_log_probs(h, head, labels, chunk_rows=chunk)[0] * weights).sum(),
            lambda z: (sequence_log_probs(z, labels)[0] * weights).sum(),
        ),
        (
            "kl_labels",
            lambda h, head: fused_kl_loss(h, head, ref_hidden, ref_head, labels, chunk_rows=chunk),
            lambda z: kl_loss(z, ref_head.logits(ref_hidden), labels),
        ),
        (
            "kl_all",
            lambda h, head: fused_kl_loss(h, head, ref_hidden, ref_head, None, chunk_rows=chunk),
            lambda z: kl_loss(z, ref_head.logits(ref_hidden), None),
        ),
    ]


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("train_head", [False, True], ids=["frozen_head", "trained_head"])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_fused_losses_match_unfused(dtype, softcap, train_head, chunk):
    torch.manual_seed(0)
    batch, seq, d, vocab = 3, 7, 8, 13
    hidden = torch.randn(batch, seq, d, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, d, dtype=dtype, requires_grad=train_head)
    bias = torch.randn(vocab, dtype=dtype, requires_grad=train_head)
    head = OutputHead(weight, bias, softcap)
    ref_head = OutputHead(torch.randn(vocab, d, dtype=dtype), None, softcap)
    ref_hidden = torch.randn(batch, seq, d, dtype=dtype)
    params = [hidden, weight, bias] if train_head else [hidden]
    for name, fused, unfused in _losses(_labels(batch, seq, vocab), ref_hidden, ref_head, chunk):
        loss_f = fused(hidden, head)
        grads_f = torch.autograd.grad(loss_f, params)
        loss_u = unfused(head.logits(hidden))
        grads_u = torch.autograd.grad(loss_u, params)
        assert _max_rel_err(loss_f, loss_u) < TOL[dtype], name
        for grad_f, grad_u in zip(grads_f, grads_u):
            assert _max_rel_err(grad_f, grad_u) < TOL[dtype], name


def test_combined_objective_and_accumulated_head_gradient():
    """IHL + KL on one forward (one backward through both), and `.grad` accumulates over two micro-batches."""
    torch.manual_seed(1)
    dtype = torch.float64
    weight = torch.randn(11, 6, dtype=dtype, requires_grad=True)
    head = OutputHead(weight)
    parts = [(torch.randn(2, 5, 6, dtype=dtype), _labels(2, 5, 11, seed=s)) for s in (0, 1)]
    ref_hidden = torch.randn(2, 5, 6, dtype=dtype)
    for fused in (True, False):
        weight.grad = None
        for hidden, labels in parts:
            if fused:
                loss = fused_inverted_hinge_loss(hidden, head, labels, reduction="sum", chunk_rows=3)
                loss = loss + 0.5 * fused_kl_loss(hidden, head, ref_hidden, labels=labels, chunk_rows=2)
            else:
                logits = head.logits(hidden)
                loss = inverted_hinge_loss(logits, labels, reduction="sum")
                loss = loss + 0.5 * kl_loss(logits, head.logits(ref_hidden).detach(), labels)
            (loss / 7).backward()
        if fused:
            fused_grad = weight.grad.clone()
    assert _max_rel_err(fused_grad, weight.grad) < 1e-6


def test_no_supervised_token_gives_zero_and_finite_gradient():
    hidden = torch.randn(2, 4, 6, requires_grad=True)
    head = OutputHead(torch.randn(9, 6))
    labels = torch.full((2, 4), -100)
    loss = fused_inverted_hinge_loss(hidden, head, labels) + fused_nll_loss(hidden, head, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def _model(arch: str, dtype: torch.dtype, **kwargs):
    if arch == "gemma3":  # tied embeddings and Gemma's final logit soft-capping
        kwargs.setdefault("final_logit_softcapping", 5.0)
    if arch == "gpt2":  # no dropout, so that the two forwards of a comparison are the same function
        kwargs.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tiny_causal_lm(arch, vocab_size=96, dtype=dtype, **kwargs)


def _batch(vocab: int = 96):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # prompt
    return ids, mask, labels


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_lora_model_gradients_match_unfused(arch):
    """IHL + NLL through a LoRA model (hidden states from the model, the frozen head): LoRA factor gradients."""
    torch.manual_seed(0)
    model = get_peft_model(_model(arch, torch.float64), LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    for module in model.modules():  # a non-zero B so that the A factors get a gradient too
        if hasattr(module, "lora_B"):
            for lin in module.lora_B.values():
                torch.nn.init.normal_(lin.weight, std=0.1)
    ids, mask, labels = _batch()
    head = output_head(model)
    assert head.weight.requires_grad is False
    assert (head.softcap is not None) == (arch == "gemma3")
    lora = [p for n, p in model.named_parameters() if "lora_" in n]

    hidden = model_hidden_states(model, input_ids=ids, attention_mask=mask)
    loss_f = fused_inverted_hinge_loss(hidden, head, labels, chunk_rows=5) + fused_nll_loss(hidden, head, labels)
    grads_f = torch.autograd.grad(loss_f, lora)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    loss_u = inverted_hinge_loss(logits, labels) + nll_loss(logits, labels)
    grads_u = torch.autograd.grad(loss_u, lora)
    assert _max_rel_err(loss_f, loss_u) < 1e-6
    assert max(_max_rel_err(a, b) for a, b in zip(grads_f, grads_u)) < 1e-6


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_full_finetuning_head_gradient_matches_unfused(arch):
    """Trained output projection: untied `lm_head` (Llama) and the tied embedding (Gemma-3) get the same gradient."""
    model = _model(arch, torch.float64).train()
    ids, mask, labels = _batch()
    head = output_head(model)
    assert (head.weight is model.get_input_embeddings().weight) == (arch == "gemma3")
    hidden = model_hidden_states(model, input_ids=ids, attention_mask=mask)
    grad_f = torch.autograd.grad(fused_nll_loss(hidden, head, labels, chunk_rows=4), head.weight)[0]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    grad_u = torch.autograd.grad(nll_loss(logits, labels), head.weight)[0]
    assert _max_rel_err(grad_f, grad_u) < 1e-6


def test_bf16_close_to_unfused():
    """bf16 model: loss within 2e-2 and LoRA gradients within 5e-2 (relative, max-norm) of the unfused path."""
    torch.manual_seed(0)
    model = get_peft_model(_model("gemma3", torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    for module in model.modules():
        if hasattr(module, "lora_B"):
            for lin in module.lora_B.values():
                torch.nn.init.normal_(lin.weight, std=0.1)
    ids, mask, labels = _batch()
    head = output_head(model)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    hidden = model_hidden_states(model, input_ids=ids, attention_mask=mask)
    loss_f = fused_inverted_hinge_loss(hidden, head, labels) + fused_nll_loss(hidden, head, labels)
    grads_f = torch.autograd.grad(loss_f, lora)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    loss_u = inverted_hinge_loss(logits, labels) + nll_loss(logits, labels)
    grads_u = torch.autograd.grad(loss_u, lora)
    assert loss_f.dtype == torch.float32
    assert _max_rel_err(loss_f, loss_u) < 2e-2
    flat_f = torch.cat([g.float().flatten() for g in grads_f])
    flat_u = torch.cat([g.float().flatten() for g in grads_u])
    assert ((flat_f - flat_u).abs().max() / flat_u.abs().max()).item() < 5e-2


def test_modules_to_save_head_is_the_trained_copy():
    model = get_peft_model(
        _model("llama", torch.float32), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    head = output_head(model)
    assert head.weight.requires_grad
    assert head.weight is not model.get_base_model().lm_head.original_module.weight


def test_lora_on_lm_head_is_refused():
    model = get_peft_model(_model("llama", torch.float32), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(FusedLossUnsupportedError, match="lm_head.*fused_loss=False"):
        output_head(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_rows": 0}, "chunk_rows must be an integer >= 1"),
        ({"labels": torch.zeros(2, 3, dtype=torch.long)}, r"labels must have shape \[B, T\]"),
        ({"labels": torch.zeros(2, 4)}, "integer tensor"),
        ({"labels": torch.full((2, 4), 50)}, "vocabulary size"),
        ({"labels": None}, "all_positions"),
    ],
)
def test_bad_inputs_are_refused(kwargs, match):
    args = {"labels": torch.zeros(2, 4, dtype=torch.long), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        fused_token_statistics(torch.randn(2, 4, 6), OutputHead(torch.randn(9, 6)), **args)
    with pytest.raises(ValueError, match="hidden size"):
        fused_nll_loss(torch.randn(2, 4, 5), OutputHead(torch.randn(9, 6)), torch.zeros(2, 4, dtype=torch.long))


def test_quantization_margin_is_active_and_exact_past_underflow():
    """Some tokens are inside the margin and some beyond it (the test covers both sides of the hinge); a token whose
    runner-up probability underflows fp32 still gets its exact logit gap (log p_y - log p_k, not log of 0)."""
    torch.manual_seed(3)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    head = OutputHead(torch.randn(13, 8, dtype=torch.float64))
    labels = _labels(2, 6, 13)
    stats = fused_token_statistics(hidden, head, labels, runner_up=True)
    gap = stats.logit_margin() + 1.5
    assert (gap > 0).any() and (gap < 0).any()
    # one row: z_y - z_k = 200 (exp(-200) underflows fp32), margin 1 -> loss 201
    weight = torch.zeros(3, 2)
    weight[0, 0], weight[1, 1] = 200.0, 0.0
    h = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    y = torch.tensor([[-100, 0]])
    loss = fused_quantization_margin_loss(h, OutputHead(weight), y, 1.0, reduction="sum")
    assert loss.item() == pytest.approx(201.0)
    ref = quantization_margin_loss(OutputHead(weight).logits(h), y, 1.0, reduction="sum")
    assert ref.item() == pytest.approx(201.0)
    (grad_f,) = torch.autograd.grad(loss, h)
    h2 = h.detach().clone().requires_grad_(True)
    (grad_u,) = torch.autograd.grad(
        quantization_margin_loss(OutputHead(weight).logits(h2), y, 1.0, reduction="sum"), h2
    )
    torch.testing.assert_close(grad_f, grad_u)
