"""Fused linear + loss: the unlearning losses from last hidden states, without materializing ``[tokens, vocab]`` logits.

A causal LM's logits are ``softcap(h W^T + b)`` with ``h [B, T, d]`` its last (normed) hidden states and ``W``
its output projection (`lm_head`, or the input embedding when tied). At real sizes (8 x 2048 tokens, a 262,144-token
vocabulary) these logits, not the weights, set the peak memory of a step. The functions here take ``h`` and an
`OutputHead` instead and run `FusedLinearStatsFunction`, which processes tokens in chunks of ``chunk_rows`` rows
and keeps only per-token statistics (``log p(y)``, the runner-up probability, the KL to a reference), so at most
one chunk of logits is alive in forward and in backward.

Every function equals its unfused twin in `peft_unlearn.losses.functions` (same shifting, ``ignore_index``,
``reduction``) up to floating-point rounding: `fused_inverted_hinge_loss`, `fused_nll_loss`,
`fused_sequence_log_probs`, `fused_kl_loss`, `fused_quantization_margin_loss`; `fused_token_statistics` is the common
core.

`model_hidden_states` runs a (PEFT-wrapped, possibly DDP-wrapped) model for its last hidden states only
(``output_hidden_states=[-1]`` and ``logits_to_keep=1``: the model projects one position), and `output_head`
reads the projection (tied or not, bias, Gemma's ``final_logit_softcapping``). LoRA on `lm_head` is refused.

Examples:
    >>> from peft_unlearn.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> ids = torch.randint(3, 300, (2, 6))
    >>> hidden = model_hidden_states(model, input_ids=ids)
    >>> fused = fused_nll_loss(hidden, output_head(model), ids)
    >>> from peft_unlearn.losses import nll_loss
    >>> torch.allclose(fused, nll_loss(model(input_ids=ids).logits, ids), atol=1e-5)
    True
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..utils import IGNORE_INDEX
from .fused_kernel import FusedLinearStatsFunction, default_chunk_rows

logger = logging.getLogger(__name__)

__all__ = [
    "FusedLossUnsupportedError",
    "OutputHead",
    "TokenStatistics",
    "fused_inverted_hinge_loss",
    "fused_kl_loss",
    "fused_nll_loss",
    "fused_quantization_margin_loss",
    "fused_sequence_log_probs",
    "fused_token_statistics",
    "model_hidden_states",
    "output_head",
    "fused_loss_unsupported_reason",
    "unwrap_causal_lm",
    "use_fused_loss",
]


class FusedLossUnsupportedError(ValueError):
    """The model cannot use the fused linear + loss path (the message says why and what to do)."""


@dataclass(frozen=True)
class OutputHead:
    """The output projection of a causal LM: ``logits = softcap(hidden @ weight.T + bias)``.

    Attributes:
        weight: ``[V, d]`` (the `lm_head` weight, or the input embedding when tied).
        bias: ``[V]`` or None.
        softcap: ``final_logit_softcapping`` (``c * tanh(z / c)``, Gemma 2/3) or None.
    """

    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        """Number of output rows ``V``."""
        return self.weight.shape[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """The full logits ``[..., V]`` (unfused; for tests and small inputs)."""
        z = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside DDP/accelerate (``.module``) and PEFT (``get_base_model()``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def output_head(model: torch.nn.Module) -> OutputHead:
    """The output projection of a (wrapped) causal LM, for the fused path.

    Args:
        model: A Hugging Face causal LM, possibly wrapped by PEFT and/or DDP.

    Returns:
        Its `OutputHead` (the live parameters: gradients reach them when they require grad).

    Raises:
        FusedLossUnsupportedError: If the model has no `get_output_embeddings()` ``nn.Linear``-like projection,
            or carries a LoRA (or other PEFT tuner) layer on it.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> output_head(tiny_causal_lm("gemma3", final_logit_softcapping=30.0)).softcap
        30.0
    """
    base = unwrap_causal_lm(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise FusedLossUnsupportedError(
            f"{type(base).__name__} has no output projection (`get_output_embeddings()` is None); the fused loss "
            "needs one. Set `fused_loss=False`."
        )
    wrapped = getattr(head, "modules_to_save", None)
    if wrapped is not None:  # PEFT `modules_to_save=["lm_head"]`: the active trained copy
        active = getattr(head, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        if getattr(head, "disable_adapters", False) or active not in wrapped:
            head = head.original_module
        else:
            head = wrapped[active]
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise FusedLossUnsupportedError(
            "The output projection (lm_head) carries a PEFT adapter layer (e.g. LoRA with target_modules including "
            "'lm_head'), which the fused loss does not support. Set `fused_loss=False`, or leave lm_head out of "
            "`target_modules` (train it with `modules_to_save=['lm_head']` if needed)."
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise FusedLossUnsupportedError(
            f"The output projection {type(head).__name__} has no 2-D `weight`; the fused loss supports "
            "`nn.Linear`-like heads only. Set `fused_loss=False`."
        )
    bias = getattr(head, "bias", None)
    softcap = getattr(getattr(base, "config", None), "final_logit_softcapping", None)
    return OutputHead(weight=weight, bias=bias if isinstance(bias, Tensor) else None, softcap=softcap)


def fused_loss_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why `model` cannot use the fused path, or None when it can.

    It can when `output_head` accepts its projection and its forward takes ``logits_to_keep`` (every Hugging Face
    causal LM of recent `transformers`, and Liger-Kernel's patched forwards).

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> fused_loss_unsupported_reason(tiny_causal_lm("gpt2")) is None
        True
    """
    try:
        output_head(model)
    except FusedLossUnsupportedError as err:
        return str(err)
    base = unwrap_causal_lm(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return (
            f"{type(base).__name__}.forward has no `logits_to_keep` argument, so it would compute the full logits "
            "anyway. Set `fused_loss=False` (or upgrade transformers / the model code)."
        )
    return None


def use_fused_loss(setting: bool | str, model: torch.nn.Module, ref_model: torch.nn.Module | None = None) -> bool:
    """Resolve `UnlearningConfig.fused_loss` for a model (and its explicit reference model, if any).

    Args:
        setting: ``True`` (required: raise when unsupported), ``False`` or ``"auto"`` (fused when supported).
        model: The trained model.
        ref_model: The explicit reference model (None: the model itself with adapters disabled).

    Returns:
        Whether the loss terms run on the fused path.

    Raises:
        FusedLossUnsupportedError: With ``setting=True`` when the model (or ``ref_model``) cannot use it.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> use_fused_loss("auto", tiny_causal_lm("llama")), use_fused_loss(False, tiny_causal_lm("llama"))
        (True, False)
    """
    if setting is False:
        return False
    reasons = [fused_loss_unsupported_reason(m) for m in (model, ref_model) if m is not None]
    reason = next((r for r in reasons if r is not None), None)
    if reason is None:
        return True
    if setting is True:
        raise FusedLossUnsupportedError(f"fused_loss=True: {reason}")
    logger.info("fused_loss='auto': using the unfused losses (full logits) because %s", reason)
    return False


def model_hidden_states(model: torch.nn.Module, **inputs: Any) -> Tensor:
    """Last (normed) hidden states ``[B, T, d]`` of a causal LM, without computing its full logits.

    Calls ``model(**inputs, use_cache=False, output_hidden_states=[-1], logits_to_keep=1)`` through every wrapper
    (so DDP, accelerate's autocast and PEFT's adapters apply as in a normal forward); the model then projects a
    single position. ``hidden_states[-1]`` is the final-norm output that `lm_head` reads.

    Args:
        model: A (wrapped) Hugging Face causal LM whose forward accepts ``logits_to_keep``.
        **inputs: ``input_ids``, ``attention_mask``, ...

    Returns:
        The hidden states, with grad when the forward runs with grad.

    Raises:
        FusedLossUnsupportedError: If the model returns no hidden states.
    """
    out = model(**inputs, use_cache=False, output_hidden_states=[-1], logits_to_keep=1)
    states = getattr(out, "hidden_states", None)
    if not states or states[-1] is None:
        raise FusedLossUnsupportedError(
            f"{type(unwrap_causal_lm(model)).__name__} returned no hidden states with output_hidden_states=[-1]; "
            "the fused loss needs them. Set `fused_loss=False`."
        )
    return states[-1]


@dataclass(frozen=True)
class TokenStatistics:
    """Per-token statistics of the supervised (or selected) positions of a batch, from `fused_token_statistics`.

    Attributes:
        positions: Flat indices ``[n]`` into ``B * T`` of the selected (unshifted) positions.
        log_p: ``log p(y)`` of the shifted target at each position ``[n]`` (zeros when no target is selected).
        runner_up_p: ``max_{v != y} p_v`` ``[n]`` (zeros unless requested).
        kl: ``KL(p_ref || p)`` ``[n]`` (zeros without a reference).
        shape: ``(B, T)``.
        runner_up_log_p: ``log max_{v != y} p_v`` ``[n]`` (zeros unless requested); ``log_p - runner_up_log_p`` is
            the logit margin ``z_y - max_{v != y} z_v``.
    """

    positions: Tensor
    log_p: Tensor
    runner_up_p: Tensor
    kl: Tensor
    shape: tuple[int, int]
    runner_up_log_p: Tensor | None = None

    def logit_margin(self) -> Tensor:
        """``z_y - max_{v != y} z_v`` per position ``[n]`` (of the capped logits; needs ``runner_up=True``)."""
        if self.runner_up_log_p is None:
            raise ValueError("logit_margin() needs statistics computed with runner_up=True.")
        return self.log_p - self.runner_up_log_p

    def per_sequence(self, values: Tensor) -> Tensor:
        """Sum of per-position ``values [n]`` over each sequence, ``[B]`` (differentiable)."""
        batch = self.positions // self.shape[1]
        return values.new_zeros(self.shape[0]).index_add(0, batch, values)


def _check_hidden(hidden: Tensor, labels: Tensor | None, head: OutputHead) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a tensor [B, T, d], got {getattr(hidden, 'shape', type(hidden).__name__)}.")
    if not isinstance(head, OutputHead):
        raise TypeError(f"head must be an OutputHead (see `output_head(model)`), got {type(head).__name__}.")
    if hidden.shape[-1] != head.weight.shape[1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} does not match the output projection {tuple(head.weight.shape)} [V, d]."
        )
    if labels is not None and (labels.dim() != 2 or labels.shape != hidden.shape[:2]):
        raise ValueError(
            f"labels must have shape [B, T] = {tuple(hidden.shape[:2])} (unshifted), got {tuple(labels.shape)}."
        )
    if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
        raise TypeError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}; use labels.long().")


