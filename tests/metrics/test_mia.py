"""Tests for peft_unlearn.metrics.mia (Min-k% Prob, AUC, PrivLeak)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peft_unlearn.metrics import mia_auc, min_k_prob_scores, privleak

V = 20


class SuccessorLM(torch.nn.Module):
    """Toy LM: next token = (x + 1) mod V with a one-hot logit of 10."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=F.one_hot((input_ids + 1) % V, V).float() * 10.0)


BASE = math.log(1 + (V - 1) * math.exp(-10))  # NLL of a correctly predicted token
BROKEN = [0, 1, 2, 3, 7, 8, 9, 10]  # 7 scored tokens, one (7) mispredicted: log p = -(10 + BASE)


def test_min_k_hand_values():
    model = SuccessorLM()
    # k=0.4: int(0.4 * 7) = 2 lowest log-probs: the wrong token and one correct token
    assert min_k_prob_scores(model, [BROKEN], k=0.4).item() == pytest.approx((-(10 + BASE) - BASE) / 2, rel=1e-6)
    # k=0.1: int(0.7) = 0 -> at least one token
    assert min_k_prob_scores(model, [BROKEN], k=0.1).item() == pytest.approx(-(10 + BASE), rel=1e-6)
    # k=1: mean log-prob
    assert min_k_prob_scores(model, [BROKEN], k=1.0).item() == pytest.approx(-(10 + 7 * BASE) / 7, rel=1e-6)


def test_min_k_with_labels_and_empty_sequences():
    model = SuccessorLM()
    data = [{"input_ids": BROKEN, "labels": [-100, -100, -100, -100, -100, 8, 9, 10]}, {"input_ids": [4]}]
    scores = min_k_prob_scores(model, data, k=0.5)
    assert scores[0].item() == pytest.approx(-BASE, rel=1e-6)  # the wrong token (position 4) is masked out
    assert math.isnan(scores[1].item())


def test_min_k_matches_independent_computation(tiny_llama):
    seqs = [[5, 9, 17, 33, 40, 41], [7, 8, 100]]
    scores = min_k_prob_scores(tiny_llama, seqs, k=0.4, batch_size=2)
    for seq, got in zip(seqs, scores):
        ids = torch.tensor([seq])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0, :-1], -1)
        lp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        k = max(1, int(0.4 * lp.numel()))
        assert got.item() == pytest.approx(lp.sort().values[:k].mean().item(), rel=1e-5)


def test_min_k_errors():
    with pytest.raises(ValueError, match="k"):
        min_k_prob_scores(SuccessorLM(), [BROKEN], k=0.0)
    with pytest.raises(ValueError, match="k"):
        min_k_prob_scores(SuccessorLM(), [BROKEN], k=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        min_k_prob_scores(SuccessorLM(), [BROKEN], batch_size=0)


def brute_force_auc(members, nonmembers):
    wins = 0.0
    for m in members:
        for n in nonmembers:
            wins += 1.0 if m > n else 0.5 if m == n else 0.0
    return wins / (len(members) * len(nonmembers))


def test_mia_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        members = rng.integers(0, 6, size=13).astype(float)  # many ties
        nonmembers = rng.integers(0, 6, size=9).astype(float)
        assert mia_auc(members, nonmembers) == pytest.approx(brute_force_auc(members, nonmembers))
    assert mia_auc([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert mia_auc([0.0], [1.0]) == 0.0
    assert mia_auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5


def test_mia_auc_errors():
    with pytest.raises(ValueError, match="member_scores"):
        mia_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        mia_auc([1.0], [float("nan")])


def test_mia_auc_separates_a_memorizing_model():
    members = [[3, 4, 5, 6, 7, 8], [10, 11, 12, 13, 14, 15]]  # follow the successor rule
    nonmembers = [[3, 9, 1, 6, 2, 8], [10, 4, 12, 0, 14, 3]]
    model = SuccessorLM()
    auc = mia_auc(min_k_prob_scores(model, members), min_k_prob_scores(model, nonmembers))
    assert auc == 1.0


def _privleak_by_hand(auc: float, retain_auc: float) -> float:
    # MUSE's orientation: lower score = member, AUC' = 1 - AUC; PrivLeak = (AUC' - AUC'_retain) / AUC'_retain * 100
    flipped, flipped_retain = 1 - auc, 1 - retain_auc
    return (flipped - flipped_retain) / flipped_retain * 100


def test_privleak():
    # hand-computed at retain_auc != 0.5: (0.6 - 0.55) / (1 - 0.6) * 100 = 12.5; (0.6 - 0.9) / 0.4 * 100 = -75
    assert privleak(0.55, 0.6) == pytest.approx(12.5)
    assert privleak(0.9, 0.6) == pytest.approx(-75.0)
    assert privleak(0.3, 0.2) == pytest.approx(-12.5)
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)  # un-unlearned target: MUSE's ~ -100
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.25, 0.5) == pytest.approx(50.0)  # over-unlearning is positive
    for auc, retain_auc in [(0.7, 0.3), (0.1, 0.8), (0.95, 0.05), (0.6, 0.0)]:
        assert privleak(auc, retain_auc) == pytest.approx(_privleak_by_hand(auc, retain_auc))
    with pytest.raises(ValueError, match="retain_auc` is 1"):
        privleak(0.5, 1.0)
    with pytest.raises(ValueError, match="auc"):
        privleak(1.5, 0.5)
