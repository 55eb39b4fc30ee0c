"""TOFU metrics (Maini et al. 2024) with the formulas of ``locuslab/tofu`` / ``locuslab/open-unlearning``.

Per item, with ``nll(a | q)`` the mean per-token NLL of answer ``a`` given question ``q`` (question masked,
answer tokens + the EOS after the answer supervised, as in TOFU training):

- **Answer probability** ``P(a|q)^{1/|a|} = exp(-nll(a|q))`` (forget, retain).
- **Relative probability** (real authors, world facts): ``P(true) / (P(true) + sum_k P(perturbed_k))`` with the
  same length-normalised probabilities (open-unlearning ``probability_w_options``).
- **Truth ratio** ``R = [prod_k P(perturbed_k)^{1/|a_k|}]^{1/K} / P(base)^{1/|base|}
  = exp(nll(base) - mean_k nll(perturbed_k))``, where base is the paraphrased answer (forget, retain) or the
  answer (real authors, world facts). This module returns **R** (open-unlearning's ``wrong / correct``);
  the original TOFU code computes ``1/R = exp(mean perturbed nll - paraphrased nll)``. Small R: the model
  prefers the true answer.

  * forget-side statistic: ``mean(min(R, 1/R))`` (``closer_to_1_better``; 1 = cannot tell true from false);
  * utility-side statistic: ``mean(max(0, 1 - R))`` (``true_better``).
- **ROUGE-L recall** of the greedy generation against the answer (``rouge_score``, stemming on).
- **Forget quality**: p-value of ``scipy.stats.ks_2samp`` between the per-item forget truth ratios of the
  unlearned model and of a retain-only model (invariant to using R or 1/R for both).
- **Model utility**: harmonic mean of the 9 numbers {probability, ROUGE-L, truth-ratio statistic} x
  {retain, real authors, world facts}; 0 if any is 0.

Examples:
    >>> import numpy as np
    >>> from peft_unlearn.metrics.tofu import truth_ratio, truth_ratio_forget_score
    >>> r = truth_ratio(np.array([1.0]), np.array([[1.0, 1.0]]))  # equal NLLs: R = 1
    >>> float(r[0]), float(truth_ratio_forget_score(r))
    (1.0, 1.0)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .chunked import FusedSetting, check_chunk_size, resolve_fused
from .forward import eval_mode as _eval_mode
from .generation import greedy_generate
from .memorization import _token_stats, pad_batch
from .tofu_data import DEFAULT_QA_TEMPLATE, format_prompt, format_qa, load_tofu  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    pass

__all__ = [
    "answer_nll",
    "answer_probability",
    "evaluate_tofu",
    "forget_quality",
    "generate_answers",
    "model_utility",
    "relative_answer_probability",
    "rouge_l_recall",
    "truth_ratio",
    "truth_ratio_forget_score",
    "truth_ratio_utility_score",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Probabilities
# --------------------------------------------------------------------------------------------------------------


def answer_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: str = DEFAULT_QA_TEMPLATE,
    batch_size: int = 8,
    max_length: int | None = None,
    add_eos: bool = True,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> np.ndarray:
    """Mean per-token NLL of each answer given its question (question masked), batched.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (``pad_token_id`` or ``eos_token_id`` is used for padding).
        questions: N questions.
        answers: N answers.
        template: See `format_qa`.
        batch_size: Sequences per forward pass.
        max_length: See `format_qa`.
        add_eos: See `format_qa`.
        fused: Compute the answer log-probs from the last hidden states, ``chunk_size`` tokens at a time (no
            ``[B, T, V]`` logits; same values): ``"auto"`` (default) when the model supports it, ``True`` requires
            it, ``False`` uses the full logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        ``np.ndarray [N]`` (float64).

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> answer_nll(tiny_causal_lm("llama", vocab_size=len(tok)), tok, ["Who?"], ["Jane."]).shape
        (1,)
    """
    if len(questions) != len(answers):
        raise ValueError(f"`questions` has {len(questions)} items but `answers` has {len(answers)}; they must match.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    use_fused = resolve_fused(fused, model)
    check_chunk_size(chunk_size)
    items = [
        format_qa(q, a, tokenizer, template, add_eos=add_eos, max_length=max_length)
        for q, a in zip(questions, answers)
    ]
    pad = _pad_id(tokenizer)
    out = np.empty(len(items), dtype=np.float64)
    with _eval_mode(model):
        for start in range(0, len(items), batch_size):
            ids, mask, labels = pad_batch(items[start : start + batch_size], pad)
            stats = _token_stats(model, ids, mask, labels, fused=use_fused, chunk_size=chunk_size)
            for j, (_, logp) in enumerate(stats):
                out[start + j] = -float(logp.double().mean()) if logp.numel() else float("nan")
    return out


def answer_probability(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    template: str = DEFAULT_QA_TEMPLATE,
    batch_size: int = 8,
    max_length: int | None = None,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> np.ndarray:
    """Length-normalised answer probability ``P(a|q)^{1/|a|} = exp(-mean token NLL)`` per item.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        questions: N questions.
        answers: N answers.
        template: See `format_qa`.
        batch_size: Sequences per forward pass.
        max_length: See `format_qa`.
        fused: Compute the answer log-probs from the last hidden states, ``chunk_size`` tokens at a time (no
            ``[B, T, V]`` logits; same values): ``"auto"`` (default) when the model supports it, ``True`` requires
            it, ``False`` uses the full logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        ``np.ndarray [N]`` in (0, 1].

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> p = answer_probability(tiny_causal_lm("llama", vocab_size=len(tok)), tok, ["Who?"], ["Jane."])
        >>> bool(0 < p[0] <= 1)
        True
    """
    nll = answer_nll(
        model,
        tokenizer,
        questions,
        answers,
        template=template,
        batch_size=batch_size,
        max_length=max_length,
        fused=fused,
        chunk_size=chunk_size,
    )
    return np.exp(-nll)


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def _ragged(perturbed_nlls: Any, n: int, name: str) -> list[np.ndarray]:
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in perturbed_nlls]
    if len(rows) != n:
        raise ValueError(f"`{name}` has {len(rows)} rows but there are {n} items; they must match.")
    if any(r.size == 0 for r in rows):
        raise ValueError(f"Every row of `{name}` needs at least one perturbed value; got an empty row.")
    return rows


def truth_ratio(paraphrased_nll: Any, perturbed_nlls: Any) -> np.ndarray:
    """Per-item truth ratio ``R = exp(nll(base) - mean_k nll(perturbed_k))`` from per-token mean NLLs.

    ``R = geometric mean_k P(perturbed_k)^{1/|a_k|} / P(base)^{1/|base|}`` (open-unlearning's wrong/correct).
    R < 1: the model prefers the true (paraphrased) answer. The original TOFU code's value is ``1/R``.

    Args:
        paraphrased_nll: ``[N]`` mean per-token NLL of the base answer (paraphrased for forget/retain, the
            answer itself for real authors / world facts).
        perturbed_nlls: ``[N, K]`` array or N lists (ragged allowed) of mean per-token NLLs of the perturbed
            answers.

    Returns:
        ``np.ndarray [N]``.

    Examples:
        >>> float(truth_ratio([2.0], [[1.0, 3.0]])[0])  # exp(2 - 2)
        1.0
    """
    base = np.asarray(paraphrased_nll, dtype=np.float64).reshape(-1)
    rows = _ragged(perturbed_nlls, base.size, "perturbed_nlls")
    mean_pert = np.array([r.mean() for r in rows])
    return np.exp(base - mean_pert)


def truth_ratio_forget_score(ratios: Any) -> float:
    """Forget-side truth-ratio statistic ``mean(min(R, 1/R))`` in [0, 1] (1 = cannot tell true from false).

    Args:
        ratios: Per-item R from `truth_ratio`.

    Returns:
        The mean as a float.

    Examples:
        >>> truth_ratio_forget_score([0.5, 2.0, 1.0])
        0.6666666666666666
    """
    r = np.asarray(ratios, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return float(np.mean(np.minimum(r, 1.0 / r)))


def truth_ratio_utility_score(ratios: Any) -> float:
    """Utility-side truth-ratio statistic ``mean(max(0, 1 - R))`` in [0, 1] (higher: prefers the truth).

    Args:
        ratios: Per-item R from `truth_ratio`.

    Returns:
        The mean as a float.

    Examples:
        >>> truth_ratio_utility_score([0.25, 2.0])
        0.375
    """
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def relative_answer_probability(true_nll: Any, perturbed_nlls: Any) -> np.ndarray:
    """``P(true) / (P(true) + sum_k P(perturbed_k))`` with ``P = exp(-mean token NLL)`` (length-normalised).

    This is what TOFU / open-unlearning report as "probability" on real authors and world facts.

    Args:
        true_nll: ``[N]`` mean per-token NLL of the true answers.
        perturbed_nlls: ``[N, K]`` or ragged lists of the perturbed answers' mean per-token NLLs.

    Returns:
        ``np.ndarray [N]`` in (0, 1).

    Examples:
        >>> float(relative_answer_probability([1.0], [[1.0, 1.0, 1.0]])[0])
        0.25
    """
    t = np.asarray(true_nll, dtype=np.float64).reshape(-1)
    rows = _ragged(perturbed_nlls, t.size, "perturbed_nlls")
    p_true = np.exp(-t)
    p_wrong = np.array([np.exp(-r).sum() for r in rows])
    return p_true / (p_true + p_wrong)


# --------------------------------------------------------------------------------------------------------------
# Generation and ROUGE
# --------------------------------------------------------------------------------------------------------------


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    template: str = DEFAULT_QA_TEMPLATE,
    max_new_tokens: int = 200,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to the questions (stop at EOS or ``max_new_tokens``), decoded without special tokens.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        questions: The questions.
        template: See `format_prompt`.
        max_new_tokens: Generation budget per answer.
        batch_size: Prompts per batch (left-padded, KV cache when the model provides one).

    Returns:
        One stripped string per question.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> out = generate_answers(tiny_causal_lm("llama", vocab_size=len(tok)), tok, ["Who?"], max_new_tokens=4)
        >>> isinstance(out[0], str)
        True
    """
    prompts = [format_prompt(q, tokenizer, template) for q in questions]
    generated = greedy_generate(
        model,
        prompts,
        max_new_tokens,
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        batch_size=batch_size,
    )
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True) -> np.ndarray:
    """ROUGE-L recall ``LCS(prediction, reference) / len(reference)`` per pair (``rouge_score``, offline).

    Args:
        predictions: Generated texts.
        references: Reference answers.
        use_stemmer: Porter stemming as in TOFU / open-unlearning.

    Returns:
        ``np.ndarray [N]`` in [0, 1].

    Examples:
        >>> float(rouge_l_recall(["the cat sat"], ["the cat sat down"])[0])
        0.75
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("`predictions` and `references` must be sequences of strings, not a single string.")
    if len(predictions) != len(references):
        raise ValueError(
            f"`predictions` has {len(predictions)} items but `references` has {len(references)}; they must match."
        )
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return np.array([scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)])


# --------------------------------------------------------------------------------------------------------------
# Aggregates
# --------------------------------------------------------------------------------------------------------------


def forget_quality(unlearned_truth_ratios: Any, retain_truth_ratios: Any) -> float:
    """KS-test p-value between the forget-set truth ratios of the unlearned and the retain-only model.

    Both inputs must be the same per-item quantity (e.g. R from `truth_ratio`, or both 1/R; the KS test
    is invariant to applying the same monotone map to both).

    Args:
        unlearned_truth_ratios: Per-item values for the unlearned model.
        retain_truth_ratios: Per-item values for the retain-only model (same questions).

    Returns:
        ``scipy.stats.ks_2samp(...).pvalue`` (1 = indistinguishable from the retain model).

    Examples:
        >>> forget_quality([0.5, 1.0, 2.0], [0.5, 1.0, 2.0])
        1.0
    """
    from scipy.stats import ks_2samp

    a = np.asarray(unlearned_truth_ratios, dtype=np.float64).reshape(-1)
    b = np.asarray(retain_truth_ratios, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"Both truth-ratio samples must be non-empty, got sizes {a.size} and {b.size}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("Truth ratios must be finite; got NaN or inf (check the NLL inputs).")
    return float(ks_2samp(a, b).pvalue)


UTILITY_KEYS = tuple(
    f"{split}_{metric}"
    for split in ("retain", "real_authors", "world_facts")
    for metric in ("prob", "rougeL", "truth_ratio")
)


def model_utility(values: Mapping[str, float] | Sequence[float]) -> float:
    """Harmonic mean of the utility numbers (TOFU: 9 values); 0 when any value is 0.

    Args:
        values: A dict name -> value (e.g. the 9 ``UTILITY_KEYS`` of `evaluate_tofu`) or a sequence.
            Values must be finite and >= 0.

    Returns:
        ``scipy.stats.hmean(values)``, or 0.0 if any value is 0.

    Examples:
        >>> model_utility({"a": 0.5, "b": 0.25})
        0.3333333333333333
    """
    from scipy.stats import hmean

    vals = np.asarray(list(values.values()) if isinstance(values, Mapping) else list(values), dtype=np.float64)
    if vals.size == 0:
        raise ValueError("`values` is empty; pass the 9 TOFU utility numbers.")
    if not np.isfinite(vals).all() or (vals < 0).any():
        raise ValueError(f"`values` must be finite and >= 0, got {vals.tolist()}.")
    if (vals == 0).any():
        return 0.0
    return float(hmean(vals))


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------


def _rows(data: Any, max_items: int | None, name: str) -> list[dict[str, Any]]:
    rows = [dict(r) for r in data]
    if max_items is not None:
        rows = rows[:max_items]
    if not rows:
        raise ValueError(f"`{name}` is empty.")
    for key in ("question", "answer", "perturbed_answer"):
        if key not in rows[0]:
            raise ValueError(f"`{name}` rows need a {key!r} field (TOFU format); got fields {sorted(rows[0])}.")
    return rows


def _split_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    base_key: str,
    relative_prob: bool,
    template: str,
    batch_size: int,
    max_length: int | None,
    max_new_tokens: int,
    compute_rouge: bool,
    fused: bool,
    chunk_size: int | None,
) -> dict[str, Any]:
    questions = [r["question"] for r in rows]
    answers = [r["answer"] for r in rows]
    kw = {
        "template": template,
        "batch_size": batch_size,
        "max_length": max_length,
        "fused": fused,
        "chunk_size": chunk_size,
    }
    true_nll = answer_nll(model, tokenizer, questions, answers, **kw)
    if base_key == "answer":
        base_nll = true_nll
    else:
        if base_key not in rows[0]:
            raise ValueError(f"Rows need a {base_key!r} field (TOFU format); got fields {sorted(rows[0])}.")
        base_nll = answer_nll(model, tokenizer, questions, [r[base_key] for r in rows], **kw)
    perturbed = [
        list(r["perturbed_answer"]) if not isinstance(r["perturbed_answer"], str) else [r["perturbed_answer"]]
        for r in rows
    ]
    flat_q = [q for q, opts in zip(questions, perturbed) for _ in opts]
    flat_a = [a for opts in perturbed for a in opts]
    flat_nll = answer_nll(model, tokenizer, flat_q, flat_a, **kw)
    pert_nll, pos = [], 0
    for opts in perturbed:
        pert_nll.append(flat_nll[pos : pos + len(opts)])
        pos += len(opts)
    out: dict[str, Any] = {
        "prob": relative_answer_probability(true_nll, pert_nll) if relative_prob else np.exp(-true_nll),
        "truth_ratios": truth_ratio(base_nll, pert_nll),
    }
    if compute_rouge:
        gens = generate_answers(
            model, tokenizer, questions, template=template, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        out["rougeL"] = rouge_l_recall(gens, answers)
        out["generations"] = gens
    return out


def evaluate_tofu(
    model: torch.nn.Module,
    tokenizer: Any,
    forget: Any = None,
    retain: Any = None,
    real_authors: Any = None,
    world_facts: Any = None,
    retain_model_truth_ratios: Any = None,
    *,
    template: str = DEFAULT_QA_TEMPLATE,
    max_new_tokens: int = 200,
    batch_size: int = 8,
    max_items: int | None = 300,
    max_length: int | None = 500,
    compute_rouge: bool = True,
    fused: FusedSetting = "auto",
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """All TOFU numbers for one model: probability, ROUGE-L, truth ratio per split, model utility, forget quality.

    Splits (``datasets.Dataset`` or lists of dicts in TOFU format, see `load_tofu`) may be None to skip
    them. Truth ratios use ``paraphrased_answer`` as the base on forget/retain and ``answer`` on real authors /
    world facts; probability is ``P(a|q)^{1/|a|}`` on forget/retain and the relative probability against the
    perturbed options on real authors / world facts.

    Args:
        model: A causal LM (e.g. a ``PeftModel``).
        tokenizer: Its tokenizer.
        forget: Forget split (``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer``).
        retain: Retain split (same fields).
        real_authors: Real-authors split (``question``, ``answer``, ``perturbed_answer``).
        world_facts: World-facts split (same fields).
        retain_model_truth_ratios: ``evaluate_tofu(retain_model, ...)["forget_truth_ratios"]``; when given,
            ``forget_quality`` is computed.
        template: Prompt template (see `format_qa`).
        max_new_tokens: Generation budget for ROUGE (TOFU: max length 200).
        batch_size: Sequences per forward pass / generation batch.
        max_items: Evaluate the first ``max_items`` rows of each split (TOFU protocol: 300; None = all).
        max_length: Token budget per scored sequence (TOFU: 500).
        compute_rouge: False skips generation (ROUGE keys absent, no model utility).
        fused: The probabilities and truth ratios from the last hidden states, ``chunk_size`` tokens at a time (no
            ``[B, T, V]`` logits; same values): ``"auto"`` (default) when the model supports it, ``True`` requires
            it, ``False`` uses the full logits. ROUGE's greedy generation only computes last-position logits.
        chunk_size: Tokens per chunk of the fused path (None: about 2**24 logits per chunk).

    Returns:
        A dict with, for each given split ``s``: ``s_prob``, ``s_truth_ratio`` (forget: ``mean(min(R, 1/R))``;
        others: ``mean(max(0, 1 - R))``), ``s_rougeL``; plus ``forget_truth_ratios`` (list of per-item R, the
        input of `forget_quality`), ``forget_generations`` (list of str), ``model_utility`` (when retain,
        real authors and world facts are all given and ROUGE is computed) and ``forget_quality`` (when
        ``retain_model_truth_ratios`` is given).

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> model = tiny_causal_lm("llama", vocab_size=len(tok))
        >>> out = evaluate_tofu(model, tok, forget=load_tofu("forget"), compute_rouge=False)
        >>> 0 <= out["forget_truth_ratio"] <= 1
        True
    """
    splits = {"forget": forget, "retain": retain, "real_authors": real_authors, "world_facts": world_facts}
    if all(v is None for v in splits.values()):
        raise ValueError("Pass at least one of `forget`, `retain`, `real_authors`, `world_facts`.")
    use_fused = resolve_fused(fused, model)
    check_chunk_size(chunk_size)
    result: dict[str, Any] = {}
    for name, data in splits.items():
        if data is None:
            continue
        rows = _rows(data, max_items, name)
        scores = _split_scores(
            model,
            tokenizer,
            rows,
            base_key="paraphrased_answer" if name in ("forget", "retain") else "answer",
            relative_prob=name in ("real_authors", "world_facts"),
            template=template,
            batch_size=batch_size,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            compute_rouge=compute_rouge,
            fused=use_fused,
            chunk_size=chunk_size,
        )
        result[f"{name}_prob"] = float(np.mean(scores["prob"]))
        ratios = scores["truth_ratios"]
        if name == "forget":
            result["forget_truth_ratio"] = truth_ratio_forget_score(ratios)
            result["forget_truth_ratios"] = [float(r) for r in ratios]
        else:
            result[f"{name}_truth_ratio"] = truth_ratio_utility_score(ratios)
        if compute_rouge:
            result[f"{name}_rougeL"] = float(np.mean(scores["rougeL"]))
            if name == "forget":
                result["forget_generations"] = scores["generations"]
    if all(k in result for k in UTILITY_KEYS):
        result["model_utility"] = model_utility({k: result[k] for k in UTILITY_KEYS})
    if retain_model_truth_ratios is not None:
        if "forget_truth_ratios" not in result:
            raise ValueError("`retain_model_truth_ratios` was given but `forget` is None; pass the forget split.")
        result["forget_quality"] = forget_quality(result["forget_truth_ratios"], retain_model_truth_ratios)
    for key, value in result.items():
        if isinstance(value, float) and math.isnan(value):
            logger.warning("evaluate_tofu: %s is NaN (empty answers or NaN logits?).", key)
    return result
