"""Tiny, offline models and tokenizers for tests, examples and the quick start.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in-process on a
small built-in corpus, and the models are randomly initialised from configs.

Examples:
    >>> from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> model = tiny_causal_lm("llama", vocab_size=len(tok))
    >>> model.config.model_type
    'llama'
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from .utils import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["TINY_CORPUS", "tiny_causal_lm", "tiny_tokenizer", "TINY_CHAT_TEMPLATE", "random_lm_batches"]

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "Four score and seven years ago our fathers brought forth on this continent a new nation.",
    "The author Jane Doe was born in Paris in 1970 and writes mystery novels.",
    "Question: Where was the author born? Answer: She was born in a small town.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-",
]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if not loop.last or message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 320, pad_token: bool = True) -> PreTrainedTokenizerFast:
    """Build a small byte-level BPE tokenizer offline.

    Args:
        vocab_size: Target vocabulary size (at least 259: 256 bytes plus 3 special tokens).
        pad_token: If False, the tokenizer has no pad token (to exercise the eos fallback).

    Returns:
        A `transformers.PreTrainedTokenizerFast` with `<bos>`, `<eos>` (and `<pad>`) special
        tokens and a minimal chat template.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>" if pad_token else None,
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """Build a randomly initialised causal LM from a config (no download).

    Args:
        arch: One of `"llama"`, `"gpt2"` (uses `Conv1D` layers), `"gemma3"`.
        vocab_size: Vocabulary size; match `len(tokenizer)`.
        hidden_size: Hidden width.
        num_layers: Number of decoder blocks.
        seed: Seed for the random weights.
        dtype: Parameter dtype.
        **config_kwargs: Extra config overrides.

    Returns:
        A `PreTrainedModel` for causal language modelling, in eval mode.
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    special_tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    decoder = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        **special_tokens,
    }
    if arch == "llama":
        config = LlamaConfig(**{**decoder, "tie_word_embeddings": False, **config_kwargs})
    elif arch == "gpt2":
        gpt2 = {
            "vocab_size": vocab_size,
            "n_embd": hidden_size,
            "n_layer": num_layers,
            "n_head": 4,
            "n_positions": 512,
        }
        config = GPT2Config(**{**gpt2, **special_tokens, **config_kwargs})
    elif arch == "gemma3":
        config = Gemma3TextConfig(**{**decoder, "head_dim": 8, "sliding_window": 64, **config_kwargs})
    else:
        raise ValueError(f"`arch` must be one of 'llama', 'gpt2', 'gemma3', got {arch!r}.")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_lm_batches(
    num_batches: int,
    seed: int = 0,
    vocab_size: int = 320,
    batch_size: int = 2,
    seq_len: int = 10,
    prompt_len: int = 3,
) -> list[dict[str, torch.Tensor]]:
    """Random causal-LM batches with a masked prompt, for tests of FILA and the losses.

    Token ids are drawn from ``[3, vocab_size)`` (0-2 are pad/bos/eos in the tiny models); the
    first ``prompt_len`` labels of every row are ``-100``.

    Args:
        num_batches: How many batches to draw.
        seed: Seed of the generator (the same seed gives the same batches).
        vocab_size: Vocabulary size of the model; match `len(tokenizer)`.
        batch_size: Rows per batch.
        seq_len: Tokens per row.
        prompt_len: Leading tokens per row excluded from the labels.

    Returns:
        A list of dicts with `input_ids`, `attention_mask` and `labels`, each `[batch_size, seq_len]`.

    Example:
        >>> first = random_lm_batches(2, seed=0)[0]
        >>> first["input_ids"].shape, int((first["labels"] == -100).sum())
        (torch.Size([2, 10]), 6)
    """
    if vocab_size <= 3:
        raise ValueError(f"`vocab_size` must be larger than 3 (ids 0-2 are special), got {vocab_size}.")
    if not 0 <= prompt_len < seq_len:
        raise ValueError(f"`prompt_len` must be in [0, seq_len={seq_len}), got {prompt_len}.")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen)
        labels = ids.clone()
        labels[:, :prompt_len] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out
