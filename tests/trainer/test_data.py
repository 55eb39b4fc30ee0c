"""Tests of the trainer's data handling (formats, pairing, collators): masks, truncation, pairing, padding."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from tokenizers.processors import TemplateProcessing

from peft_unlearn.testing import tiny_tokenizer
from peft_unlearn.trainer.collators import CausalLMCollator, UnlearningDataCollator, collate_causal_lm
from peft_unlearn.trainer.formats import (
    DEFAULT_IDK_ANSWERS,
    detect_format,
    ensure_pad_token,
    tokenize_dataset,
    tokenize_idk_dataset,
)
from peft_unlearn.trainer.pairing import PairedUnlearningDataset

IGNORE = -100
MESSAGES = [
    {"role": "user", "content": "Where was the author born?"},
    {"role": "assistant", "content": " She was born in Paris."},
    {"role": "user", "content": "When?"},
    {"role": "assistant", "content": " In 1970."},
]


def _supervised(example):
    return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]


def _expected_mask_from_chars(tok, text, spans):
    """Independent label mask: tokens of `text` whose characters fall inside one of the char `spans`."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= a and b <= e for s, e in spans) and b > a for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def _assistant_char_spans(tok, text, contents):
    spans, pos = [], 0
    for content in contents:
        start = text.index(content, pos)
        end = start + len(content) + len(tok.eos_token)
        assert text[start + len(content) : end] == tok.eos_token
        spans.append((start, end))
        pos = end
    return spans


# ---------------------------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "example", "expected"),
    [
        (["input_ids", "text"], {}, "tokenized"),
        (["messages"], {}, "conversational"),
        (["prompt", "completion"], {"prompt": "a", "completion": "b"}, "prompt_completion"),
        (
            ["prompt", "completion"],
            {"prompt": MESSAGES[:1], "completion": MESSAGES[1:2]},
            "conversational_prompt_completion",
        ),
        (["text", "id"], {}, "language_modeling"),
        (["question", "answer"], {}, None),
    ],
)
def test_detect_format(columns, example, expected):
    assert detect_format(columns, example) == expected


def test_text_all_tokens_supervised_with_eos(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    (ex,) = tokenize_dataset([{"text": text}], tokenizer)
    expected = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert ex["input_ids"] == expected
    assert ex["labels"] == expected


def test_text_with_bos_adding_tokenizer():
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    text = "Call me Ishmael."
    (ex,) = tokenize_dataset([{"text": text}], tok)
    plain = tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == [tok.bos_token_id, *plain, tok.eos_token_id]
    (pc,) = tokenize_dataset([{"prompt": "Question: Who?", "completion": " Ishmael."}], tok)
    assert pc["input_ids"][0] == tok.bos_token_id and pc["labels"][0] == IGNORE
    assert tok.decode(_supervised(pc)) == " Ishmael.<eos>"


def test_prompt_completion_masks_prompt(tokenizer):
    prompt, completion = "Question: Where was the author born? Answer:", " She was born in Paris."
    (ex,) = tokenize_dataset([{"prompt": prompt, "completion": completion}], tokenizer)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    full = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
    assert ex["input_ids"] == full
    assert ex["labels"] == [IGNORE] * n_prompt + full[n_prompt:]
    assert tokenizer.decode(_supervised(ex)) == completion + tokenizer.eos_token


def test_prompt_completion_full_loss(tokenizer):
    (ex,) = tokenize_dataset(
        [{"prompt": "Question: When?", "completion": " In 1970."}], tokenizer, completion_only_loss=False
    )
    assert ex["labels"] == ex["input_ids"]


def test_prompt_completion_no_double_eos(tokenizer):
    (ex,) = tokenize_dataset([{"prompt": "Q:", "completion": " A<eos>"}], tokenizer)
    assert ex["input_ids"].count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("turns", ["all", "last"])
def test_messages_assistant_masks(tokenizer, turns):
    (ex,) = tokenize_dataset([{"messages": MESSAGES}], tokenizer, assistant_turns=turns)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    contents = [m["content"] for m in MESSAGES if m["role"] == "assistant"]
    spans = _assistant_char_spans(tokenizer, text, contents)
    if turns == "last":
        spans = spans[-1:]
    ids, mask = _expected_mask_from_chars(tokenizer, text, spans)
    assert ex["input_ids"] == ids
    assert ex["labels"] == [t if m else IGNORE for t, m in zip(ids, mask)]
    expected_text = "".join(c + "<eos>" for c in (contents if turns == "all" else contents[-1:]))
    assert tokenizer.decode(_supervised(ex)) == expected_text


def test_messages_full_loss_and_no_assistant(tokenizer):
    (ex,) = tokenize_dataset([{"messages": MESSAGES}], tokenizer, completion_only_loss=False)
    assert ex["labels"] == ex["input_ids"]
    with pytest.raises(ValueError, match=r"forget example 0 has no assistant turn"):
        tokenize_dataset([{"messages": MESSAGES[:1]}], tokenizer)


def test_conversational_prompt_completion(tokenizer):
    (ex,) = tokenize_dataset([{"prompt": MESSAGES[:1], "completion": MESSAGES[1:2]}], tokenizer)
    text = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False)
    spans = _assistant_char_spans(tokenizer, text, [MESSAGES[1]["content"]])
    ids, mask = _expected_mask_from_chars(tokenizer, text, spans)
    assert ex["input_ids"] == ids
    assert ex["labels"] == [t if m else IGNORE for t, m in zip(ids, mask)]


