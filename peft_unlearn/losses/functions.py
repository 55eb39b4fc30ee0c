"""The loss functions: pure functions on causal-LM logits, sequence log-probs or hidden states.

See `peft_unlearn.losses` for the conventions (unshifted logits and labels, `reduction`, memory units).

Examples:
    >>> import torch
    >>> round(nll_loss(torch.zeros(1, 3, 4), torch.tensor([[1, 2, 3]])).item(), 4)  # log 4
    1.3863
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import IGNORE_INDEX
from .ihl_kernel import InvertedHingeFunction

__all__ = [
    "gradient_ascent_loss",
    "inverted_hinge_loss",
    "kl_loss",
    "nll_loss",
    "npo_loss",
    "quantization_margin_loss",
    "rmu_control_vector",
    "rmu_loss",
    "sequence_log_probs",
    "simnpo_loss",
]

_REDUCTIONS = ("mean", "sum")


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


def _check_label_range(supervised: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise a clear error for supervised label ids outside ``[0, vocab_size)`` (one host synchronisation)."""
    if supervised.numel() == 0:
        return
    low, high = int(supervised.min()), int(supervised.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"labels hold the token id {bad}, outside the vocabulary of the logits [0, {vocab_size}); mask unsupervised "
            f"positions with ignore_index={ignore_index} and check that the tokenizer matches the model (resize the "
            "embeddings after adding tokens)."
        )


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
    _check_label_range(targets[mask], n_cols, ignore_index)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    per_token = InvertedHingeFunction.apply(logits.reshape(-1, n_cols), targets, mask, needs_grad)
    return _reduce(per_token.sum(), mask.sum(), reduction)


def quantization_margin_loss(
    logits: Tensor, labels: Tensor, margin: float, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    """A margin on the forget logits against quantization: ``max(0, z_y - max_{v != y} z_v + margin)`` per token.

    The defence idea of QUAIL (arXiv 2601.15538) against the quantization attack of Zhang et al. (arXiv
    2410.16454): after forgetting, the true token ``y`` must trail the best other token by at least ``margin``
    logits, so that the small logit shifts of a 4- or 8-bit reload cannot make it the argmax again. Zero once the
    margin holds; next to IHL it keeps pushing only the tokens that are forgotten by less than the margin.

    Memory: no ``[N, V]`` tensor beyond the logits (a gather and a top-2 per row); the logits are not saved.

    Args:
        logits: Unshifted logits ``[B, T, V]``.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        margin: The logit margin (> 0).
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over supervised tokens or ``"sum"``.

    Returns:
        Scalar loss (fp32 for half-precision logits).

    Examples:
        >>> logits = torch.tensor([[[0.0, 3.0, 1.0], [0.0, 0.0, 0.0]]])
        >>> quantization_margin_loss(logits, torch.tensor([[0, 2]]), margin=1.0).item()  # z_2 - z_1 + 1
        0.0
        >>> quantization_margin_loss(logits, torch.tensor([[0, 1]]), margin=1.0).item()  # z_1 - z_2 + 1
        3.0
    """
    _check_reduction(reduction)
    _check_logits_labels(logits, labels)
    if not isinstance(margin, (int, float)) or not 0 < margin < float("inf"):
        raise ValueError(f"`margin` must be a finite number > 0, got {margin!r}.")
    n_cols = logits.shape[-1]
    if n_cols < 2:
        raise ValueError(
            f"quantization_margin_loss needs a vocabulary of at least 2 tokens, got {tuple(logits.shape)}."
        )
    flat = logits.reshape(-1, n_cols)
    targets = _shift_labels(labels, ignore_index).reshape(-1)
    mask = targets != ignore_index
    safe = targets.clamp_min(0).unsqueeze(-1)
    dtype = torch.promote_types(flat.dtype, torch.float32)  # fp32 for half precision, float64 stays float64
    true = flat.gather(-1, safe).squeeze(-1).to(dtype)
    top_values, top_ids = flat.topk(2, dim=-1)
    other = torch.where(top_ids[:, 0] == safe.squeeze(-1), top_values[:, 1], top_values[:, 0]).to(dtype)
    per_token = torch.relu(true - other + float(margin)) * mask
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
    Memory: same as `nll_loss` (that of ``cross_entropy``).

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
      `nll_loss`) count, and ``"mean"`` averages over them. This is a **deliberate fix** of the official code,
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
    with ``l`` the summed NLL of the sequence. Memory: that of ``cross_entropy`` (see `nll_loss`).

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

    With ``l = -logps`` the summed NLL of a sequence:
    ``loss_b = (2 / beta) * -log sigmoid(beta * (l_theta - l_ref)) = -(2/beta) logsigmoid(beta (ref - policy))``.
    At ``policy == reference`` it equals ``(2 / beta) log 2``. Memory: ``[B]`` vectors only (the logits cost is
    in `sequence_log_probs`).

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
    `sequence_log_probs`); open-unlearning counts unshifted labels, which differs only when the first
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


