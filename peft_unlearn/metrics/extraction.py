"""Extraction likelihood EL_n (Jang et al. 2023): n-gram overlap of greedy continuations with the true text.

`EL_n(x) = 1/(T-n) * sum_{t=1}^{T-n} overlap_n(g_t, x_>=t)`, with `g_t` the greedy continuation of `x_<t` up
to total length T and `overlap_n(g, r)` the fraction of the n-grams of `r` matched by n-grams of `g` (with
multiplicity), the counting of Jang's `knowledge-unlearning` code; it lies in [0, 1].

Examples:
    >>> from peft_unlearn.testing import tiny_causal_lm
    >>> extraction_likelihood(tiny_causal_lm("llama"), [[5, 6, 7, 8, 9]], n=2).shape
    torch.Size([1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..utils import IGNORE_INDEX
from .forward import _prepare_batch
from .generation import greedy_generate

__all__ = ["extraction_likelihood"]


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
        use_cache: Passed to `greedy_generate`.
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
