"""FILA registration with stock PEFT: hooks, pending state, config validation and error paths."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel

import peft_unlearn  # noqa: F401  (registers FILA)
from peft_unlearn.fila import (
    DataDrivenInitPendingWarning,
    FilaConfig,
    FilaLoraConfig,
    initialize_fila_weights,
    pending_data_driven_adapters,
)
from peft_unlearn.fila.registration import is_registered, register_fila, unregister_fila
from peft_unlearn.testing import random_lm_batches, tiny_causal_lm
from tests.helpers import run_python

TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_fc", "c_proj"], "gemma3": "all-linear"}


def _batches(vocab: int, n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return random_lm_batches(n, seed=seed, vocab_size=vocab)


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_registered_on_import():
    assert is_registered()
    for cls, attr in ((LoraLayer, "reset_lora_parameters"), (LoraModel, "_check_new_adapter_config")):
        assert hasattr(cls.__dict__[attr], "_peft_unlearn_fila_wrapper")


def test_double_registration_is_idempotent():
    before = LoraLayer.__dict__["reset_lora_parameters"]
    assert register_fila() is False
    assert register_fila() is False
    assert LoraLayer.__dict__["reset_lora_parameters"] is before
    original = before._peft_unlearn_fila_wrapper
    assert not hasattr(original, "_peft_unlearn_fila_wrapper")  # never a wrapper of a wrapper
    try:
        assert unregister_fila() is True
        assert LoraLayer.__dict__["reset_lora_parameters"] is original
        assert not is_registered()
        assert unregister_fila() is False
    finally:
        assert register_fila() is True
    assert is_registered()


def test_stock_peft_rejects_fila_without_registration(tiny_llama):
    unregister_fila()
    try:
        with pytest.raises(ValueError, match="Unknown initialization"):
            get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"))
    finally:
        register_fila()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_get_peft_model_marks_pending_and_keeps_outputs(arch, tokenizer):
    model = tiny_causal_lm(arch, vocab_size=len(tokenizer))
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="fila")
    )
    assert pending_data_driven_adapters(peft_model) == ["default"]
    layers = _lora_layers(peft_model)
    assert layers
    for layer in layers:
        assert layer._fila_pending == {"default": True}
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, reference)


def test_other_inits_are_delegated(tiny_llama):
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"))
    assert pending_data_driven_adapters(peft_model) == []
    layer = _lora_layers(peft_model)[0]
    assert "_fila_pending" not in layer.__dict__
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


def test_unknown_init_still_raises(tiny_llama):
    with pytest.raises(ValueError, match="Unknown initialization"):
        get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="nonsense"))


def test_embedding_target_rejected(tiny_llama):
    with pytest.raises(ValueError, match="nn.Linear and transformers Conv1D targets only.*Embedding"):
        get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights="fila"))


def test_conv_target_rejected():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Conv2d"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights="fila"))


def test_integer_base_weight_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model[0].weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="needs a float or bitsandbytes 4-bit/8-bit weight"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights="fila"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_bias": True}, "lora_bias"),
        ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
        ({"use_rslora": True, "rank_pattern": {"q_proj": 4}}, "use_rslora"),
        ({"use_rslora": True, "alpha_pattern": {"q_proj": 4}}, "use_rslora"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
    ],
)
def test_unsupported_options_rejected_at_get_peft_model(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):  # PEFT itself already refuses lora_bias with a string init
        config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="fila", **kwargs)
        get_peft_model(tiny_llama, config)
    with pytest.raises(ValueError, match=match):
        FilaLoraConfig(r=2, target_modules=["q_proj", "v_proj"], **kwargs)


def test_supported_variants_accepted(tiny_llama):
    # rslora without patterns and rank patterns without rslora are fine
    get_peft_model(
        tiny_llama,
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="fila", rank_pattern={"v_proj": 4}),
    )


def test_fila_lora_config_defaults_and_validation():
    config = FilaLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    assert config.init_lora_weights == "fila"
    assert config.fila_config == FilaConfig()
    assert FilaLoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=True).init_lora_weights == "fila"
    from_dict = FilaLoraConfig(r=4, target_modules=["q_proj"], fila_config={"seed": 7, "exact_svd": False})
    assert from_dict.fila_config == FilaConfig(seed=7, exact_svd=False)
    with pytest.raises(ValueError, match="init_lora_weights='fila'"):
        FilaLoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="unknown keys"):
        FilaLoraConfig(r=4, target_modules=["q_proj"], fila_config={"sed": 1})
    with pytest.raises(TypeError, match="fila_config"):
        FilaLoraConfig(r=4, target_modules=["q_proj"], fila_config=3)
    # the dict round trip keeps the sub-config
    assert config.to_dict()["fila_config"]["seed"] == 42


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"niter": -1}, "niter"),
        ({"seed": 1.5}, "seed"),
        ({"eps": 0.0}, "eps"),
        ({"row_weight_floor": 1.5}, "row_weight_floor"),
        ({"exact_svd": "sometimes"}, "exact_svd"),
        ({"exact_svd_max_dim": "big"}, "exact_svd_max_dim"),
        ({"fp32_accumulation": 1}, "fp32_accumulation"),
    ],
)
def test_fila_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FilaConfig(**kwargs)


def test_fila_lora_config_settings_reach_the_init(tokenizer):
    def init_a(seed):
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
        config = FilaLoraConfig(r=2, target_modules=["q_proj"], fila_config={"seed": seed, "exact_svd": False})
        peft_model = get_peft_model(model, config)
        initialize_fila_weights(peft_model, _batches(len(tokenizer)), show_progress=False)
        return _lora_layers(peft_model)[0].lora_A["default"].weight.detach().clone()

    first, again, other = init_a(1), init_a(1), init_a(2)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_pending_forward_warns_in_training_only(tokenizer):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"))
    batch = _batches(len(tokenizer), n=1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataDrivenInitPendingWarning)
        peft_model.eval()
        peft_model(**batch)  # eval mode: no warning
        peft_model.train()
        with torch.no_grad():
            peft_model(**batch)  # no grad: no warning
        with peft_model.disable_adapter():
            peft_model(**batch)  # adapters disabled: no warning
    with pytest.warns(DataDrivenInitPendingWarning, match="initialize_adapter_weights"):
        peft_model(**batch)
    with warnings.catch_warnings():  # once per adapter
        warnings.simplefilter("error", DataDrivenInitPendingWarning)
        peft_model(**batch)
    initialize_fila_weights(peft_model, [batch], show_progress=False)
    assert pending_data_driven_adapters(peft_model) == []
    for layer in _lora_layers(peft_model):
        assert "_fila_pending_hook" not in layer.__dict__
        assert len(layer._forward_pre_hooks) == 0


def test_add_adapter_with_fila_is_validated(tiny_llama):
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="use_dora"):
        peft_model.add_adapter(
            "f", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila", use_dora=True)
        )
    peft_model.add_adapter("f", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"))
    assert pending_data_driven_adapters(peft_model) == ["f"]


# ----------------------------------------------------------------------------------------------------------------
# gaps closed: targets checked before any swap, mixed models, AdaLoRA, tied lm_head, a PEFT without the hooks
# ----------------------------------------------------------------------------------------------------------------


def test_unsupported_target_rejected_before_any_layer_is_swapped(tiny_llama):
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights="fila")
    with pytest.raises(ValueError, match="matches model.embed_tokens \\(Embedding\\).*left unchanged"):
        get_peft_model(tiny_llama, config)
    assert not any(isinstance(m, BaseTunerLayer) for m in tiny_llama.modules())  # q_proj was not swapped first


def test_mixed_model_validates_fila_configs(tiny_llama):
    with pytest.raises(ValueError, match="use_dora"):
        get_peft_model(
            tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila", use_dora=True), mixed=True
        )
    mixed = get_peft_model(
        tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"), mixed=True
    )
    assert all(layer._fila_pending == {"default": True} for layer in _lora_layers(mixed))


def test_adalora_with_fila_is_an_error(tiny_llama):
    from peft import AdaLoraConfig

    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"], init_lora_weights="fila")
    with pytest.raises(ValueError, match="not supported by ADALORA"):
        get_peft_model(tiny_llama, config)


def test_fila_on_tied_lm_head_keeps_outputs(tokenizer):
    model = tiny_causal_lm("gpt2", vocab_size=len(tokenizer))  # GPT-2 ties lm_head to the token embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    embedding = model.transformer.wte.weight.detach().clone()
    batch = _batches(len(tokenizer), n=1, seed=3)[0]
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"]).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about targeting a tied module
        peft_model = get_peft_model(
            model, LoraConfig(r=2, target_modules=["c_attn", "lm_head"], init_lora_weights="fila")
        )
    initialize_fila_weights(peft_model, [batch], show_progress=False)
    with torch.no_grad():
        assert (peft_model(input_ids=batch["input_ids"]).logits - reference).abs().max() <= 1e-5
    assert torch.equal(peft_model.get_base_model().transformer.wte.weight, embedding)


_MISSING_METHOD = """
import warnings
from peft.tuners.lora.model import LoraModel
del LoraModel._check_new_adapter_config  # simulate a PEFT that moved a private method
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft_unlearn
    from peft_unlearn import UnlearningConfig, UnlearningTrainer, inverted_hinge_loss
    from peft_unlearn.fila.registration import is_registered, register_fila
    assert register_fila() is False
messages = [str(w.message) for w in caught if w.category.__name__ == "FilaUnavailableWarning"]
assert len(messages) == 1 and "FILA/VILA are disabled" in messages[0], messages
assert not is_registered()
from peft.tuners.lora.layer import LoraLayer
assert not hasattr(LoraLayer.__dict__["reset_lora_parameters"], "_peft_unlearn_fila_wrapper")  # all or nothing
import torch
print(float(inverted_hinge_loss(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 2]]))))
"""


def test_import_never_fails_when_peft_lacks_a_hooked_method(tmp_path):
    proc = run_python(["-c", _MISSING_METHOD], cwd=tmp_path)
    assert proc.stdout.strip()  # the losses still work
