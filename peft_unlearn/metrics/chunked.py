"""Teacher-forced per-token statistics without the full logits: argmax and ``log p(target)`` in row chunks.

The memorization (MA, NLL, perplexity), TOFU (answer probability, truth ratio) and MIA (Min-k% Prob) metrics read
two numbers per counted token: whether the argmax of ``p(. | x_<t)`` is the target, and ``log p(target)``. At a
262,144-token vocabulary the ``[B, T, V]`` logits of one evaluation batch dwarf everything else, so when the model
supports it (`resolve_fused`, the rules of `UnlearningConfig.fused_loss`) the metrics run the model for its last
hidden states only (`peft_unlearn.losses.fused.model_hidden_states`) and `chunked_argmax_log_probs` projects the
counted positions through the output head (`peft_unlearn.losses.fused.output_head`: tied or not, bias, Gemma's
soft-capping) a chunk of rows at a time. Each chunk is computed exactly as the model's own head computes it (the
projection in the model's dtype, the soft-cap after it, then fp32), so the numbers equal the full-logits path.

Greedy generation (EL, TOFU's ROUGE) needs no chunking: it asks the model for the last position's logits only.

Examples:
    >>> import torch
    >>> from peft_unlearn.losses.fused import OutputHead
    >>> head = OutputHead(torch.eye(3))
    >>> pred, logp = chunked_argmax_log_probs(torch.tensor([[0.0, 5.0, 0.0]]), head, torch.tensor([1]), 1)
    >>> int(pred[0]), round(float(logp[0]), 3)
    (1, -0.013)
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

from ..losses.fused import FusedLossUnsupportedError, OutputHead, fused_loss_unsupported_reason
from ..losses.fused_kernel import default_chunk_rows

__all__ = ["FusedSetting", "check_chunk_size", "chunked_argmax_log_probs", "resolve_fused"]

logger = logging.getLogger(__name__)

FusedSetting = bool | Literal["auto"]


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Validate a metric's ``chunk_size`` (tokens per chunk; None: automatic).

    Raises:
        ValueError: If it is not None or an integer >= 1.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be an integer >= 1 or None (automatic), got {chunk_size!r}.")
    return chunk_size


def resolve_fused(fused: FusedSetting, model: torch.nn.Module) -> bool:
    """Whether a metric computes its per-token statistics from hidden states in chunks.

    The rules of `UnlearningConfig.fused_loss`: ``"auto"`` when the model supports it (a linear output projection
    without a PEFT adapter layer on it, a forward with ``logits_to_keep``), ``True`` requires it, ``False`` uses the
    full logits.

    Args:
        fused: ``True``, ``False`` or ``"auto"``.
        model: The evaluated causal LM (possibly PEFT/DDP-wrapped).

    Returns:
        Whether to use the chunked path.

    Raises:
        ValueError: If `fused` is not one of the three values.
        FusedLossUnsupportedError: With ``fused=True`` when the model cannot use it (the message says why).

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> resolve_fused("auto", tiny_causal_lm("llama")), resolve_fused(False, tiny_causal_lm("llama"))
        (True, False)
    """
    if fused is not True and fused is not False and fused != "auto":
        raise ValueError(f"`fused` must be True, False or 'auto', got {fused!r}.")
    if fused is False:
        return False
    reason = fused_loss_unsupported_reason(model)
    if reason is None:
        return True
    if fused is True:
        raise FusedLossUnsupportedError(f"fused=True: {reason}")
    logger.debug("fused='auto': the metrics use the full logits because %s", reason)
    return False


def chunked_argmax_log_probs(
    rows: Tensor, head: OutputHead, targets: Tensor, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Argmax and ``log p(target)`` of ``softmax(head.logits(rows))``, a chunk of rows at a time (no grad).

    Per chunk the logits are ``head.logits`` in the rows' dtype (as the model's `lm_head` and soft-cap compute
    them), then cast to fp32 for the argmax (ties: the lowest id, as ``torch.argmax``) and the log-softmax.

    Args:
        rows: Hidden states ``[n, d]`` of the positions to score.
        head: The output projection.
        targets: Target token ids ``[n]`` (valid ids).
        chunk_rows: Rows per chunk (None: about 2**24 logits per chunk).

    Returns:
        ``(argmax [n] long, log p(target) [n] float32)``.
    """
    chunk_rows = default_chunk_rows(head.vocab_size) if chunk_rows is None else chunk_rows
    n = rows.shape[0]
    pred = torch.empty(n, dtype=torch.long, device=rows.device)
    logp = torch.empty(n, dtype=torch.float32, device=rows.device)
    with torch.no_grad():
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            z = head.logits(rows[start:stop]).float()
            pred[start:stop] = z.argmax(-1)
            tgt = targets[start:stop].unsqueeze(-1)
            logp[start:stop] = torch.log_softmax(z, dim=-1).gather(-1, tgt).squeeze(-1)
    return pred, logp
