"""Tests for peft_unlearn.metrics.memorization (MA, EL_n, NLL, greedy generation)."""

from __future__ import annotations

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peft_unlearn.metrics import (
    compute_ma_metrics,
    evaluate_memorization,
    extraction_likelihood,
    greedy_generate,
    memorization_accuracy,
    pad_batch,
    perplexity,
    preprocess_logits_for_ma,
    sequence_nll,
    token_log_probs,
)
from peft_unlearn.metrics.extraction import _ngram_overlap

V = 20


class SuccessorLM(torch.nn.Module):
    """Deterministic toy LM: the next token is (x + 1) mod V, with a one-hot logit of 10 (no KV cache)."""

    def __init__(self, vocab: int = V):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls += 1
        logits = F.one_hot((input_ids + 1) % self.vocab, self.vocab).float() * 10.0
        return SimpleNamespace(logits=logits)


RULE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # follows the successor rule
BROKEN = [0, 1, 2, 3, 7, 8, 9, 10]  # one break between 3 and 7


def brute_el(model, seq, n, stride=1, t0=1, eos=None):
    """Independent EL_n: unbatched greedy continuation per prefix, full recompute, explicit n-gram lists.

    ``eos`` given: the continuation stops after its first ``eos`` token (as ``generate``).
    """
    scores = []
    for t in range(t0, len(seq) - n + 1, stride):
        cur = list(seq[:t])
        while len(cur) < len(seq):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([cur])).logits
            cur.append(int(logits[0, -1].argmax()))
            if eos is not None and cur[-1] == eos:
                break
        cont, ref = cur[t:], list(seq[t:])
        ref_grams = [tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)]
        cont_grams = [tuple(cont[i : i + n]) for i in range(len(cont) - n + 1)]
        scores.append(sum(1 for g in cont_grams if g in ref_grams) / len(ref_grams))
    return sum(scores) / len(scores) if scores else float("nan")


# ------------------------------------------------------------------------------------------------ MA


def test_ma_is_one_for_copying_model():
    ma = memorization_accuracy(SuccessorLM(), torch.tensor([RULE]))
    assert ma.tolist() == [1.0]


def test_ma_hand_computed_with_mismatch():
    # predictions for t=1..7: 1,2,3,4,8,9,10 vs targets 1,2,3,7,8,9,10 -> 6/7
    ma = memorization_accuracy(SuccessorLM(), torch.tensor([BROKEN]))
    assert ma.item() == pytest.approx(6 / 7)


@pytest.mark.parametrize("side", ["right", "left"])
def test_ma_handles_padding(side):
    short = [5, 6, 9]  # predictions 6 (ok), 7 (wrong) -> 1/2
    pad = [0] * (len(BROKEN) - len(short))
    row = short + pad if side == "right" else pad + short
    mask = [1] * 3 + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * 3
    ma = memorization_accuracy(SuccessorLM(), torch.tensor([BROKEN, row]), torch.tensor([[1] * len(BROKEN), mask]))
    assert ma.tolist() == pytest.approx([6 / 7, 1 / 2])


def test_ma_with_labels_counts_only_supervised_positions():
    labels = [-100, -100, -100, 3, 7, 8, 9, 10]  # positions 3..7: 3 ok, 7 wrong, 8 9 10 ok
    ma = memorization_accuracy(SuccessorLM(), torch.tensor([BROKEN]), labels=torch.tensor([labels]))
    assert ma.item() == pytest.approx(4 / 5)


def test_ma_no_counted_position_is_nan():
    ma = memorization_accuracy(SuccessorLM(), torch.tensor([[4]]))
    assert math.isnan(ma.item())


def test_ma_restores_train_mode_and_needs_no_grad(tiny_llama):
    tiny_llama.train()
    ma = memorization_accuracy(tiny_llama, torch.tensor([[5, 6, 7, 8]]))
    assert tiny_llama.training
    assert not ma.requires_grad
    tiny_llama.eval()
    memorization_accuracy(tiny_llama, torch.tensor([[5, 6, 7, 8]]))
    assert not tiny_llama.training


