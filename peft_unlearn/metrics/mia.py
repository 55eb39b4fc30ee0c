"""Membership inference: Min-k% Prob scores, ROC AUC and PrivLeak (MUSE, open-unlearning).

- **Min-k% Prob** (Shi et al. 2024): the mean of the lowest ``k`` fraction of a sequence's token
  log-probabilities (``max(1, int(k * n_tokens))`` tokens). Higher score = more member-like.
- **AUC** of separating members (e.g. the forget set) from non-members (a held-out set): the probability that
  a random member scores higher than a random non-member, ties counting 1/2 (Mann-Whitney U / (n_m n_n)).
- **PrivLeak** (MUSE): ``(AUC_retain - AUC) / (1 - AUC_retain) * 100`` where ``AUC`` is the attack on the
  unlearned model and ``AUC_retain`` the same attack on a retain-only model (never trained on the forget set).
  ~0 is ideal; **negative = leakage** (members still detected better than by the retain-only model; a model
  that never unlearned scores near -100), positive = over-unlearning. MUSE and open-unlearning compute their AUC
  with the opposite orientation (lower score = member), ``AUC' = 1 - AUC``, and report
  ``(AUC' - AUC'_retain) / AUC'_retain * 100``, which is exactly this formula, so the numbers agree.

Examples:
    >>> mia_auc([0.9, 0.8], [0.1, 0.8])
    0.875
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .chunked import FusedSetting, check_chunk_size, resolve_fused
from .memorization import _eval_mode, _normalize_data, _token_stats, pad_batch

__all__ = ["min_k_prob_scores", "mia_auc", "privleak"]


def min_k_prob_scores(
    model: torch.nn.Module,
    data: Any,
    k: float = 0.4,
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Min-k% Prob score per sequence: mean of the lowest ``k`` fraction of token log-probabilities.

    Args:
        model: A causal LM.
        data: Token-id lists, a list of dicts / ``datasets.Dataset`` with ``input_ids`` (+ optional ``labels``:
            only supervised tokens count), as in [`evaluate_memorization`][peft_unlearn.metrics.memorization.evaluate_memorization].
        k: Fraction in (0, 1] of the lowest-probability tokens to average (MUSE default 0.4).
        batch_size: Sequences per forward pass.
        pad_token_id: Padding id for batching.
        fused: Token log-probs from the last hidden states, ``chunk_size`` tokens at a time (no ``[B, T, V]``
            logits; same values): ``"auto"`` (default) when the model supports it, ``True`` requires it, ``False``
            uses the full logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        Float tensor ``[N]`` (NaN for a sequence without counted tokens).

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> min_k_prob_scores(tiny_causal_lm("llama"), [[5, 6, 7, 8]]).shape
        torch.Size([1])
    """
    if not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"`k` must be a fraction in (0, 1], got {k!r} (e.g. 0.4 for Min-40%).")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    use_fused = resolve_fused(fused, model)
    check_chunk_size(chunk_size)
    items = _normalize_data(data)
    if not items:
        raise ValueError("`data` is empty: min_k_prob_scores needs at least one sequence to score.")
    scores: list[float] = []
    with _eval_mode(model):
        for start in range(0, len(items), batch_size):
            ids, mask, labels = pad_batch(items[start : start + batch_size], pad_token_id)
            for _, logp in _token_stats(model, ids, mask, labels, fused=use_fused, chunk_size=chunk_size):
                if logp.numel() == 0:
                    scores.append(float("nan"))
                    continue
                num = max(1, int(k * logp.numel()))
                scores.append(float(torch.sort(logp.double()).values[:num].mean()))
    return torch.tensor(scores, dtype=torch.float64)


def _as_scores(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"`{name}` is empty; pass at least one score.")
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains NaN or inf; drop sequences without counted tokens first.")
    return arr


def mia_auc(member_scores: Sequence[float] | Any, nonmember_scores: Sequence[float] | Any) -> float:
    """ROC AUC of member vs non-member scores (higher score = member), ties counted 1/2.

    Computed from average ranks (Mann-Whitney): ``(R_members - n_m (n_m + 1) / 2) / (n_m n_n)``.

    Args:
        member_scores: Scores of member sequences (e.g. the forget set).
        nonmember_scores: Scores of non-member sequences (e.g. a held-out set).

    Returns:
        AUC in [0, 1]; 0.5 = no separation.

    Examples:
        >>> mia_auc([3.0, 2.0], [1.0, 0.0])
        1.0
    """
    from scipy.stats import rankdata

    m = _as_scores("member_scores", member_scores)
    n = _as_scores("nonmember_scores", nonmember_scores)
    ranks = rankdata(np.concatenate([m, n]))  # average ranks for ties
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def privleak(auc: float, retain_auc: float) -> float:
    """MUSE PrivLeak: the attack-AUC gap to a retain-only model, relative to that model's margin, in percent.

    With this module's orientation (AUC 1 = members perfectly detected):
    ``(retain_auc - auc) / (1 - retain_auc) * 100``, the value MUSE and open-unlearning report (they use the
    flipped AUC ``1 - auc``; see the module docstring). About 0 is ideal; negative means leakage (the forget
    set is still recognised as members: an un-unlearned model with ``auc = 1`` and ``retain_auc = 0.5`` gives
    -100); positive means over-unlearning (the forget set looks less member-like than to the retain-only model).

    Args:
        auc: Attack AUC on the unlearned model ([`mia_auc`][peft_unlearn.metrics.mia_auc], members = forget set).
        retain_auc: The same attack's AUC on a retain-only model; must be < 1.

    Returns:
        ``(retain_auc - auc) / (1 - retain_auc) * 100``.

    Raises:
        ValueError: If an AUC is not a number in [0, 1], or ``retain_auc`` is 1 (the retain-only model already
            separates the sets perfectly, so the margin ``1 - retain_auc`` is 0 and PrivLeak is undefined).

    Examples:
        >>> round(privleak(1.0, 0.5), 6)
        -100.0
        >>> round(privleak(0.55, 0.6), 6)
        12.5
    """
    for name, value in (("auc", auc), ("retain_auc", retain_auc)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
            raise ValueError(f"`{name}` must be an AUC in [0, 1], got {value!r}.")
    if retain_auc == 1:
        raise ValueError(
            "`retain_auc` is 1: the attack separates the forget set from the non-members perfectly even on the "
            "retain-only model, so PrivLeak's denominator (1 - retain_auc) is 0 and the metric is undefined. Check "
            "that the retain-only model never saw the forget set and that members/non-members are not swapped."
        )
    return (float(retain_auc) - float(auc)) / (1.0 - float(retain_auc)) * 100.0
