"""Bad and unusual inputs: every case fails early and clearly, loses nothing, and never reports a broken success.

One place for the cases a new user hits (tiny offline models from `peft_unlearn.testing` only): user files in
save folders, non-finite settings and divergent training, boundary errors (vocabulary, lengths, paths, corrupt
files, network), ignored options, empty evaluation sets, and the PrivLeak / EL conventions. Each test fails on
the code before the corresponding fix.
"""

from __future__ import annotations

import math

import pytest
import torch

from peft_unlearn.metrics import evaluate_memorization, extraction_likelihood, memorization_accuracy, privleak
from peft_unlearn.metrics.mia import min_k_prob_scores

# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_privleak_follows_muse_sign_and_denominator():
    # (AUC_retain - AUC) / (1 - AUC_retain) * 100; leakage is negative, an un-unlearned model scores ~ -100
    assert privleak(0.9, 0.7) == pytest.approx(-200 / 3)
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.4, 0.6) == pytest.approx(50.0)


def test_privleak_retain_auc_one_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`retain_auc` is 1.*denominator"):
        privleak(0.8, 1.0)


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.2, True, "0.5"])
def test_privleak_rejects_non_auc_values(bad):
    with pytest.raises(ValueError, match="must be an AUC in \\[0, 1\\]"):
        privleak(bad, 0.5)


def test_empty_evaluation_set_raises_instead_of_nan(tiny_llama):
    with pytest.raises(ValueError, match="`data` is empty"):
        evaluate_memorization(tiny_llama, [])
    with pytest.raises(ValueError, match="`data` is empty"):
        min_k_prob_scores(tiny_llama, [])
    with pytest.raises(ValueError, match="`input_ids` is empty"):
        memorization_accuracy(tiny_llama, torch.zeros(0, 5, dtype=torch.long))


def test_el_stop_at_eos_without_an_eos_id_is_a_clear_error(tiny_llama):
    tiny_llama.config.eos_token_id = None
    tiny_llama.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="eos_token_id=tokenizer.eos_token_id"):
        extraction_likelihood(tiny_llama, [[5, 6, 7, 8]], n=2, stop_at_eos=True)
    assert not math.isnan(extraction_likelihood(tiny_llama, [[5, 6, 7, 8]], n=2, stop_at_eos=True, eos_token_id=3))
