"""TRL dataset formats -> tokenized `{"input_ids", "labels"}` examples (forget, retain, evaluation, IDK).

Accepted formats (one per dataset, detected from its columns, in this order of precedence):

* **pre-tokenized**: ``input_ids`` (+ optional ``labels``, ``attention_mask``): used as is (positions whose
  ``attention_mask`` is 0 are dropped; without ``labels`` every token is supervised).
* **conversational**: ``messages``, a list of ``{"role", "content"}`` dicts (``content`` a string, or a list of text
  parts ``[{"type": "text", "text": ...}]``, joined in order) rendered with the tokenizer's chat
  template; with ``completion_only_loss`` only assistant turns are supervised (all of them or the last one).
* **conversational prompt-completion**: ``prompt`` and ``completion`` as message lists (TRL convention).
* **prompt-completion**: ``prompt`` and ``completion`` strings; with ``completion_only_loss`` only the completion
  (and the appended EOS) is supervised.
* **language modeling**: ``text``; every token is supervised.

Text and completions get the tokenizer's BOS where its post-processor adds one and an EOS at the end (as TRL
does); chat-template output is used as the template renders it. Sequences are truncated on the right to
``max_length``. Every tokenized example is a dict ``{"input_ids": list[int], "labels": list[int]}`` with -100 on
unsupervised tokens.

Examples:
    >>> from peft_unlearn.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> ex = tokenize_dataset([{"prompt": "Question: Where?", "completion": " Paris"}], tok, name="forget")[0]
    >>> ex["labels"][-1] == tok.eos_token_id and ex["labels"][0] == -100
    True
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..utils import IGNORE_INDEX
from .data_checks import check_example

__all__ = [
    "DEFAULT_IDK_ANSWERS",
    "SUPPORTED_FORMATS",
    "detect_format",
    "ensure_pad_token",
    "tokenize_dataset",
    "tokenize_idk_dataset",
]

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS: dict[str, str] = {
    "tokenized": "'input_ids' (+ optional 'labels', 'attention_mask'): pre-tokenized",
    "conversational": "'messages': list of {'role', 'content'} dicts (chat template)",
    "conversational_prompt_completion": "'prompt' and 'completion' as lists of {'role', 'content'} dicts",
    "prompt_completion": "'prompt' and 'completion' strings",
    "language_modeling": "'text' string",
}

DEFAULT_IDK_ANSWERS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I can't answer that.",
    "I don't have that information.",
    "Sorry, I don't know the answer to that.",
    "I'm afraid I can't help with that.",
    "That's something I don't know.",
    "I have no information about that.",
    "I'm unable to answer that question.",
    "I don't have an answer for you.",
    "I couldn't tell you.",
    "That is beyond what I know.",
    "I'm not able to say.",
    "Unfortunately, I don't know.",
    "I lack the knowledge to answer that.",
    "I'm not aware of the answer.",
    "No idea, sorry.",
    "I really can't say.",
    "I don't know anything about that.",
)
"""Built-in answers for ``forget_loss="idk"`` (written for this library)."""


def ensure_pad_token(tokenizer: Any) -> int:
    """Return the tokenizer's pad token id, setting ``pad_token = eos_token`` (with a warning) when it has none.

    Args:
        tokenizer: A Hugging Face tokenizer (modified in place when it lacks a pad token).

    Returns:
        The pad token id.

    Raises:
        ValueError: If the tokenizer has neither a pad nor an EOS token.

    Examples:
        >>> from peft_unlearn.testing import tiny_tokenizer
        >>> ensure_pad_token(tiny_tokenizer()) == 0
        True
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer (processing_class) has neither a pad token nor an EOS token; set "
                "`tokenizer.pad_token = ...` before creating the trainer."
            )
        logger.warning(
            "The tokenizer has no pad token; using its EOS token %r for padding (padding is masked out of every loss).",
            tokenizer.eos_token,
        )
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _is_message_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def _column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):
        return names
    if isinstance(names, dict):  # DatasetDict
        raise TypeError(
            f"Got a DatasetDict with splits {list(names)}; pass one split, e.g. dataset['train'], instead."
        )
    first = dataset[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"Dataset examples must be dicts (mappings of column -> value), got {type(first).__name__}.")
    return list(first.keys())


