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

Memory: a forward pass holds logits ``[B, T, V]`` in the model dtype; the per-token statistics are then
computed one sequence at a time on the supervised positions only (an extra ``[n_tokens, V]`` fp32 buffer).
Greedy generation for EL asks the model for the last position's logits only (``logits_to_keep=1`` when
supported) and reuses the KV cache when the model returns one.

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
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from ..utils import IGNORE_INDEX, model_device
from .forward import eval_mode as _eval_mode
from .forward import forward_logits as _logits
from .forward import to_id_list as _to_list
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
# Input normalisation and batching
# --------------------------------------------------------------------------------------------------------------


def _as_2d(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2:
        raise ValueError(
            f"`{name}` must have shape [batch, seq_len], got shape {tuple(value.shape)}; pass a 2-D tensor "
            "(or one 1-D sequence)."
        )
    return value


def _prepare_batch(
    input_ids: Any, attention_mask: Any = None, labels: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    input_ids = _as_2d("input_ids", input_ids).long()
    if input_ids.numel() == 0:
        raise ValueError(
            f"`input_ids` is empty (shape {tuple(input_ids.shape)}); the metric is undefined without tokens. Pass at "
            "least one sequence of at least one token."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        attention_mask = _as_2d("attention_mask", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has shape "
                f"{tuple(input_ids.shape)}; they must match."
            )
    if labels is not None:
        labels = _as_2d("labels", labels).long()
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"`labels` has shape {tuple(labels.shape)} but `input_ids` has shape {tuple(input_ids.shape)}; "
                "they must match (unshifted labels, -100 on ignored positions)."
            )
    return input_ids, attention_mask.long(), labels


def pad_batch(
    items: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad a list of tokenized items into tensors.

    Args:
        items: Dicts with ``input_ids`` and optionally ``labels`` (same length as ``input_ids``).
        pad_token_id: Id written into the padded ``input_ids`` positions.

    Returns:
        ``(input_ids [B, T], attention_mask [B, T], labels [B, T] or None)``; labels are padded with -100 and
        are None when no item has labels (an item without labels in a labelled batch is fully supervised).

    Examples:
        >>> ids, mask, labels = pad_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
        >>> ids.tolist(), mask.tolist(), labels
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], None)
    """
    if len(items) == 0:
        raise ValueError("`items` is empty; pass at least one tokenized sequence.")
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    has_labels = any(item.get("labels") is not None for item in items)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for i, item in enumerate(items):
        seq = list(item["input_ids"])
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
        if labels is not None:
            lab = list(item["labels"]) if item.get("labels") is not None else seq
            labels[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
    return ids, mask, labels


def _normalize_data(data: Any) -> list[dict[str, list[int] | None]]:
    """Turn the accepted data formats into a list of ``{"input_ids": [...], "labels": [...] | None}``."""
    if isinstance(data, torch.Tensor):
        data = _as_2d("data", data)
        return [{"input_ids": _to_list(row), "labels": None} for row in data]
    if isinstance(data, Mapping):  # columnar, e.g. a BatchEncoding or a dict of lists
        if "input_ids" not in data:
            raise ValueError(f"`data` is a mapping without an 'input_ids' key (keys: {sorted(data)}).")
        n = len(data["input_ids"])
        data = [{k: data[k][i] for k in ("input_ids", "labels", "attention_mask") if k in data} for i in range(n)]
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"`data` must be a list of token-id lists, a list of dicts with 'input_ids', or a datasets.Dataset; "
            f"got {type(data).__name__}."
        )
    out: list[dict[str, list[int] | None]] = []
    for i, item in enumerate(data):
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"`data[{i}]` has no 'input_ids' key (keys: {sorted(item)}).")
            ids = _to_list(item["input_ids"])
            labels = item.get("labels")
            labels = _to_list(labels) if labels is not None else None
            mask = item.get("attention_mask")
            if mask is not None:  # pre-padded rows: drop the padding (either side)
                mask = _to_list(mask)
                keep = [j for j, m in enumerate(mask) if m]
                ids = [ids[j] for j in keep]
                labels = [labels[j] for j in keep] if labels is not None else None
        elif isinstance(item, (torch.Tensor, Sequence)) and not isinstance(item, (str, bytes)):
            ids, labels = _to_list(item), None
        else:
            raise TypeError(
                f"`data[{i}]` must be a sequence of token ids or a dict with 'input_ids', got {type(item).__name__}."
            )
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"`data[{i}]` has {len(ids)} input_ids but {len(labels)} labels; they must match.")
        out.append({"input_ids": ids, "labels": labels})
    return out


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


def _token_stats(
    model: torch.nn.Module, input_ids: Any, attention_mask: Any = None, labels: Any = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (correct [n] bool, log p(target) [n] float32) over counted positions. Caller sets no_grad."""
    input_ids, attention_mask, labels = _prepare_batch(input_ids, attention_mask, labels)
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    labels = labels.to(device) if labels is not None else None
    if input_ids.shape[1] < 2:
        empty = torch.zeros(0, device=device)
        return [(empty.bool(), empty.float()) for _ in range(input_ids.shape[0])]
    logits = _logits(model, input_ids, attention_mask).logits
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"The model returned logits of shape {tuple(logits.shape)} for input_ids of shape "
            f"{tuple(input_ids.shape)}; expected [batch, seq_len, vocab] (unshifted causal-LM logits)."
        )
    targets, valid = _supervised_mask(input_ids, attention_mask, labels)
    stats = []
    for b in range(input_ids.shape[0]):
        rows = logits[b, :-1][valid[b]].float()  # [n, V]
        tgt = targets[b][valid[b]]
        correct = rows.argmax(-1) == tgt
        logp = torch.log_softmax(rows, dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        stats.append((correct, logp))
    return stats


@_with_eval_mode
def memorization_accuracy(
    model: torch.nn.Module, input_ids: Any, attention_mask: Any = None, labels: Any = None
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

    Returns:
        Float tensor ``[B]`` on the CPU.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> memorization_accuracy(tiny_causal_lm("llama"), [[5, 6, 7, 8]]).shape
        torch.Size([1])
    """
    stats = _token_stats(model, input_ids, attention_mask, labels)
    return torch.tensor(
        [c.double().mean().item() if c.numel() else float("nan") for c, _ in stats], dtype=torch.float32
    )


@_with_eval_mode
def token_log_probs(
    model: torch.nn.Module, input_ids: Any, attention_mask: Any = None, labels: Any = None
) -> list[torch.Tensor]:
    """Log-probabilities of the counted tokens of each sequence (teacher forcing).

    Args:
        model: A causal LM.
        input_ids: Token ids ``[B, T]``.
        attention_mask: Optional ``[B, T]`` mask (left or right padding).
        labels: Optional unshifted labels with -100 on ignored positions.

    Returns:
        A list of ``B`` float32 CPU tensors ``[n_b]``: ``log p(x_t | x_<t)`` for every counted position t >= 1.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> [lp.shape for lp in token_log_probs(tiny_causal_lm("llama"), [[5, 6, 7]])]
        [torch.Size([2])]
    """
    return [lp.cpu() for _, lp in _token_stats(model, input_ids, attention_mask, labels)]


@_with_eval_mode
def sequence_nll(
    model: torch.nn.Module, input_ids: Any, attention_mask: Any = None, labels: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token NLL and token count per sequence.

    Args:
        model: A causal LM.
        input_ids: Token ids ``[B, T]``.
        attention_mask: Optional ``[B, T]`` mask.
        labels: Optional unshifted labels with -100 on ignored positions.

    Returns:
        ``(nll_sum [B], n_tokens [B])`` float32 / int64 CPU tensors; ``nll_sum / n_tokens`` is the per-token NLL.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> total, count = sequence_nll(tiny_causal_lm("llama"), [[5, 6, 7]])
        >>> int(count[0])
        2
    """
    stats = _token_stats(model, input_ids, attention_mask, labels)
    total = torch.tensor([-lp.sum().item() for _, lp in stats], dtype=torch.float32)
    count = torch.tensor([lp.numel() for _, lp in stats], dtype=torch.long)
    return total, count


def perplexity(model: torch.nn.Module, input_ids: Any, attention_mask: Any = None, labels: Any = None) -> float:
    """Token-pooled perplexity ``exp(sum NLL / number of tokens)`` of a batch.

    Args:
        model: A causal LM.
        input_ids: Token ids ``[B, T]``.
        attention_mask: Optional ``[B, T]`` mask.
        labels: Optional unshifted labels with -100 on ignored positions.

    Returns:
        The perplexity (``inf`` on overflow, NaN when no token is counted).

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> perplexity(tiny_causal_lm("llama"), [[5, 6, 7]]) > 1.0
        True
    """
    total, count = sequence_nll(model, input_ids, attention_mask, labels)
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

    Use together with :func:`preprocess_logits_for_ma`. With a stock ``Trainer`` and
    ``eval_dataset={"forget": ...}`` this yields ``eval_forget_ma`` (what :class:`StopWhenForgottenCallback`
    reads). Labels must be the unshifted causal-LM labels (-100 ignored); EL needs generation and is not
    available this way (use :func:`evaluate_memorization`).

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
# Extraction likelihood
# --------------------------------------------------------------------------------------------------------------


def _ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def _ngram_overlap(continuation: Sequence[int], reference: Sequence[int], n: int) -> float:
    ref = _ngrams(reference, n)
    ref_set = set(ref)
    hits = sum(1 for g in _ngrams(continuation, n) if g in ref_set)
    return hits / len(ref)


def _el_scores(
    model: torch.nn.Module,
    seqs: list[dict[str, list[int] | None]],
    ns: Sequence[int],
    prefix_stride: int,
    batch_size: int,
    pad_token_id: int,
    use_cache: bool | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> dict[int, list[float]]:
    """EL_n for each n and each sequence (NaN where undefined); one generation pass shared by all n.

    ``eos_token_id`` given: each continuation stops after its first EOS (shorter continuation, same denominator).
    """
    n_min = min(ns)
    jobs: list[tuple[int, int]] = []  # (sequence index, prefix length t)
    for s, item in enumerate(seqs):
        tokens, labels = item["input_ids"], item["labels"]
        T = len(tokens)
        t_start = 1
        if labels is not None:
            supervised = [j for j, lab in enumerate(labels) if lab != IGNORE_INDEX]
            t_start = max(1, supervised[0]) if supervised else T  # no supervised token: undefined
        jobs.extend((s, t) for t in range(t_start, T - n_min + 1, prefix_stride))
    prompts = [seqs[s]["input_ids"][:t] for s, t in jobs]
    budgets = [len(seqs[s]["input_ids"]) - t for s, t in jobs]
    conts = greedy_generate(
        model,
        prompts,
        budgets,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        batch_size=batch_size,
        use_cache=use_cache,
    )
    per_seq: dict[int, list[list[float]]] = {n: [[] for _ in seqs] for n in ns}
    for (s, t), cont in zip(jobs, conts):
        tokens = seqs[s]["input_ids"]
        T = len(tokens)
        for n in ns:
            if t <= T - n:
                per_seq[n][s].append(_ngram_overlap(cont, tokens[t:], n))
    return {n: [sum(v) / len(v) if v else float("nan") for v in per_seq[n]] for n in ns}


def _check_el_args(n: int | Sequence[int], prefix_stride: int, batch_size: int) -> tuple[int, ...]:
    ns = (n,) if isinstance(n, int) else tuple(n)
    if not ns or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ns):
        raise ValueError(f"`el_n` / `n` must be a positive int or a non-empty sequence of them, got {n!r}.")
    if not isinstance(prefix_stride, int) or prefix_stride < 1:
        raise ValueError(f"`prefix_stride` must be a positive int, got {prefix_stride!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    return ns


def extraction_likelihood(
    model: torch.nn.Module,
    input_ids: Any,
    attention_mask: Any = None,
    n: int = 10,
    prefix_stride: int = 1,
    batch_size: int = 32,
    *,
    labels: Any = None,
    pad_token_id: int = 0,
    use_cache: bool | None = None,
    stop_at_eos: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-sequence extraction likelihood EL_n (Jang et al. 2023).

    For every prefix length ``t = t0, t0 + prefix_stride, ... <= T - n`` the model greedily continues ``x_<t`` to
    the sequence's own length T; the score at t is the fraction of the n-grams of ``x_>=t`` hit by the
    continuation's n-grams (see the module docstring); EL_n is the mean over t. ``t0 = 1``, or with ``labels``
    the first supervised position (so a question prefix is always given). A sequence with no valid t
    (``T - n < t0``, i.e. n too large for the sequence) gets NaN. Padding (either side) is removed per sequence
    using ``attention_mask``.

    EOS: by default every continuation has exactly ``T - t`` tokens, EOS included as an ordinary token (the
    score then measures how much of the suffix the model *can* reproduce). ``stop_at_eos=True`` is what Jang et
    al.'s code measures with ``generate``: a continuation ends with its first generated EOS, the positions after
    it contribute no n-gram hits (``generate`` pads them; a padded n-gram only matches if the pad id occurs in
    the reference), and the denominator stays the n-grams of ``x_>=t``. So ``stop_at_eos=True`` never gives a
    higher score than the default, and both agree for a model that emits no EOS before the sequence length.

    Cost: ``(T - t0) / prefix_stride`` greedy continuations per sequence, about ``T^2 / (2 * prefix_stride)``
    generated tokens (T = 200, stride 1: ~20k tokens per sequence). All prefixes of all sequences are batched
    ``batch_size`` rows at a time, longest continuations first, with the model's KV cache when available.

    Args:
        model: A causal LM.
        input_ids: Token ids ``[B, T]``.
        attention_mask: Optional ``[B, T]`` mask.
        n: n-gram size (Jang: 10).
        prefix_stride: Step between evaluated prefix lengths (1 = every prefix, the exact definition).
        batch_size: Prefixes per generation batch.
        labels: Optional unshifted labels; only used to find the first supervised position t0.
        pad_token_id: Padding id for the internal left-padded generation batches.
        use_cache: Passed to :func:`greedy_generate`.
        stop_at_eos: End each continuation at its first generated EOS (as ``generate``), see above.
        eos_token_id: EOS id(s) for ``stop_at_eos``; default the model's ``generation_config`` / ``config``
            ``eos_token_id``.

    Returns:
        Float tensor ``[B]`` on the CPU.

    Raises:
        ValueError: If ``stop_at_eos=True`` and no EOS id is given or known from the model.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> extraction_likelihood(tiny_causal_lm("llama"), [[5, 6, 7, 8, 9]], n=2).shape
        torch.Size([1])
    """
    ns = _check_el_args(n, prefix_stride, batch_size)
    if len(ns) != 1:
        raise ValueError(f"`n` must be a single int here, got {n!r}; use evaluate_memorization(el_n=...) for several.")
    input_ids, attention_mask, labels = _prepare_batch(input_ids, attention_mask, labels)
    seqs = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        seqs.append(
            {
                "input_ids": input_ids[b][keep].tolist(),
                "labels": labels[b][keep].tolist() if labels is not None else None,
            }
        )
    eos = _resolve_eos(model, eos_token_id) if stop_at_eos else None
    scores = _el_scores(model, seqs, ns, prefix_stride, batch_size, pad_token_id, use_cache, eos)
    return torch.tensor(scores[ns[0]], dtype=torch.float32)


def _resolve_eos(model: torch.nn.Module, eos_token_id: int | Sequence[int] | None) -> int | list[int]:
    if eos_token_id is None:
        for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            eos_token_id = getattr(source, "eos_token_id", None)
            if eos_token_id is not None:
                break
    if eos_token_id is None or (not isinstance(eos_token_id, int) and len(eos_token_id) == 0):
        raise ValueError(
            "`stop_at_eos=True` needs an EOS id, but `eos_token_id` is None and the model's generation_config / "
            "config has none; pass `eos_token_id=tokenizer.eos_token_id`."
        )
    return eos_token_id if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


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
) -> dict[str, float]:
    """MA, EL_n, NLL and perplexity of a data set.

    ``ma`` and ``el{n}`` are means over sequences (sequences where the metric is undefined, NaN, are skipped;
    all undefined gives NaN); ``nll`` is the mean NLL over all counted tokens of the data set (token-pooled) and
    ``ppl = exp(nll)``. With ``labels`` only the supervised tokens count (see :func:`memorization_accuracy`,
    :func:`extraction_likelihood`).

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
            for correct, logp in _token_stats(model, ids, mask, labels):
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
