"""Evaluation without full logits: MA, NLL/perplexity, token log-probs, TOFU and Min-k% from hidden states in chunks.

The chunked path projects each chunk exactly as the model's head does (same matmul dtype, the soft-cap after it,
then fp32), so MA (an argmax) must be identical and the log-probs equal to float rounding of a row-sliced matmul.
Measured on this CPU: identical bits; asserted: MA exactly, log-probs within 1e-6 relative (fp32) / 1e-12 (float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_unlearn.losses.fused import FusedLossUnsupportedError
from peft_unlearn.metrics import (
    evaluate_memorization,
    greedy_generate,
    memorization_accuracy,
    min_k_prob_scores,
    pad_batch,
    perplexity,
    sequence_nll,
    token_log_probs,
)
from peft_unlearn.metrics.chunked import resolve_fused
from peft_unlearn.metrics.memorization import _token_stats
from peft_unlearn.metrics.tofu import answer_nll, evaluate_tofu, load_tofu
from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer

VOCAB = 97
ARCHS = {
    "llama": {},  # untied head
    "gemma3_softcap": {"final_logit_softcapping": 2.0},  # tied head, soft-capping active at these logit sizes
    "gpt2": {},  # tied head, Conv1D layers, learned positions
}
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _model(name: str, dtype=torch.float32, vocab: int = VOCAB):
    arch = "gemma3" if name.startswith("gemma3") else name
    return tiny_causal_lm(arch, vocab_size=vocab, dtype=dtype, **ARCHS[name])


def _padded_batch(side: str):
    """Three sequences of lengths 9, 6 and 4 padded on `side`, labels with a masked prompt and a -100 inside."""
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 6, 4]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        seq = torch.randint(3, VOCAB, (n,), generator=gen)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[r, sl], mask[r, sl] = seq, 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, :3] = -100
    labels[1, -2] = -100 if side == "left" else labels[1, -2]
    return ids, mask, labels


def _assert_same_stats(fused, full, dtype):
    assert len(fused) == len(full)
    for (c_f, lp_f), (c_u, lp_u) in zip(fused, full):
        assert torch.equal(c_f, c_u)
        assert lp_f.shape == lp_u.shape and lp_f.dtype == lp_u.dtype
        torch.testing.assert_close(lp_f, lp_u, rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_stats_equal_full_logits(name, dtype, side):
    model = _model(name, dtype)
    ids, mask, labels = _padded_batch(side)
    for lab in (labels, None):
        with torch.no_grad():
            full = _token_stats(model, ids, mask, lab, fused=False)
            for chunk in (1, 5, None):
                fused = _token_stats(model, ids, mask, lab, fused=True, chunk_size=chunk)
                _assert_same_stats(fused, full, dtype)
    assert sum(c.numel() for c, _ in full) > 10


@pytest.mark.parametrize("name", list(ARCHS))
def test_public_metrics_equal_full_logits(name):
    """MA, token log-probs, sequence NLL, perplexity, evaluate_memorization (with EL), Min-k%: fused == full."""
    model = _model(name)
    ids, mask, labels = _padded_batch("right")
    kw = {"attention_mask": mask, "labels": labels}
    torch.testing.assert_close(
        memorization_accuracy(model, ids, fused=True, chunk_size=4, **kw),
        memorization_accuracy(model, ids, fused=False, **kw),
        rtol=0,
        atol=0,
    )
    for f, u in zip(token_log_probs(model, ids, fused=True, **kw), token_log_probs(model, ids, fused=False, **kw)):
        torch.testing.assert_close(f, u, rtol=1e-6, atol=1e-6)
    (tf, cf), (tu, cu) = sequence_nll(model, ids, fused=True, **kw), sequence_nll(model, ids, fused=False, **kw)
    torch.testing.assert_close(tf, tu, rtol=1e-6, atol=1e-6)
    assert torch.equal(cf, cu)
    assert perplexity(model, ids, fused=True, **kw) == pytest.approx(
        perplexity(model, ids, fused=False, **kw), rel=1e-6
    )
    data = [{"input_ids": ids[r][mask[r].bool()].tolist()} for r in range(3)]
    scores = {
        f: evaluate_memorization(model, data, el_n=(2,), batch_size=2, fused=f, chunk_size=3) for f in (True, False)
    }
    assert scores[True].keys() == scores[False].keys()
    for key in scores[False]:
        assert scores[True][key] == pytest.approx(scores[False][key], rel=1e-6), key
    mink = [min_k_prob_scores(model, data, 0.5, fused=f, chunk_size=2) for f in (True, False)]
    torch.testing.assert_close(mink[0], mink[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(ARCHS))
def test_ma_equal_on_memorised_text(name):
    """A greedy continuation is text the model 'memorised' (MA near 1), so the argmax comparison is not only
    between two all-wrong predictions; the padded batch mixes it with random text (MA near 0)."""
    model = _model(name)
    cont = greedy_generate(model, [[5, 6, 7]], max_new_tokens=8)[0]
    data = [[5, 6, 7, *cont], [9, 40, 11, 60, 13], [30, 31]]
    ids, mask, _ = pad_batch([{"input_ids": d} for d in data])
    ma_u = memorization_accuracy(model, ids, mask, fused=False)
    ma_f = memorization_accuracy(model, ids, mask, fused=True, chunk_size=3)
    assert torch.equal(ma_f, ma_u)
    assert ma_u[0] >= 0.7  # 8 of the 10 predicted tokens are the model's own argmax


def test_tofu_metrics_equal_full_logits():
    tok = tiny_tokenizer()
    model = tiny_causal_lm("gemma3", vocab_size=len(tok), final_logit_softcapping=2.0)
    forget = load_tofu("forget", max_items=4)
    q, a = list(forget["question"]), list(forget["answer"])
    nll_f = answer_nll(model, tok, q, a, batch_size=3, fused=True, chunk_size=7)
    nll_u = answer_nll(model, tok, q, a, batch_size=3, fused=False)
    np.testing.assert_allclose(nll_f, nll_u, rtol=1e-6)
    out = {f: evaluate_tofu(model, tok, forget=forget, compute_rouge=False, fused=f) for f in (True, False)}
    assert out[True]["forget_prob"] == pytest.approx(out[False]["forget_prob"], rel=1e-6)
    assert out[True]["forget_truth_ratio"] == pytest.approx(out[False]["forget_truth_ratio"], rel=1e-6)
    np.testing.assert_allclose(out[True]["forget_truth_ratios"], out[False]["forget_truth_ratios"], rtol=1e-6)


def test_fused_path_never_projects_more_than_one_chunk():
    """The model's own head sees one position per sequence (logits_to_keep=1); no [B, T, V] tensor is built."""
    model = _model("llama")
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    ids, mask, labels = _padded_batch("right")
    memorization_accuracy(model, ids, mask, labels, fused=True, chunk_size=4)
    hook.remove()
    assert seen == [(3, 1, VOCAB)]


def test_peft_model_and_fallbacks():
    model = _model("llama")
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask, labels = _padded_batch("left")
    _assert_same_stats(
        _token_stats(lora, ids, mask, labels, fused=True, chunk_size=2),
        _token_stats(lora, ids, mask, labels, fused=False),
        torch.float32,
    )
    head_lora = get_peft_model(_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert resolve_fused("auto", head_lora) is False  # falls back to the full logits, as training does
    with pytest.raises(FusedLossUnsupportedError, match="fused=True.*lm_head"):
        memorization_accuracy(head_lora, ids, mask, fused=True)
    assert memorization_accuracy(head_lora, ids, mask).shape == (3,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"fused": "yes"}, "`fused` must be True, False or 'auto'"), ({"chunk_size": 0}, "chunk_size")],
)
def test_bad_fused_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_memorization(_model("llama"), [[5, 6, 7]], compute_el=False, **kwargs)
