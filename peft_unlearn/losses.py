"""Unlearning losses on Hugging Face causal-LM outputs.

Every token-level loss takes the **unshifted** ``logits [B, T, V]`` and ``labels [B, T]`` a Hugging Face causal
LM uses (position ``t`` of the logits predicts token ``t + 1``), with ``ignore_index`` (-100) marking tokens that
are not supervised (prompt, padding). The shift is done inside by shifting the *labels*
(``labels[:, 1:]`` padded with ``ignore_index`` at the end); the logits are never sliced, because slicing makes
autograd materialise one more ``[tokens, vocab]`` gradient tensor.

``reduction``:

* ``"mean"``: mean over supervised tokens (over sequences for :func:`npo_loss` / :func:`simnpo_loss`). When no
  token is supervised the result is ``0`` and still attached to the autograd graph (zero gradient) instead of NaN,
  so a micro-batch made only of padding does not poison training.
* ``"sum"``: plain sum; the trainer divides by a global count for exact gradient accumulation.

Memory costs are given in units of one ``[N, V]`` tensor of the logits' dtype, ``N = B * T``.

Implemented losses (see ``paper-notes.md`` sections 1-2 for the formulas and their provenance):

* :func:`inverted_hinge_loss`: IHL of Cha et al. (arXiv 2408.06621), ``1 + p_y - max_{v != y} p_v`` per token,
  with a hand-written backward that needs a single ``[N, V]`` gradient buffer.
* :func:`gradient_ascent_loss` (``-NLL``), :func:`nll_loss`, :func:`kl_loss` (retain KL to a reference model),
  :func:`sequence_log_probs`, :func:`npo_loss`, :func:`simnpo_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .utils import IGNORE_INDEX

__all__ = [
    "FORGET_LOSSES",
    "RETAIN_LOSSES",
    "gradient_ascent_loss",
    "inverted_hinge_loss",
    "kl_loss",
    "nll_loss",
    "npo_loss",
    "sequence_log_probs",
    "simnpo_loss",
]

FORGET_LOSSES: tuple[str, ...] = ("inverted_hinge", "gradient_ascent", "npo", "simnpo", "idk")
"""Names of the forget-set losses the trainer accepts (``idk`` is the NLL of "I don't know" answers)."""

RETAIN_LOSSES: tuple[str, ...] = ("nll", "kl")
"""Names of the retain-set losses the trainer accepts."""

_REDUCTIONS = ("mean", "sum")

# Number of logits processed at once by the chunked IHL kernels (rows are grouped up to this many elements, at
# least one row per chunk). On CPU a chunk that stays in cache makes the successive elementwise passes nearly free;
# on GPU bigger chunks keep the number of kernel launches low. The fp32 scratch buffer has this many elements.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_CHUNK_ELEMENTS = 1 << 25
# Block width of the two-level runner-up search (block maxima with a vectorised ``amax``, then ``argmax`` over the
# block maxima and inside one block): much cheaper than ``topk`` / ``argmax`` over the whole vocabulary.
_RUNNER_UP_BLOCK = 1024


# ----------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of {_REDUCTIONS} ('mean' or 'sum').")


def _check_logits_labels(logits: Tensor, labels: Tensor, logits_name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"{logits_name} and labels must be torch.Tensor, got {type(logits).__name__} and {type(labels).__name__}."
        )
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"{logits_name} must have shape [B, T, V] and labels [B, T] (unshifted, as returned by a Hugging Face "
            f"causal LM), got {logits_name} {tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    if not logits.is_floating_point():
        raise TypeError(f"{logits_name} must be a floating-point tensor, got dtype {logits.dtype}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}; use labels.long().")


def _shift_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """Labels aligned with the unshifted logits: ``out[:, t] = labels[:, t + 1]``, ``ignore_index`` at the end."""
    shifted = labels.new_full(labels.shape, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def _reduce(per_token_sum: Tensor, count: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return per_token_sum
    # clamp: with no supervised token the sum is an exact 0 attached to the graph, and 0 / 1 stays 0 (no NaN).
    return per_token_sum / count.clamp_min(1).to(per_token_sum.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Inverted Hinge Loss
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _row_chunks(mask: Tensor, n_cols: int) -> list[tuple[int, int]]:
    """Contiguous row ranges ``[start, stop)`` covering the True rows of ``mask``, each at most one chunk long."""
    rows = max(1, _CHUNK_ELEMENTS.get(mask.device.type, _DEFAULT_CHUNK_ELEMENTS) // max(n_cols, 1))
    flags = mask.to("cpu", torch.int8).tolist()  # one host sync per forward
    chunks: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate([*flags, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            chunks.extend((s, min(s + rows, i)) for s in range(start, i, rows))
            start = None
    return chunks


def _block_max(z: Tensor, block: int) -> Tensor:
    """Maxima ``[R, ceil(V / block)]`` of consecutive column blocks of ``z [R, V]`` (the last may be shorter)."""
    n_rows, n_cols = z.shape
    n_full = n_cols // block
    main = n_full * block
    block_max = z[:, :main].view(n_rows, n_full, block).amax(dim=-1)
    if main < n_cols:
        block_max = torch.cat([block_max, z[:, main:].amax(dim=-1, keepdim=True)], dim=1)
    return block_max


def _runner_up(z: Tensor, block_max: Tensor, y: Tensor, block: int) -> Tensor:
    """Index of the largest entry of each row of ``z [R, V]`` other than column ``y [R]``.

    Second level of the two-level search started by :func:`_block_max`: the maximum of the block holding ``y``
    is recomputed without ``y``, then ``argmax`` over the block maxima and inside the winning block. Only
    ``[R, V / block]`` and ``[R, block]`` temporaries. Ties go to the lowest block, then the lowest column of that
    block. ``block_max`` is modified in place.
    """
    n_cols = z.shape[1]
    offsets = torch.arange(block, device=z.device)
    y = y.unsqueeze(1)

    def block_values(block_index: Tensor) -> tuple[Tensor, Tensor]:
        # columns of the given block per row (clamped duplicates of the last column in a short last block do not
        # change a max), with column y excluded
        cols = (block_index.unsqueeze(1) * block + offsets).clamp_max(n_cols - 1)
        values = z.gather(1, cols).masked_fill(cols == y, float("-inf"))
        return cols, values

    y_block = y // block
    _, values = block_values(y_block.squeeze(1))
    block_max.scatter_(1, y_block, values.amax(dim=-1, keepdim=True).to(block_max.dtype))
    cols, values = block_values(block_max.argmax(dim=-1))
    return cols.gather(1, values.argmax(dim=-1, keepdim=True)).squeeze(1)


def _zero_uncovered_rows(buf: Tensor, chunks: list[tuple[int, int]]) -> None:
    """Zero the rows of ``buf`` outside the (sorted, disjoint) chunks, with slices (a boolean row mask would expand
    to a full ``[N, V]`` masked fill)."""
    previous_stop = 0
    for start, stop in [*chunks, (buf.shape[0], buf.shape[0])]:
        if start > previous_stop:
            buf[previous_stop:start].zero_()
        previous_stop = stop


class _InvertedHingeFunction(torch.autograd.Function):
    """Per-token IHL on 2-D logits ``[N, V]`` whose gradient lives in a single ``[N, V]`` buffer.

    Forward, chunk by chunk over the supervised rows: block maxima (for the row maximum ``m`` and the runner-up
    search of :func:`_runner_up`), then ``e = exp(z - m)`` (fp32 arithmetic) and its row sum ``S``. When a gradient
    is needed, ``e`` is written into a buffer of the logits' dtype that is saved for backward (the logits are not);
    otherwise into a small scratch buffer. With ``p = e / S``, backward turns the buffer *in place* into the
    gradient ``p_j (p_k - p_y)`` (one multiply by ``g (p_k - p_y) / S`` per row) and overwrites columns ``y``
    and ``k``:

        dIHL/dz_y = p_y (1 - p_y) + p_y p_k,   dIHL/dz_k = -p_k (1 + p_y - p_k),   dIHL/dz_j = p_j (p_k - p_y).

    Backward through the same graph twice (``retain_graph=True``) is refused by autograd's saved-tensor version
    check, because the first backward consumed the buffer.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, mask: Tensor, needs_grad: bool) -> Tensor:  # type: ignore[override]
        n_rows, n_cols = logits.shape
        device = logits.device
        cdtype = _compute_dtype(logits.dtype)
        low_precision = logits.dtype != cdtype
        chunks = _row_chunks(mask, n_cols)
        safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
        block = max(1, min(_RUNNER_UP_BLOCK, n_cols))
        lse = torch.zeros(n_rows, dtype=cdtype, device=device)
        inv_sum = torch.zeros(n_rows, dtype=cdtype, device=device)
        block_max = torch.zeros(n_rows, -(-n_cols // block), dtype=logits.dtype, device=device)
        buf = None
        if needs_grad:
            buf = torch.empty(n_rows, n_cols, dtype=logits.dtype, device=device)
            _zero_uncovered_rows(buf, chunks)
        scratch = None
        if chunks and (low_precision or buf is None):
            max_rows = max(stop - start for start, stop in chunks)
            scratch = torch.empty(max_rows, n_cols, dtype=cdtype, device=device)
        for start, stop in chunks:
            z = logits[start:stop]
            block_max[start:stop] = _block_max(z, block)
            row_max = block_max[start:stop].amax(dim=-1, keepdim=True).to(cdtype)
            tmp = scratch[: stop - start] if scratch is not None else buf[start:stop]
            if low_precision:  # upcast bf16/fp16 rows into the fp32 scratch (faster than a mixed-dtype sub)
                tmp.copy_(z)
                tmp.sub_(row_max)
            else:
                torch.sub(z, row_max, out=tmp)
            tmp.exp_()
            row_sum = tmp.sum(dim=-1)
            if buf is not None and scratch is not None:
                buf[start:stop].copy_(tmp)
            inv_sum[start:stop] = row_sum.reciprocal()
            lse[start:stop] = row_sum.log_().add_(row_max.squeeze(1))
        runner_up = _runner_up(logits, block_max, safe_targets, block)
        z_y = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1).to(cdtype)
        z_k = logits.gather(1, runner_up.unsqueeze(1)).squeeze(1).to(cdtype)
        p_y = torch.exp(z_y - lse)
        p_k = torch.exp(z_k - lse)
        per_token = torch.where(mask, 1.0 + (p_y - p_k), torch.zeros_like(p_y))
        if buf is not None:
            ctx.save_for_backward(buf, safe_targets, runner_up, mask, inv_sum, p_y, p_k)
        ctx.chunks = chunks
        return per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad, targets, runner_up, mask, inv_sum, p_y, p_k = ctx.saved_tensors
        n_rows, n_cols = grad.shape
        g = torch.where(mask, grad_output.to(p_y.dtype), torch.zeros_like(p_y))
        factor = (g * (p_k - p_y) * inv_sum).unsqueeze(1)  # buffer holds exp(z - m); p = buffer / S
        if grad.dtype == factor.dtype or grad.device.type != "cpu":
            # one pass; on GPU a bf16 *= fp32 multiply computes in fp32 and rounds once
            for start, stop in ctx.chunks:
                grad[start:stop].mul_(factor[start:stop])
        else:  # CPU half precision: mixed-dtype in-place ops are slow there, go through an fp32 scratch
            max_rows = max((stop - start for start, stop in ctx.chunks), default=0)
            scratch = torch.empty(max_rows, n_cols, dtype=factor.dtype, device=grad.device)
            for start, stop in ctx.chunks:
                tmp = scratch[: stop - start]
                tmp.copy_(grad[start:stop])
                tmp.mul_(factor[start:stop])
                grad[start:stop].copy_(tmp)
        # overwrite columns y and k through flat indices (scatter_ along dim 1 is very slow for bf16 on CPU);
        # y != k in every row, and the unsupervised rows receive zeros
        row_offsets = torch.arange(n_rows, device=grad.device) * n_cols
        flat = grad.view(-1)
        flat.index_put_((row_offsets + targets,), (g * p_y * (1.0 - p_y + p_k)).to(grad.dtype))
        flat.index_put_((row_offsets + runner_up,), (-g * p_k * (1.0 + p_y - p_k)).to(grad.dtype))
        return grad, None, None, None


def inverted_hinge_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    """Inverted Hinge Loss (IHL) of Cha et al. (arXiv 2408.06621) for forgetting.

    Per supervised token with target ``y`` and ``p = softmax(z)``: ``IHL = 1 + p_y - max_{v != y} p_v`` in
    ``[0, 2]`` (the hinge ``max(0, .)`` of the paper never clamps). Minimising it pushes the true token below the
    runner-up ``k``, which is re-chosen at every position and call without stop-gradient.

    Memory: exactly one ``[N, V]`` tensor in the logits' dtype, allocated in forward (it holds ``exp(z - max)``
    of the supervised rows, zeros elsewhere), saved for backward and turned *in place* into the returned gradient;
    backward allocates nothing of size ``[N, V]``. The logits are **not** saved, so a caller that drops them frees
    them before backward. Both passes use an fp32 scratch buffer of at most ~1M elements on CPU (32M elsewhere)
    for bf16/fp16 logits, which are never copied to fp32 as a whole; the sums run in fp32, and the gradient is
    rounded twice to the logits' dtype (stored ``exp``, then scaled), i.e. within one ``eps``. Small buffers:
    block maxima ``[N, V / 1024]`` and a few ``[N]`` vectors. For comparison ``torch.nn.functional.cross_entropy``
    keeps a ``[N, V]`` log-softmax and allocates two more ``[N, V]`` tensors in backward. Without grad (``no_grad``
    or logits not requiring grad) no ``[N, V]`` tensor is allocated. Only positions with a supervised shifted label
    are computed. Non-contiguous logits are copied once by ``reshape``. The forward does one host synchronisation
    (to find the supervised rows). Double backward, or backward twice through the same graph, is not supported
    (the latter raises autograd's "modified by an inplace operation" error).

    Args:
        logits: Unshifted logits ``[B, T, V]`` of any floating dtype.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over supervised tokens (0, attached to the graph, when there is none) or ``"sum"``.

    Returns:
        Scalar loss, fp32 for half-precision logits, otherwise in the logits' dtype.

    Examples:
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> labels = torch.randint(0, 11, (2, 5))
        >>> loss = inverted_hinge_loss(logits, labels)
        >>> loss.backward()
        >>> 0.0 <= loss.item() <= 2.0
        True
    """
    _check_reduction(reduction)
    _check_logits_labels(logits, labels)
    n_cols = logits.shape[-1]
    if n_cols < 2:
        raise ValueError(
            f"inverted_hinge_loss needs a vocabulary of at least 2 tokens, got logits {tuple(logits.shape)}."
        )
    targets = _shift_labels(labels, ignore_index).reshape(-1)
    mask = targets != ignore_index
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    per_token = _InvertedHingeFunction.apply(logits.reshape(-1, n_cols), targets, mask, needs_grad)
    return _reduce(per_token.sum(), mask.sum(), reduction)


# ----------------------------------------------------------------------------------------------------------------
# likelihood losses
# ----------------------------------------------------------------------------------------------------------------


def _summed_nll(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    targets = _shift_labels(labels, ignore_index).reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=ignore_index, reduction="sum")
    return total, (targets != ignore_index).sum()


def nll_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> Tensor:
    """Token negative log-likelihood, the Hugging Face causal-LM loss (retain loss of GD / IHL).

    Memory: that of ``torch.nn.functional.cross_entropy``: one ``[N, V]`` log-softmax kept for backward, and
    backward allocates two ``[N, V]`` tensors (gradient w.r.t. the log-probs, then w.r.t. the logits).

    Args:
        logits: Unshifted logits ``[B, T, V]``.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over supervised tokens (0, attached to the graph, when there is none) or ``"sum"``.

    Returns:
        Scalar loss.

    Examples:
        >>> logits = torch.zeros(1, 3, 4)
        >>> round(nll_loss(logits, torch.tensor([[1, 2, 3]])).item(), 4)  # log(4)
        1.3863
    """
    _check_reduction(reduction)
    _check_logits_labels(logits, labels)
    total, count = _summed_nll(logits, labels, ignore_index)
    return _reduce(total, count, reduction)


def gradient_ascent_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    """Gradient ascent (GA) forget loss: the negated token NLL, ``-nll_loss(...)``.

    Unbounded below; its gradient is spread over every vocabulary entry in proportion to ``p_j``.
    Memory: same as :func:`nll_loss` (that of ``cross_entropy``).

    Args:
        logits: Unshifted logits ``[B, T, V]``.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over supervised tokens (0, attached to the graph, when there is none) or ``"sum"``.

    Returns:
        Scalar loss (``<= 0``).

    Examples:
        >>> logits = torch.zeros(1, 3, 4)
        >>> round(gradient_ascent_loss(logits, torch.tensor([[1, 2, 3]])).item(), 4)
        -1.3863
    """
    return -nll_loss(logits, labels, ignore_index=ignore_index, reduction=reduction)


def kl_loss(
    logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> Tensor:
    """KL(p_ref || p_theta) per position, the retain loss of GA+KL (``ref_logits`` get no gradient).

    ``KL_t = sum_v p_ref(v) (log p_ref(v) - log p_theta(v))`` for each position ``t`` of the unshifted logits.

    * ``labels`` given: only the positions that predict a supervised token (``labels`` shifted exactly as for
      :func:`nll_loss`) count, and ``"mean"`` averages over them. This is a **deliberate fix** of the official code,
      whose KL also runs over prompt and padding positions.
    * ``labels=None``: every one of the ``B * T`` positions counts (official-code parity mode, its ``batchmean``
      over the flattened positions).

    Memory: with ``n`` selected positions, about four ``[n, V]`` tensors in forward (a copy of the selected rows of
    each input when ``labels`` is given, both log-softmaxes, the elementwise KL term) of which the policy
    log-softmax is kept for backward; backward allocates about two more ``[n, V]`` tensors.

    Args:
        logits: Unshifted policy logits ``[B, T, V]``.
        ref_logits: Reference-model logits, same shape (detached inside).
        labels: Optional token ids ``[B, T]`` selecting positions (see above).
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over counted positions (0, attached to the graph, when there is none) or ``"sum"``.

    Returns:
        Scalar loss (``>= 0`` up to rounding).

    Examples:
        >>> logits = torch.randn(2, 4, 7)
        >>> kl_loss(logits, logits.clone()).abs().item() < 1e-6
        True
    """
    _check_reduction(reduction)
    if not isinstance(ref_logits, Tensor) or not isinstance(logits, Tensor):
        raise TypeError(
            f"logits and ref_logits must be torch.Tensor, got {type(logits).__name__} and {type(ref_logits).__name__}."
        )
    if ref_logits.shape != logits.shape or logits.dim() != 3:
        raise ValueError(
            f"logits and ref_logits must both have shape [B, T, V], got logits {tuple(logits.shape)} and "
            f"ref_logits {tuple(ref_logits.shape)}."
        )
    n_cols = logits.shape[-1]
    flat = logits.reshape(-1, n_cols)
    ref_flat = ref_logits.detach().reshape(-1, n_cols)
    if labels is not None:
        _check_logits_labels(logits, labels)
        positions = (_shift_labels(labels, ignore_index).reshape(-1) != ignore_index).nonzero().squeeze(1)
        flat = flat.index_select(0, positions)
        ref_flat = ref_flat.index_select(0, positions)
        count = positions.new_tensor(positions.numel())
    else:
        count = torch.tensor(flat.shape[0], device=logits.device)
    log_p = F.log_softmax(flat, dim=-1)
    with torch.no_grad():
        log_p_ref = F.log_softmax(ref_flat.to(log_p.dtype), dim=-1)
    total = F.kl_div(log_p, log_p_ref, reduction="sum", log_target=True)
    return _reduce(total, count, reduction)


# ----------------------------------------------------------------------------------------------------------------
# sequence-level losses
# ----------------------------------------------------------------------------------------------------------------


def sequence_log_probs(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed log-probability of the supervised tokens of each sequence, and their number.

    ``logps[b] = sum_t log p_theta(labels[b, t+1] | x_<=t)`` over supervised shifted labels, i.e. ``-l(x_b)``
    with ``l`` the summed NLL of paper-notes section 2. Memory: that of ``cross_entropy`` (see :func:`nll_loss`).

    Args:
        logits: Unshifted logits ``[B, T, V]``.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        ignore_index: Label value that is skipped.

    Returns:
        ``(logps [B], num_tokens [B])``; ``logps`` has the logits' dtype (fp32 accumulation inside
        ``cross_entropy`` is PyTorch's), ``num_tokens`` is ``torch.long``. A sequence without supervised token
        has ``logps = 0`` and ``num_tokens = 0``.

    Examples:
        >>> logps, n = sequence_log_probs(torch.zeros(1, 3, 4), torch.tensor([[1, 2, 3]]))
        >>> n.tolist(), round(logps.item(), 4)  # 2 * log(1/4)
        ([2], -2.7726)
    """
    _check_logits_labels(logits, labels)
    targets = _shift_labels(labels, ignore_index)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(targets.shape)
    return -per_token.sum(dim=1), (targets != ignore_index).sum(dim=1)


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got beta={beta!r}.")


def npo_loss(policy_logps: Tensor, reference_logps: Tensor, beta: float = 0.1, reduction: str = "mean") -> Tensor:
    """Negative Preference Optimization (NPO) forget loss.

    With ``l = -logps`` the summed NLL of a sequence (paper-notes section 2):
    ``loss_b = (2 / beta) * -log sigmoid(beta * (l_theta - l_ref)) = -(2/beta) logsigmoid(beta (ref - policy))``.
    At ``policy == reference`` it equals ``(2 / beta) log 2``. Memory: ``[B]`` vectors only (the logits cost is
    in :func:`sequence_log_probs`).

    Args:
        policy_logps: Summed log-probs ``[B]`` under the trained model (with grad).
        reference_logps: Summed log-probs ``[B]`` under the frozen reference model (detached inside).
        beta: Inverse temperature, ``> 0``.
        reduction: ``"mean"`` over sequences or ``"sum"``.

    Returns:
        Scalar loss.

    Examples:
        >>> x = torch.tensor([-5.0, -7.0])
        >>> round(npo_loss(x, x, beta=0.1).item(), 4)  # 20 * log 2
        13.8629
    """
    _check_reduction(reduction)
    _check_beta(beta)
    if policy_logps.shape != reference_logps.shape:
        raise ValueError(
            f"policy_logps and reference_logps must have the same shape [B], got {tuple(policy_logps.shape)} and "
            f"{tuple(reference_logps.shape)}."
        )
    losses = -(2.0 / beta) * F.logsigmoid(beta * (reference_logps.detach() - policy_logps))
    return losses.mean() if reduction == "mean" else losses.sum()


def simnpo_loss(
    policy_logps: Tensor, num_tokens: Tensor, beta: float = 4.5, delta: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """SimNPO forget loss (reference-free, length-normalised NPO; defaults of open-unlearning).

    ``loss_b = (2 / beta) * -log sigmoid(beta * (l_theta(x_b) / |y_b| - delta))`` with ``l_theta = -policy_logps``
    the summed NLL and ``|y_b| = num_tokens`` (clamped to >= 1). The ``gamma`` weight of SimNPO is the trainer's
    ``forget_weight``. ``num_tokens`` counts the supervised *shifted* labels (as returned by
    :func:`sequence_log_probs`); open-unlearning counts unshifted labels, which differs only when the first
    token of a sequence is supervised. Memory: ``[B]`` vectors only.

    Args:
        policy_logps: Summed log-probs ``[B]`` under the trained model.
        num_tokens: Number of supervised tokens ``[B]`` (any numeric dtype).
        beta: Inverse temperature, ``> 0``.
        delta: Margin ``delta``.
        reduction: ``"mean"`` over sequences or ``"sum"``.

    Returns:
        Scalar loss.

    Examples:
        >>> round(simnpo_loss(torch.tensor([0.0]), torch.tensor([3])).item(), 4)  # (2/4.5) log 2
        0.3081
    """
    _check_reduction(reduction)
    _check_beta(beta)
    if policy_logps.shape != num_tokens.shape:
        raise ValueError(
            f"policy_logps and num_tokens must have the same shape [B], got {tuple(policy_logps.shape)} and "
            f"{tuple(num_tokens.shape)}."
        )
    per_token_nll = -policy_logps / num_tokens.clamp_min(1).to(policy_logps.dtype)
    losses = -(2.0 / beta) * F.logsigmoid(beta * (per_token_nll - delta))
    return losses.mean() if reduction == "mean" else losses.sum()
