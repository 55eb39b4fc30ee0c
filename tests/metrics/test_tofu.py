"""Tests for peft_unlearn.metrics.tofu (formatting, probabilities, truth ratio, ROUGE, FQ, MU, end to end)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import hmean, ks_2samp

from peft_unlearn.metrics.tofu import (
    UTILITY_KEYS,
    answer_nll,
    answer_probability,
    evaluate_tofu,
    forget_quality,
    format_prompt,
    format_qa,
    generate_answers,
    load_tofu,
    model_utility,
    relative_answer_probability,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_forget_score,
    truth_ratio_utility_score,
)
from peft_unlearn.testing import tiny_causal_lm

# ------------------------------------------------------------------------------------------------ data


def test_synthetic_splits_have_tofu_fields():
    sizes = {"forget": 12, "retain": 36, "real_authors": 8, "world_facts": 8}
    for split, size in sizes.items():
        ds = load_tofu(split)
        assert len(ds) == size
        for row in ds:
            assert row["question"] and row["answer"] and row["paraphrased_answer"]
            assert len(row["perturbed_answer"]) == 3
            assert row["answer"] not in row["perturbed_answer"]
            assert row["paraphrased_answer"] not in row["perturbed_answer"]
    assert len(load_tofu("full")) == 48
    assert len(load_tofu("retain", max_items=5)) == 5
    forget_authors = set(load_tofu("forget")["author"])
    assert len(forget_authors) == 3 and forget_authors.isdisjoint(load_tofu("retain")["author"])


def test_load_tofu_errors():
    with pytest.raises(ValueError, match="split"):
        load_tofu("forget99")
    with pytest.raises(ValueError, match="source"):
        load_tofu("forget", source="s3")
    with pytest.raises(ValueError, match="max_items"):
        load_tofu("forget", max_items=0)


# ------------------------------------------------------------------------------------------------ formatting


def test_format_qa_masks_prompt_and_appends_eos(tokenizer):
    item = format_qa("Who wrote it?", "Jane Doe.", tokenizer)
    prompt = tokenizer("Question: Who wrote it?\nAnswer:")["input_ids"]
    answer = tokenizer(" Jane Doe.", add_special_tokens=False)["input_ids"]
    assert item["input_ids"] == prompt + answer + [tokenizer.eos_token_id]
    assert item["labels"] == [-100] * len(prompt) + answer + [tokenizer.eos_token_id]
    no_eos = format_qa("Who wrote it?", "Jane Doe.", tokenizer, add_eos=False)
    assert no_eos["input_ids"] == prompt + answer
    short = format_qa("Who wrote it?", "Jane Doe.", tokenizer, max_length=len(prompt) + 2)
    assert len(short["input_ids"]) == len(prompt) + 2 and short["labels"][-2:] == answer[:2]


def test_format_qa_chat_template(tokenizer):
    item = format_qa("Who?", "Jane.", tokenizer, template="chat")
    prompt = format_prompt("Who?", tokenizer, "chat")
    assert tokenizer.decode(prompt) == "<|user|>Who?<|assistant|>"
    assert item["input_ids"][: len(prompt)] == prompt
    assert tokenizer.decode(item["input_ids"][len(prompt) :]) == "Jane.<eos>"


def test_format_errors(tokenizer):
    with pytest.raises(ValueError, match="template"):
        format_prompt("Who?", tokenizer, "Q: {q}")
    with pytest.raises(ValueError, match="no tokens"):
        format_qa("Who?", "", tokenizer, template="chat", add_eos=False)


# ------------------------------------------------------------------------------------------------ probabilities


def test_answer_nll_matches_independent_cross_entropy(tokenizer, tiny_llama):
    questions = ["Who wrote it?", "Where was the author born in the end?"]
    answers = ["Jane Doe.", "Paris"]
    got = answer_nll(tiny_llama, tokenizer, questions, answers, batch_size=2)
    for q, a, value in zip(questions, answers, got):
        prompt = tokenizer(f"Question: {q}\nAnswer:")["input_ids"]
        ans = tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + ans])
        with torch.no_grad():
            logits = tiny_llama(input_ids=ids).logits[0]
        expected = F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(ans)).item()
        assert value == pytest.approx(expected, rel=1e-5)
    probs = answer_probability(tiny_llama, tokenizer, questions, answers)
    assert probs == pytest.approx(np.exp(-got), rel=1e-6)
    with pytest.raises(ValueError, match="questions"):
        answer_nll(tiny_llama, tokenizer, questions, answers[:1])


def test_truth_ratio_against_handmade_probabilities():
    # per-token probabilities: paraphrased 0.5; perturbed 0.25 and 0.125 -> geometric mean sqrt(1/32)
    para_nll = [-math.log(0.5)]
    pert_nll = [[-math.log(0.25), -math.log(0.125)]]
    r = truth_ratio(para_nll, pert_nll)
    assert r[0] == pytest.approx(math.sqrt(0.25 * 0.125) / 0.5)
    assert truth_ratio_forget_score(r) == pytest.approx(min(r[0], 1 / r[0]))
    assert truth_ratio_utility_score(r) == pytest.approx(1 - r[0])


def test_truth_ratio_ragged_and_scores():
    r = truth_ratio([1.0, 2.0], [[1.0], [1.0, 2.0, 3.0]])  # exp(0), exp(2 - 2)
    assert r.tolist() == pytest.approx([1.0, 1.0])
    assert truth_ratio_forget_score([0.5, 2.0, 1.0]) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert truth_ratio_utility_score([0.25, 2.0]) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="rows"):
        truth_ratio([1.0, 2.0], [[1.0]])
    with pytest.raises(ValueError, match="empty row"):
        truth_ratio([1.0], [[]])


def test_relative_answer_probability():
    p = relative_answer_probability([-math.log(0.5)], [[-math.log(0.25), -math.log(0.25)]])
    assert p[0] == pytest.approx(0.5 / (0.5 + 0.25 + 0.25))


# ------------------------------------------------------------------------------------------------ ROUGE


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_recall_against_hand_lcs():
    preds = ["the cat sat on the mat", "a b c d", "nothing in common"]
    refs = ["a cat sat quietly on a mat today", "d c b a", "zebra"]
    got = rouge_l_recall(preds, refs, use_stemmer=False)
    expected = [_lcs(p.split(), r.split()) / len(r.split()) for p, r in zip(preds, refs)]
    assert got.tolist() == pytest.approx(expected)
    assert expected[0] == pytest.approx(4 / 8)
    assert rouge_l_recall(["dogs running"], ["dog run"]).tolist() == [1.0]  # stemming on by default
    with pytest.raises(ValueError, match="predictions"):
        rouge_l_recall(["a"], ["a", "b"])
    with pytest.raises(TypeError, match="sequences"):
        rouge_l_recall("a", "a")


# ------------------------------------------------------------------------------------------------ aggregates


def test_forget_quality_equals_scipy_ks_pvalue():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=30), rng.lognormal(0.5, size=25)
    assert forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    assert forget_quality(1 / a, 1 / b) == pytest.approx(forget_quality(a, b))  # R vs 1/R does not matter
    assert forget_quality(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty"):
        forget_quality([], b)
    with pytest.raises(ValueError, match="finite"):
        forget_quality([np.nan], b)


def test_model_utility_harmonic_mean():
    values = dict(zip(UTILITY_KEYS, np.linspace(0.1, 0.9, 9)))
    assert model_utility(values) == pytest.approx(hmean(list(values.values())))
    assert model_utility([0.5, 0.25]) == pytest.approx(1 / 3)
    assert model_utility({**values, "retain_prob": 0.0}) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        model_utility([0.5, -0.1])
    with pytest.raises(ValueError, match="empty"):
        model_utility({})


# ------------------------------------------------------------------------------------------------ generation / e2e


def test_generate_answers_matches_naive_greedy(tokenizer, tiny_llama):
    questions = ["Who wrote it?", "Where?"]
    got = generate_answers(tiny_llama, tokenizer, questions, max_new_tokens=5, batch_size=2)
    for q, text in zip(questions, got):
        cur = format_prompt(q, tokenizer)
        start = len(cur)
        for _ in range(5):
            with torch.no_grad():
                nxt = int(tiny_llama(input_ids=torch.tensor([cur])).logits[0, -1].argmax())
            cur.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
        assert text == tokenizer.decode(cur[start:], skip_special_tokens=True).strip()


def test_evaluate_tofu_end_to_end_on_synthetic_data(tokenizer, tiny_llama):
    splits = {s: load_tofu(s) for s in ("forget", "retain", "real_authors", "world_facts")}
    retain_model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
    kw = {"max_new_tokens": 6, "batch_size": 8, "max_items": 4}
    ref = evaluate_tofu(retain_model, tokenizer, forget=splits["forget"], compute_rouge=False, max_items=4)
    out = evaluate_tofu(tiny_llama, tokenizer, **splits, retain_model_truth_ratios=ref["forget_truth_ratios"], **kw)
    for key in UTILITY_KEYS + ("forget_prob", "forget_truth_ratio", "forget_rougeL", "model_utility"):
        assert math.isfinite(out[key]) and 0.0 <= out[key] <= 1.0, key
    assert 0.0 <= out["forget_quality"] <= 1.0
    assert len(out["forget_truth_ratios"]) == 4 and len(out["forget_generations"]) == 4
    assert out["model_utility"] == pytest.approx(model_utility({k: out[k] for k in UTILITY_KEYS}))
    # the flattened perturbed scoring agrees with per-item scoring
    rows = list(splits["forget"])[:4]
    q = [r["question"] for r in rows]
    para = answer_nll(tiny_llama, tokenizer, q, [r["paraphrased_answer"] for r in rows])
    pert = [answer_nll(tiny_llama, tokenizer, [r["question"]] * 3, r["perturbed_answer"]) for r in rows]
    assert out["forget_truth_ratios"] == pytest.approx(truth_ratio(para, pert).tolist(), rel=1e-5)
    # world facts probability is the relative one
    wf = list(splits["world_facts"])[:4]
    true_nll = answer_nll(tiny_llama, tokenizer, [r["question"] for r in wf], [r["answer"] for r in wf])
    wf_pert = [answer_nll(tiny_llama, tokenizer, [r["question"]] * 3, r["perturbed_answer"]) for r in wf]
    assert out["world_facts_prob"] == pytest.approx(float(np.mean(relative_answer_probability(true_nll, wf_pert))))
    # the same model as its own retain model: identical samples
    same = evaluate_tofu(
        tiny_llama,
        tokenizer,
        forget=splits["forget"],
        compute_rouge=False,
        max_items=4,
        retain_model_truth_ratios=out["forget_truth_ratios"],
    )
    assert same["forget_quality"] == pytest.approx(1.0)


def test_evaluate_tofu_errors(tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="at least one"):
        evaluate_tofu(tiny_llama, tokenizer)
    with pytest.raises(ValueError, match="paraphrased_answer"):
        evaluate_tofu(tiny_llama, tokenizer, forget=[{"question": "q", "answer": "a", "perturbed_answer": ["b"]}])
    with pytest.raises(ValueError, match="retain_model_truth_ratios"):
        evaluate_tofu(
            tiny_llama,
            tokenizer,
            retain=load_tofu("retain"),
            retain_model_truth_ratios=[1.0],
            compute_rouge=False,
            max_items=2,
        )
    with pytest.raises(ValueError, match="empty"):
        evaluate_tofu(tiny_llama, tokenizer, forget=[])