def test_ma_matches_independent_argmax_on_tiny_llama(tiny_llama):
    ids = torch.tensor([[5, 9, 17, 33, 40, 41], [7, 8, 100, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    ma = memorization_accuracy(tiny_llama, ids, mask)
    expected = []
    for row, m in zip(ids, mask):
        seq = row[m.bool()]
        with torch.no_grad():
            pred = tiny_llama(input_ids=seq[None]).logits[0, :-1].argmax(-1)
        expected.append((pred == seq[1:]).float().mean().item())
    assert ma.tolist() == pytest.approx(expected)


def test_ma_shape_errors():
    with pytest.raises(ValueError, match="attention_mask"):
        memorization_accuracy(SuccessorLM(), torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="labels"):
        memorization_accuracy(SuccessorLM(), torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="input_ids"):
        memorization_accuracy(SuccessorLM(), torch.zeros(1, 2, 3, dtype=torch.long))


def test_ma_rejects_non_causal_logits():
    class Bad(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], V))

    with pytest.raises(ValueError, match="logits of shape"):
        memorization_accuracy(Bad(), torch.tensor([[1, 2, 3]]))


# ------------------------------------------------------------------------------------------------ EL


def test_el_is_one_for_copying_model():
    el = extraction_likelihood(SuccessorLM(), torch.tensor([RULE]), n=3)
    assert el.tolist() == [1.0]


def test_el_hand_computed():
    # t=1: 2/6, t=2: 1/5, t=3: 0/4, t=4: 0/3, t=5: 2/2, t=6: 1/1  -> (1/3 + 1/5 + 2) / 6 = 19/45
    el = extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=2)
    assert el.item() == pytest.approx(19 / 45)
    assert brute_el(SuccessorLM(), BROKEN, 2) == pytest.approx(19 / 45)


def test_el_stop_at_eos_hand_computed():
    # eos = 2: t=1 continues [1, 2] -> 1/6; t=2 stops at once ([2]) -> 0/5; t=3, 4 -> 0; t=5 -> 2/2; t=6 -> 1/1
    el = extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=2, stop_at_eos=True, eos_token_id=2)
    assert el.item() == pytest.approx(13 / 36)
    assert brute_el(SuccessorLM(), BROKEN, 2, eos=2) == pytest.approx(13 / 36)
    # the default ignores EOS
    assert extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=2, eos_token_id=2).item() == pytest.approx(
        19 / 45
    )


def test_el_stop_at_eos_needs_an_eos_id():
    with pytest.raises(ValueError, match="stop_at_eos=True` needs an EOS id"):
        extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=2, stop_at_eos=True)


def test_el_stop_at_eos_on_tiny_llama_matches_brute_force(tiny_llama):
    # sequences the model reproduces (its own greedy continuations), and an EOS it emits in the middle of them
    seqs = [greedy_generate(tiny_llama, [[p]], max_new_tokens=9)[0] for p in (5, 40)]
    seqs = [[p, *s] for p, s in zip((5, 40), seqs)]
    eos = seqs[0][4]
    tiny_llama.config.eos_token_id = eos
    tiny_llama.generation_config.eos_token_id = eos
    ids, mask, _ = pad_batch([{"input_ids": s} for s in seqs])
    el = extraction_likelihood(tiny_llama, ids, mask, n=2, batch_size=4, stop_at_eos=True)
    expected = [brute_el(tiny_llama, s, 2, eos=eos) for s in seqs]
    assert el.tolist() == pytest.approx(expected)
    default = [brute_el(tiny_llama, s, 2) for s in seqs]
    assert expected[0] < default[0]  # EOS matters here, and only lowers the score
    assert all(e <= d for e, d in zip(expected, default))


def test_el_prefix_stride():
    # t in {1, 3, 5}: (1/3 + 0 + 1) / 3
    el = extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=2, prefix_stride=2)
    assert el.item() == pytest.approx(4 / 9)


def test_el_labels_start_at_first_supervised_position():
    labels = torch.tensor([[-100, -100, -100, 3, 7, 8, 9, 10]])
    el = extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=2, labels=labels)
    assert el.item() == pytest.approx((0 + 0 + 1 + 1) / 4)


def test_el_n_larger_than_sequence():
    el = extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=8)  # T - n = 0 < 1: undefined
    assert math.isnan(el.item())
    el7 = extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=7)  # only t = 1, no 7-gram match
    assert el7.item() == 0.0


def test_el_padded_batch_matches_individual_sequences():
    ids = torch.tensor([BROKEN, [5, 6, 7, 8, 0, 0, 0, 0], [0, 0, 0, 9, 10, 11, 15, 16]])
    mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    el = extraction_likelihood(SuccessorLM(), ids, mask, n=2, batch_size=3)
    expected = [brute_el(SuccessorLM(), s, 2) for s in (BROKEN, [5, 6, 7, 8], [9, 10, 11, 15, 16])]
    assert el.tolist() == pytest.approx(expected)


def test_ngram_overlap_counts_continuation_multiplicity():
    # continuation bigrams (1,2),(2,1),(1,2),(2,1): (1,2) is a reference bigram, hit twice; 4 reference bigrams
    assert _ngram_overlap([1, 2, 1, 2, 1], [1, 2, 3, 4, 5], 2) == 0.5


