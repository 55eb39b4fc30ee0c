"""Tests for peft_unlearn.losses against brute-force loops and a naive (official-code style) IHL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peft_unlearn import losses
from peft_unlearn.losses import (
    FORGET_LOSSES,
    LOSS_REGISTRY,
    RETAIN_LOSSES,
    get_loss,
    gradient_ascent_loss,
    ihl_kernel,
    inverted_hinge_loss,
    kl_loss,
    loss_table,
    nll_loss,
    npo_loss,
    reference_users,
    rmu_control_vector,
    rmu_loss,
    sequence_log_probs,
    simnpo_loss,
)

IGNORE = -100


# ----------------------------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------------------------


def naive_ihl(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Official-code style IHL: slice the shifted logits, softmax, one-hot, masked max (autograd does the rest)."""
    vocab = logits.shape[-1]
    z = logits[:, :-1, :].reshape(-1, vocab)
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE
    probs = torch.softmax(z[keep], dim=-1)
    one_hot = F.one_hot(y[keep], vocab).bool()
    p_true = probs[one_hot]
    p_other = probs.masked_fill(one_hot, float("-inf")).amax(dim=-1)
    per_token = torch.clamp(1.0 + p_true - p_other, min=0.0)
    return per_token.mean() if reduction == "mean" else per_token.sum()


def _softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    exps = [math.exp(v - m) for v in row]
    s = sum(exps)
    return [e / s for e in exps]


def _positions(labels: torch.Tensor):
    """(b, t, y) for every position t whose next label y is supervised (brute-force shift)."""
    batch, length = labels.shape
    for b in range(batch):
        for t in range(length - 1):
            y = int(labels[b, t + 1])
            if y != IGNORE:
                yield b, t, y


def brute_ihl(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    total, count = 0.0, 0
    for b, t, y in _positions(labels):
        p = _softmax_row(logits[b, t].tolist())
        runner_up = max(p[v] for v in range(len(p)) if v != y)
        total += max(0.0, 1.0 + p[y] - runner_up)
        count += 1
    return total, count


def brute_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    total, count = 0.0, 0
    for b, t, y in _positions(labels):
        p = _softmax_row(logits[b, t].tolist())
        total += -math.log(p[y])
        count += 1
    return total, count


def brute_kl_row(z: list[float], z_ref: list[float]) -> float:
    p, q = _softmax_row(z), _softmax_row(z_ref)
    return sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))


