"""The offline test helpers in ``peft_unlearn.testing``."""

from __future__ import annotations

import pytest
import torch

from peft_unlearn.testing import random_lm_batches


def test_random_lm_batches_shapes_masking_and_range():
    batches = random_lm_batches(3, seed=0, vocab_size=50, batch_size=4, seq_len=12, prompt_len=5)
    assert len(batches) == 3
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (4, 12)
        assert (b["labels"][:, :5] == -100).all()
        assert torch.equal(b["labels"][:, 5:], b["input_ids"][:, 5:])
        assert int(b["input_ids"].min()) >= 3 and int(b["input_ids"].max()) < 50
        assert (b["attention_mask"] == 1).all()


def test_random_lm_batches_is_deterministic_per_seed():
    a, b, c = random_lm_batches(2, seed=7), random_lm_batches(2, seed=7), random_lm_batches(2, seed=8)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"vocab_size": 3}, "vocab_size"), ({"prompt_len": 10}, "prompt_len"), ({"prompt_len": -1}, "prompt_len")],
)
def test_random_lm_batches_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_lm_batches(1, **kwargs)
