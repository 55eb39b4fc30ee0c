"""Memorization metrics: memorization accuracy (MA), extraction likelihood (EL_n), token NLL / perplexity.

Definitions (Jang et al. 2023, used by arXiv 2408.06621 for TDEC; tokens are x_0 .. x_{T-1}):

- ``MA(x) = 1/(T-1) * sum_{t=1}^{T-1} 1[argmax_v p(v | x_<t) = x_t]`` (teacher forcing, one forward pass).
  With ``labels`` only the supervised positions (``labels != -100``) count, and the target is the label.
- ``EL_n(x) = 1/(T-n) * sum_{t=1}^{T-n} overlap_n(g_t, x_>=t)`` where ``g_t`` is the greedy continuation of
  ``x_<t`` up to total length T (by default exactly T - t new tokens, EOS is not treated specially; with
  ``stop_at_eos=True`` it ends at the first generated EOS, as ``generate`` does) and
  ``overlap_n(g, r)`` is the number of n-grams of ``g`` (with multiplicity) that occur among the n-grams of
  ``r``, divided by the number of n-grams of ``r`` (T - t - n + 1). This is the counting of Jang's
  ``knowledge-unlearning`` code, and it lies in [0, 1].
- NLL: mean per-token negative log-likelihood of the supervised tokens, pooled over all tokens of a data set;
  ``ppl = exp(nll)``.

All functions accept any causal LM whose ``forward(input_ids, attention_mask=..., ...)`` returns an object with
``.logits`` (``PreTrainedModel``, ``PeftModel``, or a minimal ``nn.Module``). They run under ``torch.no_grad()``,
put the model in eval mode and restore its previous train/eval mode afterwards. Padding may be on either side:
padding tokens are identified by ``attention_mask`` and ``position_ids`` are derived from it when the model
accepts them.

Memory: by default (``fused="auto"``, when the model supports it: see `peft_unlearn.metrics.chunked`) the
teacher-forced metrics (MA, NLL, perplexity, token log-probs) run the model for its last hidden states only and
project the counted positions through the output head ``chunk_size`` tokens at a time (default about 2**24 logits
per chunk), so the ``[B, T, V]`` logits are never materialized; the values equal the full-logits path. With
``fused=False`` (or a model without ``logits_to_keep`` / with LoRA on ``lm_head``) a forward pass holds logits
``[B, T, V]`` in the model dtype and the statistics are computed one sequence at a time on the supervised
positions (an extra ``[n_tokens, V]`` fp32 buffer). Greedy generation for EL asks the model for the last
position's logits only (``logits_to_keep=1`` when supported) and reuses the KV cache when the model returns one,
so it never holds more than ``[B, V]`` logits either way.

Examples:
    >>> import torch
    >>> from peft_unlearn.metrics import evaluate_memorization
    >>> from peft_unlearn.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> scores = evaluate_memorization(model, [[5, 6, 7, 8, 9, 10, 11, 12]], el_n=(2,))
    >>> sorted(scores)
    ['el2', 'ma', 'nll', 'ppl']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..losses.fused import model_hidden_states, output_head
from ..utils import IGNORE_INDEX, model_device
from .chunked import FusedSetting, check_chunk_size, chunked_argmax_log_probs, resolve_fused
from .extraction import _check_el_args, _el_scores, extraction_likelihood
from .forward import _normalize_data, _prepare_batch, accepts_kwarg, pad_batch
from .forward import eval_mode as _eval_mode
from .forward import forward_logits as _logits
from .forward import position_ids as _position_ids
from .forward import with_eval_mode as _with_eval_mode
from .generation import greedy_generate

__all__ = [
    "compute_ma_metrics",
    "evaluate_memorization",
    "extraction_likelihood",
    "greedy_generate",
    "memorization_accuracy",
    "pad_batch",
    "perplexity",
    "preprocess_logits_for_ma",
    "sequence_nll",
    "token_log_probs",
]

DistributedMode = Literal["shard", "gather", "none"]


# --------------------------------------------------------------------------------------------------------------
# Teacher-forced statistics (MA, NLL, token log-probs)
# --------------------------------------------------------------------------------------------------------------


def _supervised_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, T-1] and a bool mask [B, T-1] of positions t-1 that predict a counted token x_t."""
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if labels is None:
        return input_ids[:, 1:], valid
    targets = labels[:, 1:]
    return targets, valid & (targets != IGNORE_INDEX)