def make_batch(batch=3, length=7, vocab=11, dtype=torch.float64, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    # prompt / padding patterns: prompt at the start of row 0, padding at the end of row 2, a hole in row 1
    labels[0, :3] = IGNORE
    if batch > 1:
        labels[1, 4] = IGNORE
    if batch > 2:
        labels[2, -2:] = IGNORE
    return logits.requires_grad_(True), labels


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the chunked IHL kernels to use chunks of 2 rows (several chunks, runs split across chunks)."""

    def set_vocab(vocab: int) -> None:
        monkeypatch.setattr(ihl_kernel, "_CHUNK_ELEMENTS", {"cpu": 2 * vocab})
        monkeypatch.setattr(ihl_kernel, "_DEFAULT_CHUNK_ELEMENTS", 2 * vocab)

    return set_vocab


# ----------------------------------------------------------------------------------------------------------------
# inverted hinge loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ihl_value_matches_brute_force(reduction):
    logits, labels = make_batch()
    total, count = brute_ihl(logits.detach(), labels)
    expected = total / count if reduction == "mean" else total
    got = inverted_hinge_loss(logits, labels, reduction=reduction)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("block", [None, 4, 5])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ihl_gradient_equals_naive_autograd(reduction, chunked, block, small_chunks, monkeypatch):
    logits, labels = make_batch(batch=4, length=9, vocab=13, seed=1)
    labels[3, :] = IGNORE  # a fully padded sequence
    if chunked:
        small_chunks(13)
    if block is not None:  # runner-up search over blocks of 4 or 5 columns, with a short last block
        monkeypatch.setattr(ihl_kernel, "_RUNNER_UP_BLOCK", block)
    ours = inverted_hinge_loss(logits, labels, reduction=reduction)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = naive_ihl(logits, labels, reduction=reduction)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-12, rtol=0)
    # rows that predict no supervised token (last position, prompt, padding) get exactly zero gradient
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    assert torch.all(grad_ours[shifted == IGNORE] == 0)


@pytest.mark.parametrize("vocab,block", [(13, 4), (13, 5), (16, 4), (7, 1024), (40, 7), (2, 1)])
def test_two_level_runner_up_search_brute_force(vocab, block):
    gen = torch.Generator().manual_seed(vocab * 100 + block)
    z = torch.randn(200, vocab, generator=gen)
    y = torch.randint(0, vocab, (200,), generator=gen)
    y[:vocab] = torch.arange(vocab)  # every column is the target at least once
    z[::3] = z[::3].scatter(1, y[::3].unsqueeze(1), 10.0)  # target is the maximum in a third of the rows
    block = min(block, vocab)
    block_max = ihl_kernel._block_max(z, block)
    assert block_max.shape == (200, -(-vocab // block))
    row_max = block_max.amax(dim=-1)
    runner_up = ihl_kernel._runner_up(z, block_max, y, block)
    for r in range(z.shape[0]):
        row = z[r].tolist()
        assert row_max[r].item() == max(row)
        others = [(v, -c) for c, v in enumerate(row) if c != int(y[r])]
        assert int(runner_up[r]) == -max(others)[1]  # largest value, lowest column on ties


def test_ihl_gradient_with_upstream_scale():
    logits, labels = make_batch(seed=2)
    (g1,) = torch.autograd.grad(3.5 * inverted_hinge_loss(logits, labels), logits)
    (g2,) = torch.autograd.grad(3.5 * naive_ihl(logits, labels), logits)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)


def test_ihl_gradient_target_is_top1_and_not_top1():
    # row 0: target is the argmax (runner-up = second largest); row 1: target is not the argmax
    logits = torch.tensor([[[3.0, 1.0, 0.5, -1.0], [0.2, 2.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    logits.requires_grad_(True)
    labels = torch.tensor([[IGNORE, 0, 3]])
    ours = inverted_hinge_loss(logits, labels, reduction="sum")
    (g,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(naive_ihl(logits, labels, reduction="sum"), logits)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)
    p = torch.softmax(logits.detach()[0], dim=-1)
    # hand formula (IHL gradient, Cha et al. 2025): row 0 -> y=0, k=1; row 1 -> y=3, k=1
    for row, y, k in ((0, 0, 1), (1, 3, 1)):
        py, pk = p[row, y], p[row, k]
        expected = p[row] * (pk - py)
        expected[y] = py * (1 - py) + py * pk
        expected[k] = -pk * (1 + py - pk)
        torch.testing.assert_close(g[0, row], expected, atol=1e-12, rtol=0)


def test_ihl_gradient_signs_and_zero_row_sums():
    logits, labels = make_batch(batch=2, length=6, vocab=9, seed=3)
    (g,) = torch.autograd.grad(inverted_hinge_loss(logits, labels, reduction="sum"), logits)
    z = logits.detach()
    for b, t, y in _positions(labels):
        row = g[b, t]
        masked = z[b, t].clone()
        masked[y] = float("-inf")
        k = int(masked.argmax())
        assert row[y] > 0, "descent must lower the true-token logit"
        assert row[k] < 0, "descent must raise the runner-up logit"
        assert abs(row.sum().item()) < 1e-12


def test_ihl_range_and_extremes():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 16, 50, generator=gen, dtype=torch.float64) * 30.0
    labels = torch.randint(0, 50, (4, 16), generator=gen)
    # make the target dominant in some rows (IHL -> 2) and negligible in others (IHL -> 0)
    logits[0, :-1].scatter_(1, labels[0, 1:].unsqueeze(1), 1e4)
    per_token_max = inverted_hinge_loss(logits[:1], labels[:1]).item()
    assert per_token_max == pytest.approx(2.0, abs=1e-12)
    value = inverted_hinge_loss(logits, labels)
    assert torch.isfinite(value) and 0.0 <= value.item() <= 2.0
    for b, t, _y in _positions(labels):
        one = inverted_hinge_loss(logits[b : b + 1, t : t + 2], labels[b : b + 1, t : t + 2]).item()
        assert 0.0 <= one <= 2.0


def test_ihl_minimum_when_runner_up_takes_all_mass():
    logits = torch.full((1, 2, 5), -1e4, dtype=torch.float64)
    logits[0, 0, 2] = 0.0  # all mass on token 2, target is token 4
    value = inverted_hinge_loss(logits, torch.tensor([[IGNORE, 4]]))
    assert value.item() == pytest.approx(0.0, abs=1e-12)


def test_ihl_uniform_logits_is_exactly_one():
    for vocab in (2, 7, 1000):
        logits = torch.zeros(2, 5, vocab)
        labels = torch.randint(0, vocab, (2, 5))
        assert inverted_hinge_loss(logits, labels).item() == 1.0
        assert inverted_hinge_loss(logits.double() + 3.0, labels).item() == 1.0


def test_ihl_all_masked_is_zero_and_attached():
    logits, labels = make_batch()
    labels[:] = IGNORE
    loss = inverted_hinge_loss(logits, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)
    assert inverted_hinge_loss(logits, labels, reduction="sum").item() == 0.0
    # only the first token supervised: after the shift nothing is supervised
    labels[:, 0] = 1
    assert inverted_hinge_loss(logits, labels).item() == 0.0


def test_ihl_ignore_index_argument():
    logits, labels = make_batch()
    relabelled = labels.clone()
    relabelled[labels == IGNORE] = -1
    a = inverted_hinge_loss(logits, labels)
    b = inverted_hinge_loss(logits, relabelled, ignore_index=-1)
    assert a.item() == b.item()


def test_ihl_low_precision_close_to_fp32():
    logits32, labels = make_batch(batch=2, length=16, vocab=300, dtype=torch.float32, seed=5)
    loss32 = inverted_hinge_loss(logits32, labels)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        low = logits32.detach().to(dtype).requires_grad_(True)
        loss = inverted_hinge_loss(low, labels)
        assert loss.dtype == torch.float32  # accumulated in fp32
        assert loss.item() == pytest.approx(loss32.item(), abs=tol)
        # same rounded logits in fp32: same runner-up (also under ties created by the rounding), fp32 math
        upcast = low.detach().float().requires_grad_(True)
        ref = inverted_hinge_loss(upcast, labels)
        assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
        assert ref.item() == pytest.approx(naive_ihl(upcast.detach(), labels).item(), abs=1e-6)
        loss.backward()
        ref.backward()
        assert low.grad.dtype == dtype
        # only two roundings to the logits' dtype differ (exp(z - max) is stored in it, then scaled in place):
        # <= 2 half-ulps relative (= eps), or 2 half-ulps of the smallest subnormal where fp16 underflows
        info = torch.finfo(dtype)
        torch.testing.assert_close(low.grad.float(), upcast.grad, rtol=info.eps, atol=info.tiny * info.eps)


def test_ihl_runner_up_tie_goes_to_lowest_index():
    logits = torch.tensor([[[0.0, 2.0, 1.0, 2.0, 3.0], [0.0] * 5]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE, 4]])
    (g,) = torch.autograd.grad(inverted_hinge_loss(logits, labels, reduction="sum"), logits)
    p = torch.softmax(logits.detach()[0, 0], dim=-1)
    # runner-up is column 1: it gets -p_k (1 + p_y - p_k); column 3 gets the generic p_j (p_k - p_y)
    assert g[0, 0, 1].item() == pytest.approx((-p[1] * (1 + p[4] - p[1])).item(), abs=1e-12)
    assert g[0, 0, 3].item() == pytest.approx((p[3] * (p[1] - p[4])).item(), abs=1e-12)
    assert abs(g[0, 0].sum().item()) < 1e-12


def test_ihl_saves_one_vocab_sized_buffer_and_not_the_logits():
    logits, labels = make_batch(batch=2, length=8, vocab=64, dtype=torch.float32)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = inverted_hinge_loss(logits, labels)
    big = [t for t in saved if t.numel() >= logits.numel() // 2]
    assert len(big) == 1 and big[0].data_ptr() != logits.data_ptr(), [tuple(t.shape) for t in big]
    loss.backward()
    # the saved buffer became the gradient (no second [N, V] allocation)
    assert logits.grad.data_ptr() == big[0].data_ptr()
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inverted_hinge_loss(logits, labels)
    assert saved == []


def test_ihl_backward_twice_is_refused():
    logits, labels = make_batch()
    loss = inverted_hinge_loss(logits, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_ihl_without_grad_and_non_contiguous_logits():
    logits, labels = make_batch(seed=6)
    with torch.no_grad():
        value = inverted_hinge_loss(logits, labels)
    assert value.item() == pytest.approx(naive_ihl(logits, labels).item(), abs=1e-12)
    transposed = logits.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    assert not transposed.is_contiguous()
    (g,) = torch.autograd.grad(inverted_hinge_loss(transposed, labels), transposed)
    (g_ref,) = torch.autograd.grad(naive_ihl(transposed, labels), transposed)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# NLL / GA
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nll_and_gradient_ascent_match_brute_force(reduction):
    logits, labels = make_batch(seed=7)
    total, count = brute_nll(logits.detach(), labels)
    expected = total / count if reduction == "mean" else total
    assert nll_loss(logits, labels, reduction=reduction).item() == pytest.approx(expected, abs=1e-12)
    assert gradient_ascent_loss(logits, labels, reduction=reduction).item() == pytest.approx(-expected, abs=1e-12)


def test_nll_matches_hf_style_shift_and_mean():
    logits, labels = make_batch(seed=8)
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert nll_loss(logits, labels).item() == pytest.approx(hf.item(), abs=1e-12)


def test_sum_equals_mean_times_count():
    logits, labels = make_batch(seed=9)
    count = sum(1 for _ in _positions(labels))
    for fn in (nll_loss, gradient_ascent_loss, inverted_hinge_loss):
        mean = fn(logits, labels, reduction="mean").item()
        total = fn(logits, labels, reduction="sum").item()
        assert total == pytest.approx(mean * count, rel=1e-12)
    ref = logits.detach() + 0.3 * torch.randn_like(logits)
    mean = kl_loss(logits, ref, labels, reduction="mean").item()
    assert kl_loss(logits, ref, labels, reduction="sum").item() == pytest.approx(mean * count, rel=1e-12)


@pytest.mark.parametrize("fn", [nll_loss, gradient_ascent_loss, inverted_hinge_loss])
def test_all_masked_mean_is_zero_not_nan(fn):
    logits, labels = make_batch()
    labels[:] = IGNORE
    loss = fn(logits, labels)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.all(logits.grad == 0)


# ----------------------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------------------


def test_kl_masked_and_unmasked_match_brute_force():
    logits, labels = make_batch(seed=10)
    ref = logits.detach() + torch.randn_like(logits)
    batch, length, _ = logits.shape
    all_rows = [brute_kl_row(logits[b, t].tolist(), ref[b, t].tolist()) for b in range(batch) for t in range(length)]
    masked_rows = [brute_kl_row(logits[b, t].tolist(), ref[b, t].tolist()) for b, t, _ in _positions(labels)]
    unmasked = kl_loss(logits, ref)
    masked = kl_loss(logits, ref, labels)
    assert unmasked.item() == pytest.approx(sum(all_rows) / len(all_rows), abs=1e-12)
    assert masked.item() == pytest.approx(sum(masked_rows) / len(masked_rows), abs=1e-12)
    assert masked.item() != pytest.approx(unmasked.item(), abs=1e-6)
    assert kl_loss(logits, ref, reduction="sum").item() == pytest.approx(sum(all_rows), abs=1e-12)
    # parity mode equals torch's batchmean over the flattened positions (official code)
    vocab = logits.shape[-1]
    official = F.kl_div(
        F.log_softmax(logits.reshape(-1, vocab), -1), F.softmax(ref.reshape(-1, vocab), -1), reduction="batchmean"
    )
    assert unmasked.item() == pytest.approx(official.item(), abs=1e-12)


def test_kl_zero_when_equal_and_gradient_only_to_policy():
    logits, labels = make_batch(seed=11)
    ref = logits.detach().clone().requires_grad_(True)
    loss = kl_loss(logits, ref, labels)
    assert loss.item() == pytest.approx(0.0, abs=1e-14)
    loss.backward()
    assert torch.allclose(logits.grad, torch.zeros_like(logits.grad), atol=1e-14)
    assert ref.grad is None


def test_kl_gradient_is_p_theta_minus_p_ref_on_selected_rows():
    logits, labels = make_batch(seed=12)
    ref = logits.detach() + torch.randn_like(logits)
    (g,) = torch.autograd.grad(kl_loss(logits, ref, labels, reduction="sum"), logits)
    expected = torch.softmax(logits.detach(), -1) - torch.softmax(ref, -1)
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    expected[shifted == IGNORE] = 0
    torch.testing.assert_close(g, expected, atol=1e-12, rtol=0)


def test_kl_all_masked_is_zero():
    logits, labels = make_batch()
    labels[:] = IGNORE
    loss = kl_loss(logits, logits.detach() + 1.0 * torch.randn_like(logits), labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


# ----------------------------------------------------------------------------------------------------------------
# sequence log-probs, NPO, SimNPO
# ----------------------------------------------------------------------------------------------------------------


def test_sequence_log_probs_match_brute_force():
    logits, labels = make_batch(seed=13)
    logps, counts = sequence_log_probs(logits, labels)
    expected = [0.0] * labels.shape[0]
    expected_counts = [0] * labels.shape[0]
    for b, t, y in _positions(labels):
        expected[b] += math.log(_softmax_row(logits[b, t].tolist())[y])
        expected_counts[b] += 1
    assert counts.tolist() == expected_counts and counts.dtype == torch.long
    torch.testing.assert_close(logps.detach(), torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    labels[1] = IGNORE
    logps, counts = sequence_log_probs(logits, labels)
    assert logps[1].item() == 0.0 and counts[1].item() == 0


def test_npo_matches_formula():
    beta = 0.1
    policy = torch.tensor([-12.0, -3.5, -40.0], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([-10.0, -6.0, -41.0], dtype=torch.float64)
    expected = []
    for pol, ref in zip(policy.tolist(), reference.tolist()):
        l_theta, l_ref = -pol, -ref  # summed NLL
        sig = 1.0 / (1.0 + math.exp(-beta * (l_theta - l_ref)))
        expected.append((2.0 / beta) * -math.log(sig))
    assert npo_loss(policy, reference, beta).item() == pytest.approx(sum(expected) / 3, abs=1e-12)
    assert npo_loss(policy, reference, beta, reduction="sum").item() == pytest.approx(sum(expected), abs=1e-12)
    # decreasing the policy likelihood (forgetting) decreases the loss
    assert npo_loss(policy - 5.0, reference, beta).item() < npo_loss(policy, reference, beta).item()


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_at_reference(beta):
    policy = torch.tensor([-5.0, -7.0, -1.0], dtype=torch.float64, requires_grad=True)
    reference = policy.detach().clone().requires_grad_(True)
    loss = npo_loss(policy, reference, beta)
    assert loss.item() == pytest.approx((2.0 / beta) * math.log(2.0), abs=1e-12)
    loss.backward()
    # d/d policy of -(2/beta) logsigmoid(beta (ref - pol)) = 2 sigmoid(beta (pol - ref)) = 1 at pol == ref; mean / B
    torch.testing.assert_close(policy.grad, torch.full_like(policy, 1.0 / 3), atol=1e-12, rtol=0)
    assert reference.grad is None


def test_simnpo_matches_formula():
    beta, delta = 4.5, 0.3
    policy = torch.tensor([-12.0, -3.5, -40.0, 0.0], dtype=torch.float64)
    num_tokens = torch.tensor([10, 2, 25, 0])
    expected = []
    for pol, n in zip(policy.tolist(), num_tokens.tolist()):
        per_token_nll = -pol / max(n, 1)
        sig = 1.0 / (1.0 + math.exp(-beta * (per_token_nll - delta)))
        expected.append((2.0 / beta) * -math.log(sig))
    got = simnpo_loss(policy, num_tokens, beta=beta, delta=delta)
    assert got.item() == pytest.approx(sum(expected) / 4, abs=1e-12)
    got_sum = simnpo_loss(policy, num_tokens.double(), beta=beta, delta=delta, reduction="sum")
    assert got_sum.item() == pytest.approx(sum(expected), abs=1e-12)
    # forgetting (lower likelihood) lowers the loss; a larger delta raises it
    assert simnpo_loss(policy - 10.0, num_tokens).item() < simnpo_loss(policy, num_tokens).item()
    assert simnpo_loss(policy, num_tokens, delta=1.0).item() > simnpo_loss(policy, num_tokens, delta=0.0).item()
    zero = simnpo_loss(torch.zeros(2), torch.tensor([3, 4]))
    assert zero.item() == pytest.approx((2.0 / 4.5) * math.log(2.0), abs=1e-6)


def test_npo_from_sequence_log_probs_end_to_end():
    logits, labels = make_batch(seed=14)
    ref_logits = logits.detach() + 0.5 * torch.randn_like(logits)
    pol, n = sequence_log_probs(logits, labels)
    ref, _ = sequence_log_probs(ref_logits, labels)
    loss = npo_loss(pol, ref) + simnpo_loss(pol, n)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# errors and constants
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [inverted_hinge_loss, gradient_ascent_loss, nll_loss])
def test_bad_reduction(fn):
    logits, labels = make_batch()
    with pytest.raises(ValueError, match="reduction='none'"):
        fn(logits, labels, reduction="none")


def test_bad_reduction_other_losses():
    logits, labels = make_batch()
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="reduction='avg'"):
        kl_loss(logits, logits.detach(), labels, reduction="avg")
    with pytest.raises(ValueError, match="reduction='batchmean'"):
        npo_loss(x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="reduction='max'"):
        simnpo_loss(x, x, reduction="max")


@pytest.mark.parametrize("fn", [inverted_hinge_loss, gradient_ascent_loss, nll_loss, sequence_log_probs])
def test_shape_mismatch_names_both_shapes(fn):
    logits = torch.zeros(2, 5, 7)
    with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) and labels \(2, 4\)"):
        fn(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits \(10, 7\) and labels \(10,\)"):
        fn(logits.view(10, 7), torch.zeros(10, dtype=torch.long))


def test_type_errors():
    logits = torch.zeros(2, 5, 7)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        inverted_hinge_loss(logits, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        nll_loss(torch.zeros(2, 5, 7, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="must be torch.Tensor"):
        nll_loss([[0.0]], torch.zeros(2, 5, dtype=torch.long))


def test_ihl_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        inverted_hinge_loss(torch.zeros(1, 3, 1), torch.zeros(1, 3, dtype=torch.long))


def test_kl_errors():
    logits = torch.zeros(2, 5, 7)
    with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) and ref_logits \(2, 5, 8\)"):
        kl_loss(logits, torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match=r"labels \(2, 4\)"):
        kl_loss(logits, logits, torch.zeros(2, 4, dtype=torch.long))


def test_npo_simnpo_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"policy_logps and reference_logps .* \(3,\) and \(2,\)"):
        npo_loss(x, torch.zeros(2))
    with pytest.raises(ValueError, match=r"policy_logps and num_tokens .* \(3,\) and \(4,\)"):
        simnpo_loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match="beta must be > 0, got beta=0"):
        npo_loss(x, x, beta=0)
    with pytest.raises(ValueError, match="beta must be > 0, got beta=-1.0"):
        simnpo_loss(x, x, beta=-1.0)


def test_loss_name_constants():
    assert FORGET_LOSSES == ("inverted_hinge", "gradient_ascent", "npo", "simnpo", "idk", "rmu")
    assert RETAIN_LOSSES == ("nll", "kl", "rmu")


def test_docstring_examples():
    import doctest

    result = doctest.testmod(losses, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------------------------
# RMU
# ---------------------------------------------------------------------------------------------------------------


def _rmu_brute_force(hidden, target, mask):
    """Explicit loops in float64: sum over counted tokens of the mean squared error over hidden dimensions."""
    batch, length, width = hidden.shape
    total, count = 0.0, 0
    for b in range(batch):
        for t in range(length):
            if mask is not None and not mask[b, t]:
                continue
            goal = target if target.dim() == 1 else target[b, t]
            total += sum((float(hidden[b, t, i]) - float(goal[i])) ** 2 for i in range(width)) / width
            count += 1
    return total, count


@pytest.mark.parametrize("per_token_target", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_rmu_loss_matches_brute_force(per_token_target, masked):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 6, generator=gen) if per_token_target else rmu_control_vector(6, 3.0, seed=1)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]]).bool() if masked else None
    total, count = _rmu_brute_force(hidden.detach(), target, mask)
    torch.testing.assert_close(
        rmu_loss(hidden, target, mask, reduction="sum").double(), torch.tensor(total, dtype=torch.float64)
    )
    mean = rmu_loss(hidden, target, mask)
    torch.testing.assert_close(mean.double(), torch.tensor(total / count, dtype=torch.float64))
    mean.backward()
    # d/dh of (1/count) * sum_t mean_i (h - g)^2 = 2 (h - g) / (d * count) on counted tokens, 0 elsewhere
    goal = target.expand_as(hidden).double()
    keep = torch.ones(2, 5, dtype=torch.bool) if mask is None else mask
    expected = (2 * (hidden.detach() - goal) / (6 * count)) * keep.unsqueeze(-1)
    torch.testing.assert_close(hidden.grad, expected, atol=1e-6, rtol=1e-5)
    assert target.grad is None


def test_rmu_control_vector_is_seeded_and_scaled():
    a, b, c = rmu_control_vector(32, 6.5, seed=3), rmu_control_vector(32, 6.5, seed=3), rmu_control_vector(32, 6.5, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.norm().item() == pytest.approx(6.5, rel=1e-6)
    # a uniform [0, 1) draw normalised to unit length, as in WMDP
    gen = torch.Generator().manual_seed(3)
    raw = torch.rand(32, generator=gen)
    torch.testing.assert_close(a, raw / raw.norm() * 6.5)


def test_rmu_errors():
    with pytest.raises(ValueError, match=r"target must have shape \[d\] or \[B, T, d\]"):
        rmu_loss(torch.zeros(1, 2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\] = \(1, 2\)"):
        rmu_loss(torch.zeros(1, 2, 4), torch.zeros(4), torch.ones(2, 2))
    with pytest.raises(ValueError, match="steering_coeff must be a finite number > 0, got inf"):
        rmu_control_vector(4, float("inf"))


# ---------------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------------


def test_registry_is_the_single_source():
    from peft_unlearn.trainer.model_card import build_model_card
    from peft_unlearn.trainer.unlearning_config import DEFAULT_BETA, UnlearningConfig

    assert {(s.role, s.name) for s in LOSS_REGISTRY} == {("forget", n) for n in FORGET_LOSSES} | {
        ("retain", n) for n in RETAIN_LOSSES
    }
    assert DEFAULT_BETA == {"npo": 0.1, "simnpo": 4.5}
    assert reference_users("npo", "rmu") == ["forget_loss='npo'", "retain_loss='rmu'"]
    assert get_loss("retain", "kl").needs_reference and not get_loss("forget", "simnpo").needs_reference
    for spec in LOSS_REGISTRY:
        assert spec.normalization in ("tokens", "sequences")
        assert spec.metrics == (f"{spec.role}_loss", f"{spec.role}_nll")
        assert (spec.reference is not None) == spec.needs_reference, spec.name
        assert spec.description in build_model_card(**{f"{spec.role}_loss": spec.name})
        if spec.role == "forget":
            UnlearningConfig(output_dir="o", report_to="none", forget_loss=spec.name)
    with pytest.raises(ValueError, match="`forget_loss` must be one of 'inverted_hinge', .*'rmu', got 'mse'"):
        get_loss("forget", "mse")


def test_docs_loss_tables_match_the_registry():
    page = (Path(__file__).parent.parent / "docs" / "concepts" / "losses.md").read_text()
    for role in ("forget", "retain"):
        assert loss_table(role) in page, f"docs/concepts/losses.md: regenerate the table with loss_table({role!r})"


# ----------------------------------------------------------------------------------------------------------------
# quantization margin (the QUAIL-style defence of UnlearningConfig.quantization_margin)
# ----------------------------------------------------------------------------------------------------------------
def _naive_margin(logits, labels, margin):
    """Brute force in float64: a loop over the supervised shifted positions."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    z = logits.double()
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            others = torch.cat([z[b, t, :y], z[b, t, y + 1 :]])
            total = total + torch.clamp(z[b, t, y] - others.max() + margin, min=0)
            count += 1
    return total, count


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_quantization_margin_matches_brute_force(reduction):
    from peft_unlearn.losses import quantization_margin_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 9, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 9, (3, 6), generator=gen)
    labels[0, :3] = -100
    labels[1, 2] = logits[1, 1].argmax()  # a position where the target is the argmax
    logits.requires_grad_(True)
    got = quantization_margin_loss(logits, labels, margin=1.5, reduction=reduction)
    ref = logits.detach().clone().requires_grad_(True)
    total, count = _naive_margin(ref, labels, 1.5)
    want = total if reduction == "sum" else total / count
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_quantization_margin_bad_margin_and_config():
    from peft_unlearn import UnlearningConfig
    from peft_unlearn.losses import quantization_margin_loss

    with pytest.raises(ValueError, match="`margin`"):
        quantization_margin_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), margin=0.0)
    with pytest.raises(ValueError, match="`quantization_margin` must be"):
        UnlearningConfig(output_dir="o", report_to="none", quantization_margin=-1.0)
    with pytest.raises(ValueError, match="inverted_hinge"):
        UnlearningConfig(output_dir="o", report_to="none", quantization_margin=2.0, forget_loss="npo")
    assert UnlearningConfig(output_dir="o", report_to="none", quantization_margin=2.0).quantization_margin == 2.0


def test_quantization_margin_is_added_to_the_ihl_term():
    """The trainer's IHL term with the margin is IHL + margin, both summed over the forget tokens."""
    from types import SimpleNamespace

    from peft_unlearn.losses import LossBatch, get_loss, inverted_hinge_loss
    from peft_unlearn.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    inputs = {"forget_input_ids": ids, "forget_attention_mask": torch.ones_like(ids), "forget_labels": ids}
    spec = get_loss("forget", "inverted_hinge")
    plain = spec.term(LossBatch(inputs, SimpleNamespace(quantization_margin=None)), model, None)
    with_margin = spec.term(LossBatch(inputs, SimpleNamespace(quantization_margin=3.0)), model, None)
    logits = model(input_ids=ids).logits
    assert plain.total.item() == pytest.approx(inverted_hinge_loss(logits, ids, reduction="sum").item(), rel=1e-5)
    total, _ = _naive_margin(logits.detach(), ids, 3.0)
    assert (with_margin.total - plain.total).item() == pytest.approx(total.item(), rel=1e-5)
    assert with_margin.count == plain.count
