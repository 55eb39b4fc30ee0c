"""The registry of data-driven inits is the one place their names live: an entry is all a new init needs."""

from __future__ import annotations

import json
import typing

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peft_unlearn  # noqa: F401  (registers the data-driven inits with PEFT)
from peft_unlearn.commands.train import TrainArguments
from peft_unlearn.fila import (
    DataDrivenInitPendingWarning,
    FilaLoraConfig,
    FilaNotInitializedWarning,
    has_data_driven_adapter,
    initialize_adapter_weights,
    is_fila_model,
    pending_data_driven_adapters,
    pending_fila_adapters,
)
from peft_unlearn.fila.registry import INITS, DataDrivenInit, get_init, init_name, inits_with_settings
from peft_unlearn.fila.state import check_target
from peft_unlearn.testing import tiny_causal_lm
from peft_unlearn.trainer.model_card import build_model_card

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def toy_init(monkeypatch):
    """A new init registered with one entry (it reuses FILA's initialiser and trainer options)."""
    fila = INITS["fila"]
    entry = DataDrivenInit(
        name="toy",
        initializer=fila.initializer,
        trainer_options=fila.trainer_options,
        summary="a test init",
        paper="nowhere",
    )
    monkeypatch.setitem(INITS, "toy", entry)
    return entry


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (2, 6), generator=gen)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def test_registry_names_and_lookup():
    assert tuple(INITS) == ("fila", "vila", "rila")
    assert init_name("ViLa") == "vila" and init_name(True) is None and init_name("pissa") is None
    assert inits_with_settings("fila_config") == ("fila", "vila")
    assert inits_with_settings("rila_config") == ("rila",)
    with pytest.raises(ValueError, match=r"'nope' is not a data-driven LoRA init; expected one of \['fila'"):
        get_init("nope")


def test_cli_init_choices_are_the_registry():
    hints = typing.get_type_hints(TrainArguments)
    assert typing.get_args(hints["init"]) == ("default", *INITS, "none")
    help_text = TrainArguments.__dataclass_fields__["init"].metadata["help"]
    assert all(f"'{name}' ({entry.summary}" in help_text for name, entry in INITS.items())


@pytest.mark.parametrize("init", ["fila", "vila", "rila"])
def test_model_card_names_the_adapters_init(init):
    card = build_model_card(init=init)
    entry = get_init(init)
    assert f"\n- {init}\n" in card  # the tag
    assert f"LoRA initialisation: {init.upper()} ({entry.summary}, {entry.paper}" in card
    other = {"fila", "vila", "rila"} - {init}
    assert not any(f"\n- {name}\n" in card for name in other)
    assert build_model_card(fila=True) == build_model_card(init="fila")  # the deprecated spelling
    assert "LoRA initialisation" not in build_model_card()


def test_fila_preset_takes_the_inits_that_end_in_the_weighted_svd():
    assert FilaLoraConfig(init_lora_weights="VILA", target_modules=TARGETS).init_lora_weights == "vila"
    with pytest.raises(ValueError, match=r"init_lora_weights='fila' or 'vila', got 'rila'.*RilaLoraConfig"):
        FilaLoraConfig(init_lora_weights="rila", target_modules=TARGETS)


def test_a_new_entry_is_all_an_init_needs(toy_init, tmp_path):
    """Injection (pending + target check), dispatch, model checks and the portable save all read the registry."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="toy"))
    assert has_data_driven_adapter(model) and pending_data_driven_adapters(model) == ["default"]
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    info = initialize_adapter_weights(model, _batches(), _batches(), show_progress=False)
    assert info["num_layers"] == 2 * 2 and pending_data_driven_adapters(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)  # unchanged at init
    assert model.peft_config["default"].init_lora_weights == "toy"
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 4  # the portable rank-2r plain LoRA
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_a_new_init_refuses_unsupported_targets_before_injection(toy_init):
    base = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=r"init_lora_weights='toy' supports nn.Linear.*embed_tokens.*left unchanged"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights="toy"))
    assert not any("lora" in name for name, _ in base.named_modules())


def test_one_target_check_before_and_after_injection():
    base = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=r"matches emb \(Embedding\).*left unchanged"):
        check_target(base.get_input_embeddings(), "fila", "emb")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert check_target(layer, "fila") is layer.get_base_layer()


def test_deprecated_names_still_work_and_warn():
    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="vila"))
    with pytest.warns(DeprecationWarning, match="use pending_data_driven_adapters"):
        assert pending_fila_adapters(model) == ["default"]
    with pytest.warns(DeprecationWarning, match="use has_data_driven_adapter"):
        assert is_fila_model(model)
    assert FilaNotInitializedWarning is DataDrivenInitPendingWarning
