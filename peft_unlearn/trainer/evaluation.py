"""Evaluation data and memorization metrics of `UnlearningTrainer.evaluate`.

Examples:
    >>> sets = tokenize_eval_sets({"forget": forget}, tokenizer, args, check=lambda name, ex: None)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import losses as L
from .collators import CausalLMCollator
from .formats import tokenize_dataset
from .pairing import TokenizedDataset

__all__ = ["causal_lm_dataloader", "causal_lm_nll", "memorization_metrics", "tokenize_eval_sets"]


def tokenize_eval_sets(
    eval_dataset: Any, tokenizer: Any, args: Any, check: Callable[[str, list], None]
) -> dict[str, list]:
    """Tokenize the evaluation set(s) of a run.

    Args:
        eval_dataset: A dataset (named `"forget"`) or a dict name -> dataset, in any supported format.
        tokenizer: The tokenizer of the run.
        args: The `UnlearningConfig` (`max_length`, `completion_only_loss`, `assistant_turns`).
        check: Called with `(name, examples)` of each set (token ids and lengths against the model).

    Returns:
        Set name -> tokenized examples.

    Raises:
        ValueError: If `eval_dataset` is an empty dict or one of its sets is empty.
    """
    sets = eval_dataset if isinstance(eval_dataset, Mapping) else {"forget": eval_dataset}
    if not sets:
        raise ValueError("`eval_dataset` is an empty dict; pass at least one named evaluation set, or None.")
    kwargs = {
        "max_length": args.max_length,
        "completion_only_loss": args.completion_only_loss,
        "assistant_turns": args.assistant_turns,
    }
    tokenized = {
        str(name): tokenize_dataset(ds, tokenizer, name=f"eval {name!r}", **kwargs) for name, ds in sets.items()
    }
    for name, examples in tokenized.items():
        if len(examples) == 0:
            raise ValueError(
                f"The evaluation set {name!r} is empty, so its metrics would be NaN; pass a non-empty set or drop it."
            )
        check(f"eval {name!r}", examples)
    return tokenized


def causal_lm_dataloader(
    examples: list, batch_size: int, pad_token_id: int, *, shard: tuple[int, int] | None = None, **kwargs: Any
) -> DataLoader:
    """An unshuffled loader of plain causal-LM batches (`input_ids`, `attention_mask`, `labels`).

    Args:
        examples: Tokenized examples.
        batch_size: Examples per batch.
        pad_token_id: Padding id of the collator.
        shard: `(process_index, world_size)`: keep every `world_size`-th example from `process_index` on.
        **kwargs: Passed to `DataLoader` (e.g. `num_workers`).

    Returns:
        The loader.
    """
    if shard is not None and shard[1] > 1:
        examples = examples[shard[0] :: shard[1]]
    return DataLoader(
        TokenizedDataset(examples),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=CausalLMCollator(pad_token_id),
        **kwargs,
    )


def causal_lm_nll(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], *, fused: bool, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean token NLL of a plain causal-LM batch (`input_ids`, `attention_mask`, `labels`).

    Args:
        model: The (possibly wrapped) model.
        inputs: The batch.
        fused: Use the fused path (`peft_unlearn.losses.fused`): no `[B, T, V]` logits.
        chunk_rows: Tokens per chunk of the fused path (None: automatic).

    Returns:
        The scalar loss.
    """
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if fused:
        hidden = L.model_hidden_states(model, **batch)
        return L.fused_nll_loss(hidden, L.output_head(model), inputs["labels"], chunk_rows=chunk_rows)
    logits = model(**batch, use_cache=False).logits
    if logits is None:
        raise ValueError("The model returned logits=None (e.g. a Liger-Kernel forward); set `fused_loss='auto'`.")
    return L.nll_loss(logits, inputs["labels"])


def memorization_metrics(
    model: nn.Module, examples: list, prefix: str, args: Any, pad_token_id: int, sharded: bool
) -> dict[str, float]:
    """MA, EL and NLL/perplexity of `examples` (`peft_unlearn.metrics.evaluate_memorization`), prefixed.

    Args:
        model: The (possibly wrapped) trained model.
        examples: Tokenized examples of one evaluation set.
        prefix: Metric name prefix, e.g. `"eval_forget"`.
        args: The `UnlearningConfig` (`per_device_eval_batch_size`, `eval_el_n`, `eval_el_prefix_stride`,
            `eval_compute_el`, `fused_loss`, `loss_chunk_size`).
        pad_token_id: Padding id.
        sharded: The model is sharded (FSDP, DeepSpeed): every process evaluates every example.

    Returns:
        `{prefix}_{metric}` -> value.
    """
    from ..metrics import evaluate_memorization

    result = evaluate_memorization(
        model,
        examples,
        batch_size=args.per_device_eval_batch_size,
        el_n=tuple(args.eval_el_n),
        el_prefix_stride=args.eval_el_prefix_stride,
        pad_token_id=pad_token_id,
        compute_el=args.eval_compute_el,
        distributed="none" if sharded else "shard",
        fused=args.fused_loss,
        chunk_size=args.loss_chunk_size,
    )
    return {f"{prefix}_{key}": float(value) for key, value in result.items()}