def test_conversational_needs_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"retain dataset is conversational .* no chat template"):
        tokenize_dataset([{"messages": MESSAGES}], tok, name="retain")


def test_pretokenized(tokenizer):
    data = [
        {"input_ids": [5, 6, 7, 8]},
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8]},
        {"input_ids": [0, 0, 5, 6, 7], "labels": [IGNORE, IGNORE, IGNORE, 6, 7], "attention_mask": [0, 0, 1, 1, 1]},
    ]
    out = tokenize_dataset(data, tokenizer)
    assert out[0] == {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}  # no EOS added to pre-tokenized data
    assert out[1] == {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8]}
    assert out[2] == {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}
    with pytest.raises(ValueError, match=r"'labels' has 2 entries but 'input_ids' has 3"):
        tokenize_dataset([{"input_ids": [1, 2, 3], "labels": [1, 2]}], tokenizer)


def test_hf_dataset_same_as_list(tokenizer):
    rows = [{"prompt": "Question: When?", "completion": " In 1970."}, {"prompt": "Q:", "completion": " Paris."}]
    assert tokenize_dataset(Dataset.from_list(rows), tokenizer) == tokenize_dataset(rows, tokenizer)


def test_truncation(tokenizer):
    (ex,) = tokenize_dataset(
        [{"text": "It was the best of times, it was the worst of times."}], tokenizer, max_length=5
    )
    full = tokenizer("It was the best of times, it was the worst of times.")["input_ids"]
    assert ex["input_ids"] == full[:5] and ex["labels"] == full[:5]


def test_all_labels_masked_after_truncation(tokenizer):
    rows = [
        {"prompt": "Q:", "completion": " A."},
        {"prompt": "Question: Where was the author born? Answer:", "completion": " Paris."},
    ]
    with pytest.raises(
        ValueError,
        match=r"forget example 1 has no supervised token left after truncation to max_length=6.*Increase `max_length`",
    ):
        tokenize_dataset(rows, tokenizer, max_length=6)


def test_empty_dataset_names_it(tokenizer):
    with pytest.raises(ValueError, match=r"The retain dataset is empty"):
        tokenize_dataset([], tokenizer, name="retain")
    with pytest.raises(ValueError, match=r"The forget dataset is empty"):
        tokenize_dataset(Dataset.from_dict({"text": []}), tokenizer, name="forget")


def test_unrecognised_columns(tokenizer):
    with pytest.raises(
        ValueError, match=r"forget dataset has no recognised columns \(found: \['answer', 'question'\]\)"
    ) as err:
        tokenize_dataset([{"question": "q", "answer": "a"}], tokenizer)
    for fragment in ("'input_ids'", "'messages'", "'prompt' and 'completion' strings", "'text' string"):
        assert fragment in str(err.value)


def test_wrong_value_types(tokenizer):
    with pytest.raises(TypeError, match=r"column 'text' must be a string"):
        tokenize_dataset([{"text": 3}], tokenizer)


def test_ensure_pad_token(caplog):
    tok = tiny_tokenizer(pad_token=False)
    assert tok.pad_token_id is None
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.trainer.formats"):
        pad = ensure_pad_token(tok)
    assert pad == tok.eos_token_id == tok.pad_token_id
    assert "no pad token" in caplog.text
    assert ensure_pad_token(tiny_tokenizer()) == 0


# ---------------------------------------------------------------------------------------------------------------
# IDK
# ---------------------------------------------------------------------------------------------------------------


def test_idk_variants(tokenizer):
    answers = ["No idea.", "I don't know."]
    rows = [
        {"prompt": "Question: Where was she born? Answer:", "completion": " Paris."},
        {"messages": None},
    ][:1]
    variants = tokenize_idk_dataset(rows, tokenizer, answers)
    assert len(variants) == 1 and len(variants[0]) == 2
    for answer, ex in zip(answers, variants[0]):
        assert tokenizer.decode(_supervised(ex)) == " " + answer + "<eos>"
        assert tokenizer.decode(ex["input_ids"]).startswith("Question: Where was she born? Answer:")
    conv = tokenize_idk_dataset([{"messages": MESSAGES}], tokenizer, answers)
    for answer, ex in zip(answers, conv[0]):
        assert tokenizer.decode(_supervised(ex)) == answer + "<eos>"
        # the question is everything before the last assistant turn
        assert tokenizer.decode(ex["input_ids"]).startswith("<|user|>Where was the author born?<eos><|assistant|> She")
    assert len(tokenize_idk_dataset(rows, tokenizer)[0]) == len(DEFAULT_IDK_ANSWERS) >= 20