def test_el_argument_errors():
    with pytest.raises(ValueError, match="positive int"):
        extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=0)
    with pytest.raises(ValueError, match="prefix_stride"):
        extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=2, prefix_stride=0)
    with pytest.raises(ValueError, match="single int"):
        extraction_likelihood(SuccessorLM(), torch.tensor([BROKEN]), n=(2, 3))


def test_el_on_tiny_llama_matches_brute_force(tiny_llama):
    seqs = [[5, 9, 17, 33, 40, 41], [7, 8, 100, 3]]
    ids, mask, _ = pad_batch([{"input_ids": s} for s in seqs])
    el = extraction_likelihood(tiny_llama, ids, mask, n=2, batch_size=4)
    expected = [brute_el(tiny_llama, s, 2) for s in seqs]
    assert el.tolist() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------ greedy


def test_greedy_generate_cached_matches_naive(tiny_model):
    prompts = [[5, 9, 17], [7], [100, 3, 11, 12]]
    budgets = [4, 6, 2]
    shapes = []
    hook = tiny_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    fast = greedy_generate(tiny_model, prompts, budgets, batch_size=3)  # left padding + KV cache
    hook.remove()
    assert shapes[0][1] == 4 and {s[1] for s in shapes[1:]} == {1}  # the cache is used after the first step
    # rows leave the batch when their budget is spent (budgets 6, 4, 2 -> 3, 3, 2, 2, 1, 1 rows per step)
    assert [s[0] for s in shapes] == [3, 3, 2, 2, 1, 1]
    assert [len(f) for f in fast] == budgets
    for prompt, budget, got in zip(prompts, budgets, fast):  # naive reference: no padding, no cache
        cur = list(prompt)
        for _ in range(budget):
            with torch.no_grad():
                cur.append(int(tiny_model(input_ids=torch.tensor([cur])).logits[0, -1].argmax()))
        assert got == cur[len(prompt) :]


def test_greedy_generate_drops_rows_finished_by_eos_without_changing_the_rest(tiny_model):
    prompts = [[5, 9, 17], [7], [100, 3, 11, 12], [40, 41]]
    free = greedy_generate(tiny_model, prompts, 6, batch_size=4)
    eos = free[1][1]  # row 1 emits it at its second step: with it as EOS, row 1 leaves the batch early
    batched = greedy_generate(tiny_model, prompts, 6, batch_size=4, eos_token_id=eos)
    one_by_one = [greedy_generate(tiny_model, [p], 6, batch_size=1, eos_token_id=eos)[0] for p in prompts]
    assert batched == one_by_one
    assert len(batched[1]) <= 2 and batched[1][-1] == eos


def test_greedy_generate_stops_at_eos():
    out = greedy_generate(SuccessorLM(), [[3], [8]], 6, eos_token_id=6)
    assert out == [[4, 5, 6], [9, 10, 11, 12, 13, 14]]