def _check_chunk(chunk_rows: int | None, vocab_size: int) -> int:
    if chunk_rows is None:
        return default_chunk_rows(vocab_size)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an integer >= 1 or None (automatic), got {chunk_rows!r}.")
    return chunk_rows


def _shifted_targets(labels: Tensor, ignore_index: int) -> Tensor:
    shifted = labels.new_full(labels.shape, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted.reshape(-1)


def fused_token_statistics(
    hidden: Tensor,
    head: OutputHead,
    labels: Tensor | None,
    *,
    runner_up: bool = False,
    ref_hidden: Tensor | None = None,
    ref_head: OutputHead | None = None,
    all_positions: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> TokenStatistics:
    """Per-token ``log p(y)``, runner-up probability and KL to a reference, chunk by chunk (the fused core).

    Position ``t`` predicts ``labels[:, t + 1]`` (the Hugging Face shift). Only the selected positions are
    computed: those with a supervised shifted label, or all ``B * T`` with ``all_positions`` (then ``log p(y)`` of
    a position without target is 0; the KL still counts).

    Args:
        hidden: Last hidden states ``[B, T, d]`` (with grad for training).
        head: The output projection (`output_head`).
        labels: Token ids ``[B, T]`` with ``ignore_index`` on unsupervised tokens; None only with
            ``all_positions``.
        runner_up: Also compute ``max_{v != y} p_v``.
        ref_hidden: Reference hidden states ``[B, T, d']`` for the KL (no gradient).
        ref_head: The reference's projection (default: ``head``).
        all_positions: Select every position (the KL's ``kl_mask="none"``).
        ignore_index: Label value that is skipped.
        chunk_rows: Tokens per chunk; None targets about 2**24 logits per chunk.

    Returns:
        A `TokenStatistics`.
    """
    _check_hidden(hidden, labels, head)
    if labels is None and not all_positions:
        raise ValueError("labels=None needs all_positions=True (no target to select positions by).")
    batch, seq = hidden.shape[:2]
    rows = _check_chunk(chunk_rows, head.vocab_size)
    flat = hidden.reshape(batch * seq, hidden.shape[-1])
    if labels is None:
        targets = torch.full((batch * seq,), ignore_index, dtype=torch.long, device=hidden.device)
    else:
        targets = _shifted_targets(labels, ignore_index).to(hidden.device)
    supervised = targets != ignore_index
    if all_positions:
        positions = torch.arange(batch * seq, device=hidden.device)
    else:
        positions = supervised.nonzero().squeeze(1)
    selected = flat.index_select(0, positions)
    sel_targets = targets.index_select(0, positions)
    sel_supervised = sel_targets != ignore_index
    safe_targets = torch.where(sel_supervised, sel_targets, torch.zeros_like(sel_targets))
    if safe_targets.numel() and int(safe_targets.max()) >= head.vocab_size:
        raise ValueError(f"labels hold token ids >= the vocabulary size {head.vocab_size}.")
    ref_selected = None
    ref_head = head if ref_head is None else ref_head
    if ref_hidden is not None:
        _check_hidden(ref_hidden, None, ref_head)
        if ref_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(
                f"ref_hidden must have shape [B, T, d] with [B, T] = {tuple(hidden.shape[:2])}, got "
                f"{tuple(ref_hidden.shape)}."
            )
        if ref_head.vocab_size != head.vocab_size:
            raise ValueError(
                f"The reference vocabulary ({ref_head.vocab_size}) differs from the model's ({head.vocab_size})."
            )
        ref_selected = ref_hidden.detach().reshape(batch * seq, -1).index_select(0, positions)
    needs_grad = torch.is_grad_enabled() and (
        selected.requires_grad or head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    )
    log_p, runner_p, runner_log_p, kl = FusedLinearStatsFunction.apply(
        selected,
        head.weight,
        head.bias,
        safe_targets,
        ref_selected,
        None if ref_selected is None else ref_head.weight,
        None if ref_selected is None else ref_head.bias,
        head.softcap,
        ref_head.softcap,
        rows,
        runner_up,
        needs_grad,
    )
    if all_positions:
        log_p = torch.where(sel_supervised, log_p, torch.zeros_like(log_p))
        runner_p = torch.where(sel_supervised, runner_p, torch.zeros_like(runner_p))
        runner_log_p = torch.where(sel_supervised, runner_log_p, torch.zeros_like(runner_log_p))
    return TokenStatistics(positions, log_p, runner_p, kl, (batch, seq), runner_up_log_p=runner_log_p)


def _reduce(total: Tensor, count: int | Tensor, reduction: str) -> Tensor:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of ('mean', 'sum').")
    if reduction == "sum":
        return total
    count = torch.as_tensor(count, device=total.device)
    return total / count.clamp_min(1).to(total.dtype)


def fused_inverted_hinge_loss(
    hidden: Tensor,
    head: OutputHead,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """`inverted_hinge_loss` of ``head.logits(hidden)``, computed in chunks: ``1 + p_y - max_{v != y} p_v``.

    Args:
        hidden: Last hidden states ``[B, T, d]``.
        head: The output projection.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over supervised tokens or ``"sum"``.
        chunk_rows: Tokens per chunk (None: automatic).

    Returns:
        Scalar loss (fp32 for half-precision inputs).

    Examples:
        >>> h, head = torch.randn(2, 5, 8), OutputHead(torch.randn(11, 8))
        >>> 0.0 <= fused_inverted_hinge_loss(h, head, torch.randint(0, 11, (2, 5))).item() <= 2.0
        True
    """
    stats = fused_token_statistics(
        hidden, head, labels, runner_up=True, ignore_index=ignore_index, chunk_rows=chunk_rows
    )
    if head.vocab_size < 2:
        raise ValueError(f"inverted_hinge_loss needs a vocabulary of at least 2 tokens, got {head.vocab_size}.")
    per_token = 1.0 + (stats.log_p.exp() - stats.runner_up_p)
    return _reduce(per_token.sum(), stats.positions.numel(), reduction)


def fused_quantization_margin_loss(
    hidden: Tensor,
    head: OutputHead,
    labels: Tensor,
    margin: float,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """`quantization_margin_loss` of ``head.logits(hidden)`` in chunks: ``max(0, z_y - max_{v != y} z_v + margin)``.

    The logit gap is ``log p(y) - log p(k)`` of the runner-up ``k``, which the kernel returns per token, so no
    logits are held beyond one chunk.

    Args:
        hidden: Last hidden states ``[B, T, d]``.
        head: The output projection.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        margin: The logit margin (> 0).
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over supervised tokens or ``"sum"``.
        chunk_rows: Tokens per chunk (None: automatic).

    Returns:
        Scalar loss (fp32 for half-precision inputs).

    Examples:
        >>> h, head = torch.randn(2, 5, 8), OutputHead(torch.randn(11, 8))
        >>> fused_quantization_margin_loss(h, head, torch.randint(0, 11, (2, 5)), margin=1.0).item() >= 0.0
        True
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < float("inf"):
        raise ValueError(f"`margin` must be a finite number > 0, got {margin!r}.")
    if head.vocab_size < 2:
        raise ValueError(f"quantization_margin_loss needs a vocabulary of at least 2 tokens, got {head.vocab_size}.")
    stats = fused_token_statistics(
        hidden, head, labels, runner_up=True, ignore_index=ignore_index, chunk_rows=chunk_rows
    )
    per_token = torch.relu(stats.logit_margin() + float(margin))
    return _reduce(per_token.sum(), stats.positions.numel(), reduction)


def fused_nll_loss(
    hidden: Tensor,
    head: OutputHead,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """`nll_loss` (token negative log-likelihood) of ``head.logits(hidden)``, computed in chunks.

    Args:
        hidden: Last hidden states ``[B, T, d]``.
        head: The output projection.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over supervised tokens or ``"sum"``.
        chunk_rows: Tokens per chunk (None: automatic).

    Returns:
        Scalar loss. Gradient ascent is ``-fused_nll_loss(...)``.
    """
    stats = fused_token_statistics(hidden, head, labels, ignore_index=ignore_index, chunk_rows=chunk_rows)
    return _reduce(-stats.log_p.sum(), stats.positions.numel(), reduction)


def fused_sequence_log_probs(
    hidden: Tensor,
    head: OutputHead,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`sequence_log_probs` of ``head.logits(hidden)``: summed supervised log-probs per sequence, in chunks.

    Args:
        hidden: Last hidden states ``[B, T, d]``.
        head: The output projection.
        labels: Token ids ``[B, T]``, ``ignore_index`` on unsupervised tokens.
        ignore_index: Label value that is skipped.
        chunk_rows: Tokens per chunk (None: automatic).

    Returns:
        ``(logps [B], num_tokens [B] long)``.
    """
    stats = fused_token_statistics(hidden, head, labels, ignore_index=ignore_index, chunk_rows=chunk_rows)
    counts = torch.ones_like(stats.positions)
    num_tokens = counts.new_zeros(stats.shape[0]).index_add(0, stats.positions // stats.shape[1], counts)
    return stats.per_sequence(stats.log_p), num_tokens


def fused_kl_loss(
    hidden: Tensor,
    head: OutputHead,
    ref_hidden: Tensor,
    ref_head: OutputHead | None = None,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """`kl_loss` ``KL(p_ref || p_theta)`` of ``head.logits(hidden)`` against ``ref_head.logits(ref_hidden)``.

    Both distributions are computed chunk by chunk; the reference gets no gradient. ``labels`` given: only the
    positions that predict a supervised token count; ``labels=None``: every position.

    Args:
        hidden: Policy hidden states ``[B, T, d]``.
        head: The policy's output projection.
        ref_hidden: Reference hidden states ``[B, T, d']``.
        ref_head: The reference's output projection (default: ``head``).
        labels: Optional token ids ``[B, T]`` selecting positions.
        ignore_index: Label value that is skipped.
        reduction: ``"mean"`` over counted positions or ``"sum"``.
        chunk_rows: Tokens per chunk (None: automatic).

    Returns:
        Scalar loss.
    """
    stats = fused_token_statistics(
        hidden,
        head,
        labels,
        ref_hidden=ref_hidden,
        ref_head=ref_head,
        all_positions=labels is None,
        ignore_index=ignore_index,
        chunk_rows=chunk_rows,
    )
    return _reduce(stats.kl.sum(), stats.positions.numel(), reduction)
