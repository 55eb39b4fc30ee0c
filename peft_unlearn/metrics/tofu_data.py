"""TOFU data (Maini et al. 2024): the splits (the synthetic TOFU-format set shipped with the package, or the
Hub's `locuslab/TOFU`) and the question/answer formatting shared by training and evaluation.

Examples:
    >>> from peft_unlearn.testing import tiny_tokenizer
    >>> item = format_qa("Where?", " Paris", tiny_tokenizer())
    >>> item["labels"][0]
    -100
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..utils import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets

__all__ = ["DEFAULT_QA_TEMPLATE", "SYNTHETIC_SPLITS", "TOFU_HUB_ALIASES", "format_prompt", "format_qa", "load_tofu"]

DEFAULT_QA_TEMPLATE = "Question: {question}\nAnswer:"
SYNTHETIC_SPLITS = ("forget", "retain", "real_authors", "world_facts", "full")
TOFU_HUB_ALIASES = {
    "forget": "forget10_perturbed",
    "retain": "retain_perturbed",
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
}


def load_tofu(split: str, source: str = "synthetic", *, max_items: int | None = None) -> datasets.Dataset:
    """Load a TOFU split as a ``datasets.Dataset``.

    Rows have ``question``, ``answer``, ``paraphrased_answer`` and ``perturbed_answer`` (a list).

    - ``source="synthetic"``: a small offline data set shipped with the package (12 fictitious authors x 4 QA,
      forget = the first 3 authors (12 QA), retain = the other 9 (36 QA); 8 real-author and 8 world-fact
      questions with 3 perturbed options each). Splits: ``forget``, ``retain``, ``real_authors``,
      ``world_facts``, ``full`` (forget + retain).
    - ``source="hub"``: ``datasets.load_dataset("locuslab/TOFU", name, split="train")`` (needs the network or a
      local HF cache). ``split`` is any TOFU config name (``forget01``, ``forget05_perturbed``, ``retain90``,
      ``full``, ...) or an alias: ``forget`` -> ``forget10_perturbed``, ``retain`` -> ``retain_perturbed``,
      ``real_authors`` -> ``real_authors_perturbed``, ``world_facts`` -> ``world_facts_perturbed``.
      `evaluate_tofu` needs the ``*_perturbed`` configs (they carry ``paraphrased_answer`` and
      ``perturbed_answer``); plain configs such as ``forget10`` / ``retain90`` are for training.

    Args:
        split: Split name (see above).
        source: ``"synthetic"`` or ``"hub"``.
        max_items: Keep only the first ``max_items`` rows (the TOFU protocol evaluates the first 300).

    Returns:
        A ``datasets.Dataset``.

    Examples:
        >>> ds = load_tofu("forget")
        >>> len(ds), sorted(ds.column_names)[:3]
        (12, ['answer', 'author', 'paraphrased_answer'])
    """
    import datasets

    if source == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"`split` must be one of {SYNTHETIC_SPLITS} for source='synthetic', got {split!r}.")
        names = ("forget", "retain") if split == "full" else (split,)
        rows: list[dict[str, Any]] = []
        for name in names:
            path = resources.files("peft_unlearn") / "data" / f"tofu_synthetic_{name}.jsonl"
            with path.open(encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f if line.strip())
        ds = datasets.Dataset.from_list(rows)
    elif source == "hub":
        name = TOFU_HUB_ALIASES.get(split, split)
        ds = datasets.load_dataset("locuslab/TOFU", name, split="train")
    else:
        raise ValueError(f"`source` must be 'synthetic' or 'hub', got {source!r}.")
    if max_items is not None:
        if max_items < 1:
            raise ValueError(f"`max_items` must be >= 1 or None, got {max_items}.")
        ds = ds.select(range(min(max_items, len(ds))))
    return ds


# --------------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def format_prompt(question: str, tokenizer: Any, template: str = DEFAULT_QA_TEMPLATE) -> list[int]:
    """Token ids of the question prompt (what generation starts from).

    Args:
        question: The question text.
        tokenizer: A Hugging Face tokenizer.
        template: ``"chat"`` to use ``tokenizer.apply_chat_template`` (user turn + generation prompt), or a
            format string containing ``{question}`` (default ``"Question: {question}\\nAnswer:"``). Special
            tokens (e.g. BOS) are added as the tokenizer does by default.

    Returns:
        A list of token ids.

    Examples:
        >>> from peft_unlearn.testing import tiny_tokenizer
        >>> len(format_prompt("Who?", tiny_tokenizer())) > 0
        True
    """
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("`template='chat'` but the tokenizer has no chat_template; pass a format string.")
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        return [int(i) for i in ids]
    if not isinstance(template, str) or "{question}" not in template:
        raise ValueError(f"`template` must be 'chat' or a format string containing '{{question}}', got {template!r}.")
    return _encode(tokenizer, template.format(question=question), add_special_tokens=True)


def format_qa(
    question: str,
    answer: str,
    tokenizer: Any,
    template: str = DEFAULT_QA_TEMPLATE,
    *,
    add_eos: bool = True,
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Tokenize a question/answer pair with the question masked in the labels.

    The prompt (`format_prompt`) and the answer are tokenized separately and concatenated, so the
    answer tokens are exactly those scored. With a format-string template the answer is prefixed by a space
    (``"...Answer:" + " " + answer``); with ``"chat"`` it follows the generation prompt directly. The EOS
    token after the answer is supervised when ``add_eos`` (TOFU convention).

    Args:
        question: Question text.
        answer: Answer text.
        tokenizer: A Hugging Face tokenizer.
        template: ``"chat"`` or a format string with ``{question}``.
        add_eos: Append ``tokenizer.eos_token_id`` to the answer.
        max_length: Truncate the answer tail so the sequence has at most this many tokens (at least one
            answer token is kept).

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` with -100 on the prompt.

    Examples:
        >>> from peft_unlearn.testing import tiny_tokenizer
        >>> item = format_qa("Who?", "Jane.", tiny_tokenizer())
        >>> item["labels"][0], item["labels"][-1] == item["input_ids"][-1]
        (-100, True)
    """
    prompt = format_prompt(question, tokenizer, template)
    answer_text = answer if template == "chat" else " " + answer
    answer_ids = _encode(tokenizer, answer_text, add_special_tokens=False)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("`add_eos=True` but the tokenizer has no eos_token_id; pass add_eos=False.")
        answer_ids.append(int(tokenizer.eos_token_id))
    if not answer_ids:
        raise ValueError(f"The answer {answer!r} tokenizes to no tokens; every answer needs at least one token.")
    if max_length is not None:
        keep = max(1, max_length - len(prompt))
        answer_ids = answer_ids[:keep]
    return {"input_ids": prompt + answer_ids, "labels": [IGNORE_INDEX] * len(prompt) + answer_ids}