def test_idk_needs_questions(tokenizer):
    with pytest.raises(ValueError, match=r"forget_loss='idk' needs a question.*format 'language_modeling'"):
        tokenize_idk_dataset([{"text": "Jane Doe was born in Paris."}], tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------------------------------


def _examples(n, offset=0):
    return [{"input_ids": [offset + i, 3, 4], "labels": [offset + i, 3, 4]} for i in range(n)]


def _retain_mapping(ds):
    return [ds.retain_index(i) for i in range(len(ds))]


def test_random_pairing_seeded_and_redrawn_per_epoch():
    forget, retain = _examples(50), _examples(40, offset=100)
    a = PairedUnlearningDataset(forget, retain, pairing="random", seed=3)
    b = PairedUnlearningDataset(forget, retain, pairing="random", seed=3)
    c = PairedUnlearningDataset(forget, retain, pairing="random", seed=4)
    epoch0 = _retain_mapping(a)
    assert epoch0 == _retain_mapping(b)
    assert epoch0 != _retain_mapping(c)
    assert all(0 <= j < 40 for j in epoch0)
    assert len(set(epoch0)) > 20  # actually random, not a constant
    a.set_epoch(1)
    epoch1 = _retain_mapping(a)
    assert epoch1 != epoch0
    a.set_epoch(0)
    assert _retain_mapping(a) == epoch0  # deterministic per (seed, epoch)
    item = a[7]
    assert item["forget_input_ids"] == forget[7]["input_ids"]
    assert item["retain_input_ids"] == retain[epoch0[7]]["input_ids"]
    assert item["retain_labels"] == retain[epoch0[7]]["labels"]


def test_cycle_pairing():
    ds = PairedUnlearningDataset(_examples(4), _examples(3, offset=100), pairing="cycle")
    assert _retain_mapping(ds) == [0, 1, 2, 0]
    ds.set_epoch(1)
    assert _retain_mapping(ds) == [1, 2, 0, 1]  # (epoch * len(forget) + i) % len(retain)
    assert ds[0]["retain_input_ids"] == [101, 3, 4]


def test_pairing_without_retain_and_with_idk():
    idk = [[{"input_ids": [i, 9, k], "labels": [IGNORE, 9, k]} for k in range(5)] for i in range(6)]
    ds = PairedUnlearningDataset(_examples(6), None, idk=idk, seed=1)
    item = ds[2]
    assert set(item) == {"forget_input_ids", "forget_labels", "idk_input_ids", "idk_labels"}
    choices = [ds.idk_index(i) for i in range(6)]
    assert choices == [PairedUnlearningDataset(_examples(6), None, idk=idk, seed=1).idk_index(i) for i in range(6)]
    assert item["idk_input_ids"] == [2, 9, choices[2]]


def test_pairing_errors():
    with pytest.raises(ValueError, match=r"forget dataset is empty"):
        PairedUnlearningDataset([], _examples(2))
    with pytest.raises(ValueError, match=r"retain dataset is empty"):
        PairedUnlearningDataset(_examples(2), [])
    with pytest.raises(ValueError, match=r"`pairing` must be 'random' or 'cycle'"):
        PairedUnlearningDataset(_examples(2), _examples(2), pairing="zip")


# ---------------------------------------------------------------------------------------------------------------
# collators
# ---------------------------------------------------------------------------------------------------------------


def test_unlearning_collator_pads_parts_separately():
    features = [
        {
            "forget_input_ids": [1, 2, 3],
            "forget_labels": [IGNORE, 2, 3],
            "retain_input_ids": [4],
            "retain_labels": [4],
        },
        {"forget_input_ids": [5], "forget_labels": [5], "retain_input_ids": [6, 7], "retain_labels": [IGNORE, 7]},
    ]
    batch = UnlearningDataCollator(pad_token_id=9)(features)
    assert batch["forget_input_ids"].tolist() == [[1, 2, 3], [5, 9, 9]]
    assert batch["forget_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["forget_labels"].tolist() == [[IGNORE, 2, 3], [5, IGNORE, IGNORE]]
    assert batch["retain_input_ids"].tolist() == [[4, 9], [6, 7]]
    assert batch["retain_attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert batch["retain_labels"].tolist() == [[4, IGNORE], [IGNORE, 7]]
    assert all(v.dtype == torch.long for v in batch.values())
    padded = UnlearningDataCollator(pad_token_id=0, pad_to_multiple_of=4)(features)
    assert padded["forget_input_ids"].shape == (2, 4) and padded["retain_input_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match=r"expects items with 'forget_input_ids'"):
        UnlearningDataCollator(0)([{"input_ids": [1]}])


def test_causal_lm_collator():
    batch = collate_causal_lm([{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert CausalLMCollator(0)([{"input_ids": [1, 2]}])["labels"].tolist() == [[1, 2]]
