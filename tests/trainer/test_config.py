"""Tests of UnlearningConfig: defaults, validation, CLI parsing and upcasting."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from peft_unlearn import losses
from peft_unlearn.trainer.unlearning_config import FORGET_LOSSES, RETAIN_LOSSES, UnlearningConfig


def _cfg(**kwargs) -> UnlearningConfig:
    return UnlearningConfig(output_dir="unused", report_to="none", **kwargs)


def test_defaults():
    args = _cfg()
    assert args.forget_loss == "inverted_hinge"
    assert args.retain_loss == "nll"
    assert (args.forget_weight, args.retain_weight) == (1.0, 1.0)
    assert args.beta is None  # only NPO/SimNPO use beta
    assert args.max_length == 512
    assert args.completion_only_loss is True
    assert args.retain_pairing == "random"
    assert args.kl_mask == "labels"
    assert args.idk_answers is None
    assert args.eval_el_n == [10]
    assert (args.fila_batch_size, args.fila_max_batches, args.fila_cache, args.fila_seed) == (4, None, None, None)
    assert args.remove_unused_columns is False
    assert args.logging_steps == 10
    assert args.learning_rate == 1e-3  # the sound LoRA rate of the init benchmark, not TrainingArguments' 5e-5
    assert TrainingArguments(output_dir="unused").learning_rate != args.learning_rate


def test_loss_names_match_losses_module():
    assert FORGET_LOSSES == losses.FORGET_LOSSES
    assert RETAIN_LOSSES == losses.RETAIN_LOSSES


def test_every_field_documented():
    own = {f.name for f in dataclasses.fields(UnlearningConfig)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    assert own, "no unlearning-specific field found"
    doc = UnlearningConfig.__doc__
    for f in dataclasses.fields(UnlearningConfig):
        if f.name in own:
            assert f.metadata.get("help"), f"field {f.name} has no help"
            assert f"        {f.name}: " in doc, f"field {f.name} missing from the Args of the class docstring"


@pytest.mark.parametrize(("loss", "beta"), [("npo", 0.1), ("simnpo", 4.5), ("gradient_ascent", None)])
def test_beta_default_per_loss(loss, beta):
    assert _cfg(forget_loss=loss).beta == beta


def test_explicit_beta_kept():
    assert _cfg(forget_loss="npo", beta=0.5).beta == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"forget_loss": "ga"}, r"`forget_loss` must be one of .*'inverted_hinge'.*'idk'.*got 'ga'"),
        ({"retain_loss": "mse"}, r"`retain_loss` must be one of 'nll', 'kl', 'rmu', None, got 'mse'"),
        ({"retain_pairing": "shuffle"}, r"`retain_pairing` must be one of 'random', 'cycle'"),
        ({"kl_mask": "all"}, r"`kl_mask` must be one of 'labels', 'none'"),
        ({"assistant_turns": "first"}, r"`assistant_turns` must be one of 'all', 'last'"),
        ({"forget_weight": -1.0}, r"`forget_weight` must be a number >= 0, got -1.0"),
        ({"retain_weight": -0.5}, r"`retain_weight` must be a number >= 0"),
        ({"forget_loss": "npo", "beta": 0.0}, r"`beta` must be > 0"),
        ({"forget_loss": "simnpo", "beta": -2.0}, r"`beta` must be > 0"),
        ({"max_length": 1}, r"`max_length` must be an integer >= 2"),
        ({"idk_answers": []}, r"`idk_answers` is empty"),
        ({"idk_answers": "I don't know"}, r"`idk_answers` must be a list of non-empty strings"),
        ({"idk_answers": ["ok", ""]}, r"`idk_answers` must be a list of non-empty strings"),
        ({"eval_el_n": [0]}, r"`eval_el_n` must be a list of integers >= 1"),
        ({"eval_el_prefix_stride": 0}, r"`eval_el_prefix_stride` must be an integer >= 1"),
        ({"fila_batch_size": 0}, r"`fila_batch_size` must be an integer >= 1"),
        ({"fila_max_batches": 0}, r"`fila_max_batches` must be an integer >= 1 or None"),
    ],
)
def test_invalid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kwargs)


def test_int_el_n_and_none_string():
    args = _cfg(eval_el_n=5, retain_loss="None")
    assert args.eval_el_n == [5]
    assert args.retain_loss is None


def test_activation_checkpointing_non_reentrant_default():
    args = _cfg(activation_checkpointing=True)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert _cfg(
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}
    ).activation_checkpointing_kwargs == {"use_reentrant": True}


def test_hf_argument_parser():
    parser = HfArgumentParser(UnlearningConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "unused",
            "--forget_loss",
            "simnpo",
            "--retain_loss",
            "None",
            "--eval_el_n",
            "5",
            "10",
            "--idk_answers",
            "No idea.",
            "Unsure.",
            "--report_to",
            "none",
        ]
    )
    assert args.forget_loss == "simnpo" and args.beta == 4.5
    assert args.retain_loss is None
    assert args.eval_el_n == [5, 10]
    assert args.idk_answers == ["No idea.", "Unsure."]
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "unused", "--forget_loss", "bogus"])


def test_upcast_from_training_arguments():
    base = TrainingArguments(output_dir="unused", report_to="none", learning_rate=3e-4, seed=7)
    dict_args = base.to_dict()
    dict_args["hub_token"] = base.hub_token
    args = UnlearningConfig(**dict_args)
    assert args.learning_rate == 3e-4 and args.seed == 7
    assert args.forget_loss == "inverted_hinge"