def detect_format(column_names: Iterable[str], example: Mapping[str, Any] | None = None) -> str | None:
    """Detect the dataset format from its columns (and one example to tell strings from message lists).

    Args:
        column_names: Column names of the dataset.
        example: One example, used to distinguish the string and conversational prompt/completion formats.

    Returns:
        One of the keys of `SUPPORTED_FORMATS`, or ``None`` when no format matches.

    Examples:
        >>> detect_format(["prompt", "completion"], {"prompt": "Hi", "completion": " there"})
        'prompt_completion'
    """
    cols = set(column_names)
    if "input_ids" in cols:
        return "tokenized"
    if "messages" in cols:
        return "conversational"
    if {"prompt", "completion"} <= cols:
        if example is not None and _is_message_list(example.get("prompt")):
            return "conversational_prompt_completion"
        return "prompt_completion"
    if "text" in cols:
        return "language_modeling"
    return None


def _chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> list:
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    ids = out["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # batched output
        ids = ids[0]
    return list(ids)


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        return [*ids, eos_id]
    return ids


def _text_messages(messages: Sequence[Mapping[str, Any]], column: str, index: int, name: str) -> list[dict[str, Any]]:
    """The messages with every ``content`` a string: a list of parts (the OpenAI / Hugging Face multimodal layout,
    ``[{"type": "text", "text": ...}, ...]``) becomes the concatenation of its text parts, in order, as the chat
    templates that accept parts render them. Non-text parts (images, audio) are refused: the models trained here read
    text only.
    """
    result = []
    for turn, message in enumerate(messages):
        content = message["content"]
        where = f"{name} example {index}: {column}[{turn}]['content']"
        if isinstance(content, (list, tuple)):
            texts = []
            for part_index, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    shown = repr(kind) if kind is not None else type(part).__name__
                    raise ValueError(
                        f"{where}[{part_index}] is a {shown} part, but only text parts ({{'type': 'text', 'text': "
                        "'...'}}) are supported: peft_unlearn trains text-only causal language models. Remove the "
                        "non-text parts, or pass the content as a string."
                    )
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise TypeError(
                f"{where} must be a string or a list of text parts ({{'type': 'text', 'text': '...'}}), got "
                f"{type(content).__name__}."
            )
        result.append({**message, "content": content})
    return result


def _require_str(value: Any, column: str, index: int, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} example {index}: column '{column}' must be a string, got {type(value).__name__}.")
    return value


def _tokenize_prompt_completion_ids(
    prompt_ids: list[int], full_ids: list[int], completion_only_loss: bool
) -> dict[str, list[int]]:
    start = _common_prefix_length(prompt_ids, full_ids)
    labels = list(full_ids) if not completion_only_loss else [IGNORE_INDEX] * start + list(full_ids[start:])
    return {"input_ids": list(full_ids), "labels": labels}


def _content_start(tokenizer: Any, prior: Sequence[Mapping[str, Any]], full_ids: list[int]) -> int:
    """Index in ``full_ids`` where the content of the assistant turn that follows ``prior`` starts.

    Two renderings are compared with the full conversation and the longer common prefix wins: ``prior`` with the
    generation prompt (TRL's approach) and ``prior`` followed by an empty assistant message. The second one is right
    for templates that render the last message of ``prior`` differently when it is last (e.g. without its end of
    turn), where the first one would start the span too early.
    """
    start = 0
    if prior:
        start = _common_prefix_length(_chat_ids(tokenizer, prior, add_generation_prompt=True), full_ids)
    try:
        empty = _chat_ids(tokenizer, [*prior, {"role": "assistant", "content": ""}])
    except Exception:  # some templates reject an empty or leading assistant message
        return start
    return max(start, _common_prefix_length(empty, full_ids))


def _assistant_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], full_ids: list[int]
) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the assistant turns inside the rendered conversation ``full_ids``."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _content_start(tokenizer, messages[:i], full_ids)
        end = _common_prefix_length(_chat_ids(tokenizer, messages[: i + 1]), full_ids)
        if end > start:
            spans.append((start, end))
    return spans


