"""Batched greedy decoding with left padding and KV-cache reuse, for any causal LM (extraction likelihood, TOFU).

Examples:
    >>> from peft_unlearn.testing import tiny_causal_lm
    >>> [len(o) for o in greedy_generate(tiny_causal_lm("llama"), [[5, 6], [7]], max_new_tokens=2)]
    [2, 2]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..utils import model_device
from .forward import (
    accepts_kwarg,
    check_pad_token_id,
    eval_mode,
    forward_logits,
    forward_parameters,
    position_ids,
    to_id_list,
)

__all__ = ["greedy_generate"]


def _cache_kwarg(model: torch.nn.Module) -> str | None:
    names, _ = forward_parameters(model)
    if "cache" in names:  # transformers >= 5.2x
        return "cache"
    if "past_key_values" in names:
        return "past_key_values"
    return None


def _output_cache(out: Any) -> Any:
    for key in ("cache", "past_key_values"):
        value = out.get(key) if isinstance(out, Mapping) else None
        if value is None and not isinstance(out, Mapping):
            value = getattr(out, key, None)
        if value is not None:
            return value
    return None


def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int | Sequence[int],
    *,
    pad_token_id: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 16,
    use_cache: bool | None = None,
) -> list[list[int]]:
    """Batched greedy decoding with left padding and an optional KV cache; works with minimal modules.

    Prompts are sorted by the number of tokens to generate and processed ``batch_size`` at a time, left-padded
    (``position_ids`` derived from the mask when the model accepts them). When the model returns a cache
    (``.cache`` / ``.past_key_values``) only the new token is fed at each step; otherwise the whole sequence is
    re-run (O(L^2) per row; fine for toy models). Each row stops after its own ``max_new_tokens`` or, when
    ``eos_token_id`` is given, after emitting EOS (the EOS is included in the output).

    Cost: about ``sum_rows max_new_tokens`` single-token row passes: rows that are done leave the batch (their
    KV-cache rows are dropped with ``Cache.batch_select_indices``; caches without it keep them). Memory is one
    KV cache for ``batch_size`` rows and ``[batch_size, V]`` logits per step.

    Args:
        model: A causal LM.
        prompts: Token-id sequences (at least one token each).
        max_new_tokens: Number of tokens to generate, one int for all prompts or one per prompt.
        pad_token_id: Id used for left padding (masked out, so its value does not matter).
        eos_token_id: Optional id(s) that end a row early.
        batch_size: Rows per forward pass.
        use_cache: None = use the cache if the model returns one; False = always re-run the full sequence.

    Returns:
        The generated ids (without the prompt), one list per prompt, in input order.

    Examples:
        >>> from peft_unlearn.testing import tiny_causal_lm
        >>> out = greedy_generate(tiny_causal_lm("llama"), [[5, 6], [7]], max_new_tokens=3)
        >>> [len(o) for o in out]
        [3, 3]
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    pad_token_id = check_pad_token_id(pad_token_id)
    n = len(prompts)
    budgets = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    if len(budgets) != n:
        raise ValueError(f"`max_new_tokens` has {len(budgets)} entries but there are {n} prompts; they must match.")
    if any(m < 0 for m in budgets):
        raise ValueError(f"`max_new_tokens` must be >= 0, got {min(budgets)}.")
    prompt_lists = [to_id_list(p) for p in prompts]
    if any(len(p) == 0 for p in prompt_lists):
        raise ValueError("Every prompt needs at least one token; got an empty prompt.")
    eos = (
        set()
        if eos_token_id is None
        else ({int(eos_token_id)} if isinstance(eos_token_id, int) else set(eos_token_id))
    )
    results: list[list[int]] = [[] for _ in range(n)]
    order = sorted((i for i in range(n) if budgets[i] > 0), key=lambda i: (-budgets[i], -len(prompt_lists[i])))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            outs = _greedy_chunk(
                model, [prompt_lists[i] for i in chunk], [budgets[i] for i in chunk], pad_token_id, eos, use_cache
            )
            for i, o in zip(chunk, outs):
                results[i] = o
    return results


def _greedy_chunk(
    model: torch.nn.Module,
    prompts: list[list[int]],
    budgets: list[int],
    pad_token_id: int,
    eos: set[int],
    use_cache: bool | None,
) -> list[list[int]]:
    device = model_device(model)
    width = max(len(p) for p in prompts)
    rows = len(prompts)
    ids = torch.full((rows, width), int(pad_token_id), dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.as_tensor(p, dtype=torch.long, device=device)
        mask[r, width - len(p) :] = 1
    steps = max(budgets)
    budget_t = torch.as_tensor(budgets, device=device)
    generated = torch.full((rows, steps), int(pad_token_id), dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    eos_t = torch.as_tensor(sorted(eos), dtype=torch.long, device=device) if eos else None

    cache_name = _cache_kwarg(model) if use_cache is not False else None
    extra: dict[str, Any] = {}
    if accepts_kwarg(model, "logits_to_keep"):
        extra["logits_to_keep"] = 1
    if cache_name is not None and accepts_kwarg(model, "use_cache"):
        extra["use_cache"] = True
    cache = None
    step_ids = ids
    alive = torch.arange(rows, device=device)  # original row of each row still in the batch
    for k in range(steps):
        if cache is not None:
            kwargs = {
                "input_ids": step_ids,
                "attention_mask": mask,
                cache_name: cache,
                **extra,
            }
            if accepts_kwarg(model, "position_ids"):
                kwargs["position_ids"] = position_ids(mask)[:, -1:]
            out = model(**kwargs)
        else:
            out = forward_logits(model, ids, mask, **extra)
        next_tok = out.logits[:, -1].argmax(-1)
        generated[alive, k] = torch.where(done, torch.full_like(next_tok, int(pad_token_id)), next_tok)
        finished_now = budget_t[alive] <= k + 1
        if eos_t is not None:
            finished_now = finished_now | torch.isin(next_tok, eos_t)
        done = done | finished_now
        if bool(done.all()):
            break
        ids = torch.cat([ids, next_tok.unsqueeze(-1)], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        step_ids = next_tok.unsqueeze(-1)
        cache = _output_cache(out) if cache_name is not None else None
        if bool(done.any()) and (cache is None or hasattr(cache, "batch_select_indices")):
            # drop finished rows so that later steps only run the rows still generating
            keep = (~done).nonzero().squeeze(-1)
            ids, mask, step_ids, alive, done = ids[keep], mask[keep], step_ids[keep], alive[keep], done[keep]
            if cache is not None:
                cache.batch_select_indices(keep)
    results = []
    for r in range(rows):
        seq = generated[r, : budgets[r]].tolist()
        if eos:
            for j, tok in enumerate(seq):
                if tok in eos:
                    seq = seq[: j + 1]
                    break
        results.append(seq)
    return results