def _check_vocab(ids: torch.Tensor, size: int, what: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(
            f"`{what}` holds token id {bad}, outside the model's vocabulary (ids 0..{size - 1}); the data was "
            "tokenized with another tokenizer than the model's. Tokenize with the model's own tokenizer."
        )


def _token_stats(
    model: torch.nn.Module,
    input_ids: Any,
    attention_mask: Any = None,
    labels: Any = None,
    *,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (correct [n] bool, log p(target) [n] float32) over counted positions. Caller sets no_grad.

    ``fused`` (``True``/``False``/``"auto"``, resolved by `resolve_fused`) picks the chunked path from hidden
    states; ``chunk_size`` is its tokens per chunk.
    """
    use_fused = resolve_fused(fused, model)
    check_chunk_size(chunk_size)
    input_ids, attention_mask, labels = _prepare_batch(input_ids, attention_mask, labels)
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    labels = labels.to(device) if labels is not None else None
    if input_ids.shape[1] < 2:
        empty = torch.zeros(0, device=device)
        return [(empty.bool(), empty.float()) for _ in range(input_ids.shape[0])]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None:
        _check_vocab(input_ids[attention_mask.bool()], int(weight.shape[0]), "input_ids")
    if use_fused:
        return _fused_token_stats(model, input_ids, attention_mask, labels, chunk_size)
    logits = _logits(model, input_ids, attention_mask).logits
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"The model returned logits of shape {tuple(logits.shape)} for input_ids of shape "
            f"{tuple(input_ids.shape)}; expected [batch, seq_len, vocab] (unshifted causal-LM logits)."
        )
    targets, valid = _supervised_mask(input_ids, attention_mask, labels)
    _check_vocab(targets[valid], logits.shape[-1], "labels" if labels is not None else "input_ids")
    stats = []
    for b in range(input_ids.shape[0]):
        rows = logits[b, :-1][valid[b]].float()  # [n, V]
        tgt = targets[b][valid[b]]
        correct = rows.argmax(-1) == tgt
        logp = torch.log_softmax(rows, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        stats.append((correct, logp))
    return stats


def _fused_token_stats(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    chunk_size: int | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`_token_stats` from the last hidden states, the counted positions projected in chunks (no full logits)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if accepts_kwarg(model, "position_ids"):
        inputs["position_ids"] = _position_ids(attention_mask)
    hidden = model_hidden_states(model, **inputs)
    head = output_head(model)
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(
            f"The model returned hidden states of shape {tuple(hidden.shape)} for input_ids of shape "
            f"{tuple(input_ids.shape)}; expected [batch, seq_len, hidden]."
        )
    targets, valid = _supervised_mask(input_ids, attention_mask, labels)
    _check_vocab(targets[valid], head.vocab_size, "labels" if labels is not None else "input_ids")
    rows = hidden[:, :-1][valid]  # [n, d], sequence by sequence
    pred, logp = chunked_argmax_log_probs(rows, head, targets[valid], chunk_size)
    correct = pred == targets[valid]
    sizes = valid.sum(dim=1).tolist()
    return list(zip(correct.split(sizes), logp.split(sizes)))


@_with_eval_mode
def memorization_accuracy(
    model: torch.nn.Module,
    input_ids: Any,
    attention_mask: Any = None,
    labels: Any = None,
    *,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-sequence memorization accuracy (teacher-forced next-token argmax accuracy).

    ``MA(x) = 1/(T-1) sum_{t>=1} 1[argmax p(. | x_<t) = x_t]``. With ``labels`` only positions whose (unshifted)
    label is not -100 count, and the label is the target. Padding positions (``attention_mask == 0``) never
    count. A sequence with no counted position gets NaN.

    Args:
        model: A causal LM (``PreTrainedModel``, ``PeftModel`` or any module returning ``.logits``).
        input_ids: Token ids ``[B, T]`` (or one 1-D sequence).
        attention_mask: ``[B, T]``, 1 for real tokens; default all ones. Left or right padding.
        labels: Optional unshifted labels ``[B, T]`` with -100 on ignored positions.
        fused: Compute the statistics from the last hidden states, projecting ``chunk_size`` tokens at a time, so the
            ``[B, T, V]`` logits are never materialized (same values): ``"auto"`` (default) when the model supports
            it (the rules of `UnlearningConfig.fused_loss`), ``True`` requires it, ``False`` uses the full logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        Float tensor ``[B]`` on the CPU.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> memorization_accuracy(tiny_causal_lm("llama"), [[5, 6, 7, 8]]).shape
        torch.Size([1])
    """
    stats = _token_stats(model, input_ids, attention_mask, labels, fused=fused, chunk_size=chunk_size)
    return torch.tensor(
        [c.double().mean().item() if c.numel() else float("nan") for c, _ in stats], dtype=torch.float32
    )


@_with_eval_mode
def token_log_probs(
    model: torch.nn.Module,
    input_ids: Any,
    attention_mask: Any = None,
    labels: Any = None,
    *,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> list[torch.Tensor]:
    """Log-probabilities of the counted tokens of each sequence (teacher forcing).

    Args:
        model: A causal LM.
        input_ids: Token ids ``[B, T]``.
        attention_mask: Optional ``[B, T]`` mask (left or right padding).
        labels: Optional unshifted labels with -100 on ignored positions.
        fused: Compute the statistics from the last hidden states, projecting ``chunk_size`` tokens at a time, so the
            ``[B, T, V]`` logits are never materialized (same values): ``"auto"`` (default) when the model supports
            it (the rules of `UnlearningConfig.fused_loss`), ``True`` requires it, ``False`` uses the full logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        A list of ``B`` float32 CPU tensors ``[n_b]``: ``log p(x_t | x_<t)`` for every counted position t >= 1.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> [lp.shape for lp in token_log_probs(tiny_causal_lm("llama"), [[5, 6, 7]])]
        [torch.Size([2])]
    """
    stats = _token_stats(model, input_ids, attention_mask, labels, fused=fused, chunk_size=chunk_size)
    return [lp.cpu() for _, lp in stats]


@_with_eval_mode
def sequence_nll(
    model: torch.nn.Module,
    input_ids: Any,
    attention_mask: Any = None,
    labels: Any = None,
    *,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token NLL and token count per sequence.

    Args:
        model: A causal LM.
        input_ids: Token ids ``[B, T]``.
        attention_mask: Optional ``[B, T]`` mask.
        labels: Optional unshifted labels with -100 on ignored positions.
        fused: Compute the statistics from the last hidden states, projecting ``chunk_size`` tokens at a time, so the
            ``[B, T, V]`` logits are never materialized (same values): ``"auto"`` (default) when the model supports
            it (the rules of `UnlearningConfig.fused_loss`), ``True`` requires it, ``False`` uses the full logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        ``(nll_sum [B], n_tokens [B])`` float32 / int64 CPU tensors; ``nll_sum / n_tokens`` is the per-token NLL.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> total, count = sequence_nll(tiny_causal_lm("llama"), [[5, 6, 7]])
        >>> int(count[0])
        2
    """
    stats = _token_stats(model, input_ids, attention_mask, labels, fused=fused, chunk_size=chunk_size)
    total = torch.tensor([-lp.sum().item() for _, lp in stats], dtype=torch.float32)
    count = torch.tensor([lp.numel() for _, lp in stats], dtype=torch.long)
    return total, count


def perplexity(
    model: torch.nn.Module,
    input_ids: Any,
    attention_mask: Any = None,
    labels: Any = None,
    *,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> float:
    """Token-pooled perplexity ``exp(sum NLL / number of tokens)`` of a batch.

    Args:
        model: A causal LM.
        input_ids: Token ids ``[B, T]``.
        attention_mask: Optional ``[B, T]`` mask.
        labels: Optional unshifted labels with -100 on ignored positions.
        fused: Compute the statistics from the last hidden states, projecting ``chunk_size`` tokens at a time, so the
            ``[B, T, V]`` logits are never materialized (same values): ``"auto"`` (default) when the model supports
            it (the rules of `UnlearningConfig.fused_loss`), ``True`` requires it, ``False`` uses the full logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        The perplexity (``inf`` on overflow, NaN when no token is counted).

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> perplexity(tiny_causal_lm("llama"), [[5, 6, 7]]) > 1.0
        True
    """
    total, count = sequence_nll(model, input_ids, attention_mask, labels, fused=fused, chunk_size=chunk_size)
    n = int(count.sum())
    return _safe_exp(float(total.sum()) / n) if n else float("nan")


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------------------------------------------
# Plain Trainer helpers (MA through compute_metrics)
# --------------------------------------------------------------------------------------------------------------


def preprocess_logits_for_ma(logits: Any, labels: Any) -> torch.Tensor:
    """``Trainer(preprocess_logits_for_metrics=...)`` hook keeping only the argmax ids (saves memory).

    Args:
        logits: Model logits ``[B, T, V]`` (or a tuple whose first element is the logits).
        labels: Unused (required by the hook signature).

    Returns:
        ``logits.argmax(-1)`` ``[B, T]``.

    Examples:
        >>> preprocess_logits_for_ma(torch.zeros(1, 2, 3), None).shape
        torch.Size([1, 2])
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(-1)


def compute_ma_metrics(eval_pred: Any) -> dict[str, float]:
    """``Trainer(compute_metrics=...)`` function returning the per-sequence-averaged MA as ``{"ma": ...}``.

    Use together with `preprocess_logits_for_ma`. With a stock ``Trainer`` and
    ``eval_dataset={"forget": ...}`` this yields ``eval_forget_ma`` (what `StopWhenForgottenCallback`
    reads). Labels must be the unshifted causal-LM labels (-100 ignored); EL needs generation and is not
    available this way (use `evaluate_memorization`).

    Args:
        eval_pred: A ``transformers.EvalPrediction`` (or a ``(predictions, label_ids)`` tuple) where the
            predictions are argmax ids ``[N, T]``.

    Returns:
        ``{"ma": float}``.

    Examples:
        >>> import numpy as np
        >>> compute_ma_metrics((np.array([[6, 7, 0]]), np.array([[5, 6, 9]])))
        {'ma': 0.5}
    """
    preds, labels = (eval_pred.predictions, eval_pred.label_ids) if hasattr(eval_pred, "label_ids") else eval_pred
    if isinstance(preds, (tuple, list)):
        preds = preds[0]
    preds = torch.as_tensor(preds)
    labels = torch.as_tensor(labels)
    if preds.dim() == 3:
        preds = preds.argmax(-1)
    tgt = labels[:, 1:]
    valid = tgt != IGNORE_INDEX
    correct = (preds[:, :-1] == tgt) & valid
    n = valid.sum(-1)
    per_seq = correct.sum(-1).float() / n.clamp(min=1)
    keep = n > 0
    return {"ma": float(per_seq[keep].mean()) if keep.any() else float("nan")}


# --------------------------------------------------------------------------------------------------------------
# Data-set level evaluation
# --------------------------------------------------------------------------------------------------------------


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate_memorization(
    model: torch.nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    el_n: int | Sequence[int] = (10,),
    el_prefix_stride: int = 1,
    pad_token_id: int = 0,
    compute_el: bool = True,
    show_progress: bool = False,
    el_batch_size: int | None = None,
    distributed: DistributedMode = "shard",
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> dict[str, float]:
    """MA, EL_n, NLL and perplexity of a data set.

    ``ma`` and ``el{n}`` are means over sequences (sequences where the metric is undefined, NaN, are skipped;
    all undefined gives NaN); ``nll`` is the mean NLL over all counted tokens of the data set (token-pooled) and
    ``ppl = exp(nll)``. With ``labels`` only the supervised tokens count (see `memorization_accuracy`,
    `extraction_likelihood`).

    Distributed: when ``torch.distributed`` is initialized with several processes,

    - ``distributed="shard"`` (default): every rank passes the same full ``data``; rank r evaluates items
      ``r, r + W, ...`` and the per-sequence values are gathered (``all_gather_object``) before averaging, so
      every rank returns the same numbers for the whole data set;
    - ``"gather"``: ``data`` is already this rank's share; values are gathered across ranks;
    - ``"none"``: no communication (each rank scores what it was given).

    With FSDP / DeepSpeed ZeRO-3 every forward is a collective and ranks must run the same number of forward
    passes: use ``distributed="none"`` on the full data (every rank computes everything).

    Args:
        model: A causal LM.
        data: A list of token-id lists (or 1-D tensors), a 2-D tensor, a list of dicts / a ``datasets.Dataset``
            with ``input_ids`` (+ optional ``labels``, ``attention_mask`` for pre-padded rows), or a columnar
            mapping with an ``input_ids`` list.
        batch_size: Sequences per teacher-forced forward pass.
        el_n: n-gram size(s) for EL; one key ``el{n}`` per value.
        el_prefix_stride: Prefix stride for EL (1 = exact).
        pad_token_id: Padding id used to batch the sequences.
        compute_el: False skips EL (the expensive part: greedy generation).
        show_progress: Show a tqdm bar over batches.
        el_batch_size: Prefixes per generation batch for EL (default ``4 * batch_size``).
        distributed: ``"shard"``, ``"gather"`` or ``"none"`` (see above).
        fused: MA and NLL from the last hidden states, ``chunk_size`` tokens at a time (no ``[B, T, V]`` logits;
            same values): ``"auto"`` (default) when the model supports it, ``True`` requires it, ``False`` uses
            the full logits. EL's greedy generation only ever computes the last position's logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        ``{"ma": ..., "el10": ..., "nll": ..., "ppl": ...}`` as Python floats.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> out = evaluate_memorization(tiny_causal_lm("llama"), [[5, 6, 7, 8]], compute_el=False)
        >>> sorted(out)
        ['ma', 'nll', 'ppl']
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if distributed not in ("shard", "gather", "none"):
        raise ValueError(f"`distributed` must be 'shard', 'gather' or 'none', got {distributed!r}.")
    ns = _check_el_args(el_n, el_prefix_stride, el_batch_size or 4 * batch_size) if compute_el else ()
    use_fused = resolve_fused(fused, model)
    check_chunk_size(chunk_size)
    items = _normalize_data(data)
    rank, world = _dist_info()
    if not items and (world == 1 or distributed != "gather"):
        raise ValueError(
            "`data` is empty: evaluate_memorization needs at least one sequence (an empty evaluation set would "
            "report NaN). Check the dataset split or filter that produced it."
        )
    if world > 1 and distributed == "shard":
        items = items[rank::world]

    local: dict[str, list[float]] = {"ma": [], "nll_sum": [], "n_tok": []}
    for k in ns:
        local[f"el{k}"] = []
    batches = range(0, len(items), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="memorization", total=len(batches))
    with _eval_mode(model):
        for start in batches:
            chunk = items[start : start + batch_size]
            ids, mask, labels = pad_batch(chunk, pad_token_id)
            for correct, logp in _token_stats(model, ids, mask, labels, fused=use_fused, chunk_size=chunk_size):
                local["ma"].append(correct.double().mean().item() if correct.numel() else float("nan"))
                local["nll_sum"].append(-logp.sum().item())
                local["n_tok"].append(float(logp.numel()))
        if ns:
            el = _el_scores(model, items, ns, el_prefix_stride, el_batch_size or 4 * batch_size, pad_token_id)
            for k in ns:
                local[f"el{k}"] = el[k]

    if world > 1 and distributed != "none":
        gathered: list[dict[str, list[float]] | None] = [None] * world
        torch.distributed.all_gather_object(gathered, local)
        merged: dict[str, list[float]] = {key: [] for key in local}
        for part in gathered:
            for key, values in (part or {}).items():
                merged[key].extend(values)
        local = merged

    def _nanmean(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else float("nan")

    result = {"ma": _nanmean(local["ma"])}
    for k in ns:
        result[f"el{k}"] = _nanmean(local[f"el{k}"])
    n_tok = sum(local["n_tok"])
    nll = sum(local["nll_sum"]) / n_tok if n_tok else float("nan")
    result["nll"] = nll
    result["ppl"] = _safe_exp(nll) if not math.isnan(nll) else float("nan")
    return result