def _tokenize_example(
    example: Mapping[str, Any],
    fmt: str,
    tokenizer: Any,
    *,
    completion_only_loss: bool,
    assistant_turns: str,
    index: int,
    name: str,
) -> dict[str, list[int]]:
    eos_id = tokenizer.eos_token_id
    if fmt == "tokenized":
        input_ids = [int(t) for t in example["input_ids"]]
        labels = example.get("labels")
        labels = list(input_ids) if labels is None else [int(t) for t in labels]
        if len(labels) != len(input_ids):
            raise ValueError(
                f"{name} example {index}: 'labels' has {len(labels)} entries but 'input_ids' has {len(input_ids)}; "
                "they must align (use -100 for unsupervised tokens)."
            )
        mask = example.get("attention_mask")
        if mask is not None:
            keep = [j for j, m in enumerate(mask) if m]
            input_ids = [input_ids[j] for j in keep]
            labels = [labels[j] for j in keep]
        return {"input_ids": input_ids, "labels": labels}
    if fmt == "language_modeling":
        ids = _with_eos(_text_ids(tokenizer, _require_str(example["text"], "text", index, name)), eos_id)
        return {"input_ids": ids, "labels": list(ids)}
    if fmt == "prompt_completion":
        prompt = _require_str(example["prompt"], "prompt", index, name)
        completion = _require_str(example["completion"], "completion", index, name)
        prompt_ids = _text_ids(tokenizer, prompt)
        full_ids = _with_eos(_text_ids(tokenizer, prompt + completion), eos_id)
        return _tokenize_prompt_completion_ids(prompt_ids, full_ids, completion_only_loss)
    if fmt == "conversational_prompt_completion":
        prompt, completion = example["prompt"], example["completion"]
        if not _is_message_list(prompt) or not _is_message_list(completion):
            raise TypeError(
                f"{name} example {index}: 'prompt' and 'completion' must both be lists of {{'role', 'content'}} "
                "dicts (or both strings)."
            )
        prompt = _text_messages(prompt, "prompt", index, name)
        completion = _text_messages(completion, "completion", index, name)
        full_ids = _chat_ids(tokenizer, [*prompt, *completion])
        start = _content_start(tokenizer, prompt, full_ids)
        return _tokenize_prompt_completion_ids(full_ids[:start], full_ids, completion_only_loss)
    if fmt == "conversational":
        messages = example["messages"]
        if not _is_message_list(messages):
            raise TypeError(
                f"{name} example {index}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts."
            )
        messages = _text_messages(messages, "messages", index, name)
        full_ids = _chat_ids(tokenizer, messages)
        if not completion_only_loss:
            return {"input_ids": full_ids, "labels": list(full_ids)}
        spans = _assistant_spans(tokenizer, messages, full_ids)
        if not spans:
            raise ValueError(
                f"{name} example {index} has no assistant turn to supervise; add an assistant message or set "
                "completion_only_loss=False to supervise the whole conversation."
            )
        if assistant_turns == "last":
            spans = spans[-1:]
        labels = [IGNORE_INDEX] * len(full_ids)
        for start, end in spans:
            labels[start:end] = full_ids[start:end]
        return {"input_ids": full_ids, "labels": labels}
    raise ValueError(f"Unknown format {fmt!r}.")  # pragma: no cover


def _finalize(example: dict[str, list[int]], max_length: int | None, index: int, name: str) -> dict[str, list[int]]:
    full_length = len(example["input_ids"])
    if max_length is not None:
        example = {"input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}
    if not any(label != IGNORE_INDEX for label in example["labels"][1:]):
        where = (
            f"after truncation to max_length={max_length} (the full example has {full_length} tokens)"
            if max_length is not None and full_length > max_length
            else f"(the example has {full_length} tokens)"
        )
        raise ValueError(
            f"{name} example {index} has no supervised token left {where}: every label after the first token is "
            "masked. Increase `max_length`, shorten the prompt, or check the completion/assistant text is not empty."
        )
    return example


def _check_dataset(dataset: Any, name: str) -> tuple[str, list[str]]:
    if dataset is None:
        raise ValueError(f"The {name} dataset is None.")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"The {name} dataset must be a map-style dataset (datasets.Dataset or a list of dicts) with a length, "
            f"got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty; it needs at least one example.")
    columns = _column_names(dataset)
    fmt = detect_format(columns, dataset[0])
    if fmt is None:
        accepted = "; ".join(SUPPORTED_FORMATS.values())
        raise ValueError(
            f"The {name} dataset has no recognised columns (found: {sorted(columns)}). Accepted formats: {accepted}."
        )
    return fmt, columns


def _check_chat_template(tokenizer: Any, fmt: str, name: str) -> None:
    if fmt.startswith("conversational") and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The {name} dataset is conversational (format {fmt!r}) but the tokenizer has no chat template; set "
            "`tokenizer.chat_template = ...` or convert the data to prompt/completion strings."
        )