def test_greedy_generate_errors():
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_generate(SuccessorLM(), [[]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(SuccessorLM(), [[1], [2]], [1])
    with pytest.raises(ValueError, match="batch_size"):
        greedy_generate(SuccessorLM(), [[1]], 1, batch_size=0)


# ------------------------------------------------------------------------------------------------ NLL


def test_sequence_nll_and_perplexity_match_cross_entropy(tiny_llama):
    ids = torch.tensor([[5, 9, 17, 33], [7, 8, 100, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    total, count = sequence_nll(tiny_llama, ids, mask)
    assert count.tolist() == [3, 2]
    expected = []
    for row, m in zip(ids, mask):
        seq = row[m.bool()]
        with torch.no_grad():
            logits = tiny_llama(input_ids=seq[None]).logits[0, :-1]
        expected.append(F.cross_entropy(logits, seq[1:], reduction="sum").item())
    assert total.tolist() == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_llama, ids, mask) == pytest.approx(math.exp(sum(expected) / 5), rel=1e-5)
    lps = token_log_probs(tiny_llama, ids, mask)
    assert [lp.numel() for lp in lps] == [3, 2]
    assert -lps[0].sum().item() == pytest.approx(expected[0], rel=1e-5)


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_memorization_hand_values():
    data = [BROKEN, RULE]
    out = evaluate_memorization(SuccessorLM(), data, el_n=(2, 3), batch_size=1)
    assert set(out) == {"ma", "el2", "el3", "nll", "ppl"}
    assert out["ma"] == pytest.approx((6 / 7 + 1) / 2)
    assert out["el2"] == pytest.approx((19 / 45 + 1) / 2)
    assert out["el3"] == pytest.approx((brute_el(SuccessorLM(), BROKEN, 3) + 1) / 2)
    # token NLL: correct tokens have -log softmax(10 at target) = log(1 + 19 e^-10); the wrong one 10 + that
    base = math.log(1 + (V - 1) * math.exp(-10))
    n_tokens = 7 + 9
    assert out["nll"] == pytest.approx((n_tokens * base + 10) / n_tokens, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["nll"]), rel=1e-6)


def test_evaluate_memorization_input_formats():
    model = SuccessorLM()
    ref = evaluate_memorization(model, [BROKEN, RULE], el_n=2)
    as_dicts = [{"input_ids": BROKEN}, {"input_ids": RULE}]
    assert evaluate_memorization(model, as_dicts, el_n=2) == pytest.approx(ref)
    prepadded = [
        {"input_ids": BROKEN + [0, 0], "attention_mask": [1] * 8 + [0, 0]},
        {"input_ids": RULE, "attention_mask": [1] * 10},
    ]
    assert evaluate_memorization(model, prepadded, el_n=2) == pytest.approx(ref)
    assert evaluate_memorization(model, {"input_ids": [BROKEN, RULE]}, el_n=2) == pytest.approx(ref)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(as_dicts)
    assert evaluate_memorization(model, ds, el_n=2) == pytest.approx(ref)
    with_labels = [{"input_ids": BROKEN, "labels": [-100, -100, -100, 3, 7, 8, 9, 10]}]
    out = evaluate_memorization(model, with_labels, el_n=2)
    assert out["ma"] == pytest.approx(4 / 5)
    assert out["el2"] == pytest.approx(0.5)


def test_evaluate_memorization_without_el_and_undefined_el():
    out = evaluate_memorization(SuccessorLM(), [BROKEN], compute_el=False, show_progress=True)
    assert set(out) == {"ma", "nll", "ppl"}
    out = evaluate_memorization(SuccessorLM(), [BROKEN, [1, 2, 3]], el_n=(5,))  # EL5 undefined for the short one
    assert out["el5"] == pytest.approx(brute_el(SuccessorLM(), BROKEN, 5))


def test_evaluate_memorization_errors():
    with pytest.raises(TypeError, match="data"):
        evaluate_memorization(SuccessorLM(), 3)
    with pytest.raises(ValueError, match="input_ids"):
        evaluate_memorization(SuccessorLM(), [{"ids": [1, 2]}])
    with pytest.raises(ValueError, match="labels"):
        evaluate_memorization(SuccessorLM(), [{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_memorization(SuccessorLM(), [[1, 2]], batch_size=0)
    with pytest.raises(ValueError, match="distributed"):
        evaluate_memorization(SuccessorLM(), [[1, 2]], distributed="all")
    with pytest.raises(ValueError, match="el_n"):
        evaluate_memorization(SuccessorLM(), [[1, 2]], el_n=())
    with pytest.raises(TypeError, match=r"data\[0\]"):
        evaluate_memorization(SuccessorLM(), [3.5])


def test_evaluate_memorization_restores_mode_on_peft_model(tiny_llama):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    out = evaluate_memorization(peft_model, [[5, 9, 17, 33, 40, 41]], el_n=(2,))
    assert peft_model.training
    prompts = [[5, 9, 17], [7, 8]]  # the cache kwarg is found through PeftModel's **kwargs forward
    assert greedy_generate(peft_model, prompts, 3) == greedy_generate(peft_model, prompts, 3, use_cache=False)
    assert all(math.isfinite(v) for v in out.values())
    assert 0 <= out["ma"] <= 1 and 0 <= out["el2"] <= 1


def test_compute_ma_metrics_for_plain_trainer():
    logits = torch.zeros(2, 4, V)
    ids = torch.tensor([BROKEN[:4], [5, 6, 9, -100]])
    # prediction at position t = successor of x_t (what SuccessorLM would output)
    preds = preprocess_logits_for_ma(SuccessorLM()(torch.tensor([BROKEN[:4], [5, 6, 9, 0]])).logits, None)
    assert preprocess_logits_for_ma((logits,), None).shape == (2, 4)
    out = compute_ma_metrics((preds.numpy(), ids.numpy()))
    assert out["ma"] == pytest.approx((1.0 + 0.5) / 2)


# ------------------------------------------------------------------------------------------------ distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, data, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = evaluate_memorization(SuccessorLM(), data, el_n=(2,), batch_size=2)
        queue.put((rank, out))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_evaluate_memorization_gathers_across_ranks():
    import torch.multiprocessing as mp

    data = [BROKEN, RULE, [5, 6, 9, 10, 11], [1, 2, 3], [4, 9, 10, 2, 3, 4]]
    expected = evaluate_memorization(SuccessorLM(), data, el_n=(2,))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, data, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    for rank in (0, 1):
        assert results[rank] == pytest.approx(expected)


def test_pad_batch_mixed_labels_are_fully_supervised():
    ids, mask, labels = pad_batch([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5]}], 9)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[-100, 2, 3], [4, 5, -100]]
    with pytest.raises(ValueError, match="empty"):
        pad_batch([])
