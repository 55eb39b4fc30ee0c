"""Unlearning metrics: memorization (MA, EL_n, NLL/perplexity), TOFU (truth ratio, forget quality, model
utility), membership inference (Min-k% Prob, AUC, PrivLeak) and robustness of the forgetting to quantization,
relearning, export and prompt attacks (`evaluate_robustness`).

Examples:
    >>> from peft_unlearn.metrics import evaluate_memorization
    >>> from peft_unlearn.testing import tiny_causal_lm
    >>> sorted(evaluate_memorization(tiny_causal_lm("llama"), [[5, 6, 7, 8]], el_n=(2,)))
    ['el2', 'ma', 'nll', 'ppl']
"""

from __future__ import annotations

from . import mia, tofu
from .extraction import extraction_likelihood
from .generation import greedy_generate
from .memorization import (
    compute_ma_metrics,
    evaluate_memorization,
    memorization_accuracy,
    pad_batch,
    perplexity,
    preprocess_logits_for_ma,
    sequence_nll,
    token_log_probs,
)
from .mia import mia_auc, min_k_prob_scores, privleak
from .report import format_results_table, write_results_json
from .robustness import (
    ROBUSTNESS_ATTACKS,
    AttackContext,
    RobustnessReport,
    RobustnessRow,
    evaluate_robustness,
    register_attack,
)
from .tofu import (
    answer_probability,
    evaluate_tofu,
    forget_quality,
    model_utility,
    rouge_l_recall,
    truth_ratio,
)
from .tofu_data import load_tofu

__all__ = [
    "ROBUSTNESS_ATTACKS",
    "AttackContext",
    "RobustnessReport",
    "RobustnessRow",
    "answer_probability",
    "compute_ma_metrics",
    "evaluate_memorization",
    "evaluate_robustness",
    "evaluate_tofu",
    "extraction_likelihood",
    "forget_quality",
    "format_results_table",
    "greedy_generate",
    "load_tofu",
    "memorization_accuracy",
    "mia",
    "mia_auc",
    "min_k_prob_scores",
    "model_utility",
    "pad_batch",
    "perplexity",
    "preprocess_logits_for_ma",
    "privleak",
    "register_attack",
    "rouge_l_recall",
    "sequence_nll",
    "tofu",
    "token_log_probs",
    "truth_ratio",
    "write_results_json",
]