def tokenize_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    max_length: int | None = 512,
    completion_only_loss: bool = True,
    assistant_turns: str = "all",
    name: str = "forget",
) -> list[dict[str, list[int]]]:
    """Tokenize a dataset in any supported format into ``{"input_ids", "labels"}`` examples.

    Args:
        dataset: A ``datasets.Dataset`` or a list of dicts in one of the `SUPPORTED_FORMATS`.
        tokenizer: Hugging Face tokenizer (with a chat template for conversational data).
        max_length: Right-truncation length, or ``None``.
        completion_only_loss: Supervise only completion/assistant tokens (prompt-completion and conversational).
        assistant_turns: ``"all"`` or ``"last"`` assistant turns of ``messages`` data.
        name: Name of the dataset used in error messages (``"forget"``, ``"retain"``, an eval-set name).

    Returns:
        A list of dicts with ``input_ids`` and ``labels`` (lists of ints of equal length).

    Raises:
        ValueError: Empty dataset, no recognised columns, or an example without supervised token.

    Examples:
        >>> from peft_unlearn.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> out = tokenize_dataset([{"text": "The quick brown fox."}], tok, name="retain")
        >>> out[0]["input_ids"] == out[0]["labels"]
        True
    """
    fmt, _ = _check_dataset(dataset, name)
    _check_chat_template(tokenizer, fmt, name)
    out = []
    for index in range(len(dataset)):
        check_example(dataset[index], fmt, index=index, name=name)
        example = _tokenize_example(
            dataset[index],
            fmt,
            tokenizer,
            completion_only_loss=completion_only_loss,
            assistant_turns=assistant_turns,
            index=index,
            name=name,
        )
        out.append(_finalize(example, max_length, index, name))
    return out


def tokenize_idk_dataset(
    dataset: Any,
    tokenizer: Any,
    idk_answers: Sequence[str] | None = None,
    *,
    max_length: int | None = 512,
    name: str = "forget",
) -> list[list[dict[str, list[int]]]]:
    """Tokenize every forget question with every "I don't know" answer (targets of ``forget_loss="idk"``).

    Only the answer (and EOS / the template's end of turn) is supervised.

    Args:
        dataset: Prompt-completion (strings or messages) or ``messages`` data; for ``messages`` the question is
            the conversation before the last assistant turn.
        tokenizer: Hugging Face tokenizer.
        idk_answers: Answers; ``None`` uses `DEFAULT_IDK_ANSWERS`.
        max_length: Right-truncation length, or ``None``.
        name: Dataset name for error messages.

    Returns:
        ``variants[i][j]``: example ``i`` answered with ``idk_answers[j]``, as ``{"input_ids", "labels"}``.

    Raises:
        ValueError: If the format has no question (``text`` or pre-tokenized data).

    Examples:
        >>> from peft_unlearn.testing import tiny_tokenizer
        >>> v = tokenize_idk_dataset([{"prompt": "Q?", "completion": " A"}], tiny_tokenizer(), ["No idea."])
        >>> len(v), len(v[0])
        (1, 1)
    """
    answers = list(DEFAULT_IDK_ANSWERS if idk_answers is None else idk_answers)
    fmt, columns = _check_dataset(dataset, name)
    if fmt not in ("prompt_completion", "conversational_prompt_completion", "conversational"):
        raise ValueError(
            f"forget_loss='idk' needs a question to answer with 'I don't know', i.e. prompt/completion or "
            f"conversational ('messages') data; the {name} dataset has format {fmt!r} (columns {sorted(columns)}). "
            "Use another forget_loss or provide prompt/completion columns."
        )
    _check_chat_template(tokenizer, fmt, name)
    variants = []
    for index in range(len(dataset)):
        example = dataset[index]
        rows = []
        for answer in answers:
            if fmt == "prompt_completion":
                prompt = _require_str(example["prompt"], "prompt", index, name)
                sep = "" if not prompt or prompt[-1].isspace() else " "
                new = {"prompt": prompt, "completion": sep + answer}
                sub_fmt = fmt
            elif fmt == "conversational_prompt_completion":
                new = {"prompt": example["prompt"], "completion": [{"role": "assistant", "content": answer}]}
                sub_fmt = fmt
            else:
                messages = list(example["messages"])
                last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
                new = {
                    "prompt": messages[:last],
                    "completion": [{"role": "assistant", "content": answer}],
                }
                sub_fmt = "conversational_prompt_completion"
                if not new["prompt"]:
                    raise ValueError(
                        f"{name} example {index} has no message before its assistant turn to use as question."
                    )
            tokenized = _tokenize_example(
                new,
                sub_fmt,
                tokenizer,
                completion_only_loss=True,
                assistant_turns="all",
                index=index,
                name=f"{name} (idk)",
            )
            rows.append(_finalize(tokenized, max_length, index, f"{name} (idk)"))
        variants.append(rows)
    return variants