# ----------------------------------------------------------------------------------------------------------------
# representation misdirection (RMU)
# ----------------------------------------------------------------------------------------------------------------


def rmu_control_vector(hidden_size: int, steering_coeff: float = 6.5, seed: int = 0) -> Tensor:
    """The RMU target `c * u`: a fixed random unit vector `u` scaled by the steering coefficient `c`.

    `u` is drawn uniformly in `[0, 1)^d` from a generator seeded with `seed` and normalised to unit length, as in
    WMDP's RMU (Li et al. 2024), so a seed always gives the same direction on every device.

    Args:
        hidden_size: Width `d` of the hidden states.
        steering_coeff: `c`, the norm of the target; it should be large compared with the typical norm of the
            layer's activations (WMDP uses 6.5 for Zephyr-7B layer 7).
        seed: Seed of the direction.

    Returns:
        A float32 CPU tensor `[d]` of norm `steering_coeff`.

    Raises:
        ValueError: If `hidden_size < 1` or `steering_coeff` is not a finite number > 0.

    Examples:
        >>> v = rmu_control_vector(16, steering_coeff=2.0, seed=0)
        >>> round(v.norm().item(), 4), bool((v >= 0).all())
        (2.0, True)
    """
    if not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}.")
    if not isinstance(steering_coeff, (int, float)) or not 0 < steering_coeff < float("inf"):
        raise ValueError(f"steering_coeff must be a finite number > 0, got {steering_coeff!r}.")
    generator = torch.Generator().manual_seed(int(seed))
    direction = torch.rand(hidden_size, generator=generator, dtype=torch.float32)
    return direction / direction.norm() * float(steering_coeff)


def rmu_loss(hidden_states: Tensor, target: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Representation misdirection loss: squared distance of one layer's hidden states to a target, per token.

    ``loss_t = (1 / d) * sum_i (h_t[i] - target_t[i])^2`` for each counted token `t` (the mean squared error over
    the `d` hidden dimensions). On forget data the target is `rmu_control_vector` (the same `c * u` at every
    token); on retain data it is the frozen model's hidden states at the same layer (detached inside), which keeps
    them where they were (Li et al. 2024, WMDP). Computed in fp32. Memory: two `[B, T, d]` fp32 tensors.

    Args:
        hidden_states: Hidden states `[B, T, d]` of the trained model (with grad).
        target: `[d]` (broadcast to every token) or `[B, T, d]`; gets no gradient.
        mask: Optional `[B, T]` selection of the counted tokens (bool or 0/1); `None` counts every token.
        reduction: `"mean"` over counted tokens (0, attached to the graph, when there is none) or `"sum"`.

    Returns:
        Scalar fp32 loss (`>= 0`).

    Raises:
        ValueError: On shapes that do not match.

    Examples:
        >>> h = torch.zeros(1, 2, 4)
        >>> rmu_loss(h, torch.full((4,), 2.0)).item()  # every coordinate is 2 away
        4.0
    """
    _check_reduction(reduction)
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be a tensor [B, T, d], got {getattr(hidden_states, 'shape', None)}.")
    if target.shape not in (hidden_states.shape[-1:], hidden_states.shape):
        raise ValueError(
            f"target must have shape [d] or [B, T, d] matching hidden_states {tuple(hidden_states.shape)}, got "
            f"{tuple(target.shape)}."
        )
    if mask is not None and mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"mask must have shape [B, T] = {tuple(hidden_states.shape[:2])}, got {tuple(mask.shape)}.")
    diff = hidden_states.float() - target.detach().to(hidden_states.device, torch.float32)
    per_token = diff.pow(2).mean(dim=-1)
    if mask is None:
        return _reduce(per_token.sum(), torch.tensor(per_token.numel(), device=per_token.device), reduction)
    keep = mask.bool()
    return _reduce(per_token[keep].sum(), keep.sum(), reduction)
