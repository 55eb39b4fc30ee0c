"""RILA (ReGLU) init: float64 brute force, unchanged output at init, portable save loaded by plain PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peft_unlearn  # noqa: F401  (registers the data-driven inits)
from peft_unlearn.fila import (
    DATA_DRIVEN_INITS,
    RilaConfig,
    estimate_output_covariance,
    initialize_adapter_weights,
    pending_data_driven_adapters,
    rila_init_layer,
)
from peft_unlearn.fila.offset import get_offset
from peft_unlearn.testing import tiny_causal_lm

TARGETS = ["q_proj", "up_proj"]


def _batches(seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(3, 50, (3, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="rila"))


def _brute_force_covariance(model, batches, name: str) -> torch.Tensor:
    """sum over sequences of (masked sum of outputs)(...)^T / #sequences, in float64 from the base layer."""
    module = dict(model.base_model.model.named_modules())[name]
    captured = []
    handle = module.register_forward_hook(lambda m, a, o: captured.append(o.detach().double()))
    with torch.no_grad(), model.disable_adapter():
        for batch in batches:
            captured.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            pooled = (captured[0] * batch["attention_mask"][..., None].double()).sum(1)
            yield_ = pooled.T @ pooled
            if name not in _brute_force_covariance.acc:
                _brute_force_covariance.acc[name] = yield_
            else:
                _brute_force_covariance.acc[name] += yield_
    handle.remove()
    return _brute_force_covariance.acc.pop(name) / sum(b["input_ids"].shape[0] for b in batches)


_brute_force_covariance.acc = {}


def test_rila_is_registered() -> None:
    assert "rila" in DATA_DRIVEN_INITS
    assert pending_data_driven_adapters(_model()) == ["default"]


def test_covariance_and_factors_match_float64_brute_force() -> None:
    model = _model()
    forget, retain = _batches(1), _batches(2)
    stats = estimate_output_covariance(model, forget, retain, show_progress=False)
    name = "model.layers.0.self_attn.q_proj"
    cov_f, cov_r = _brute_force_covariance(model, forget, name), _brute_force_covariance(model, retain, name)
    torch.testing.assert_close(stats.forget_covariance(name).double(), cov_f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.retain_covariance(name).double(), cov_r, rtol=1e-4, atol=1e-5)

    beta = 0.8
    evals, evecs = torch.linalg.eigh((1 - beta) * cov_f - beta * cov_r)
    q = evecs[:, -2:].flip(-1)
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().double()
    lora_a, lora_b = rila_init_layer(weight, cov_f, cov_r, 2, config=RilaConfig(beta=beta), lora_dtype=torch.float64)
    signs = torch.sign((lora_b * q).sum(0))  # eigenvectors are defined up to sign
    torch.testing.assert_close(lora_b * signs, q, rtol=0, atol=1e-8)
    torch.testing.assert_close(lora_a, lora_b.T @ weight, rtol=0, atol=1e-10)


def test_output_unchanged_at_init_and_base_untouched() -> None:
    model = _model()
    batch = _batches(3)[0]
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora" not in k}
    with torch.no_grad(), model.disable_adapter():
        reference = model(input_ids=batch["input_ids"]).logits
    info = initialize_adapter_weights(model, _batches(1), _batches(2), show_progress=False)
    assert info["num_layers"] == 4 and pending_data_driven_adapters(model) == []
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert get_offset(layer, "default") is not None
    assert layer.lora_B["default"].weight.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, reference, rtol=1e-5, atol=1e-5)
    after = model.get_base_model().state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_portable_save_loads_with_plain_peft(tmp_path) -> None:
    model = _model()
    initialize_adapter_weights(model, _batches(1), _batches(2), show_progress=False)
    with torch.no_grad():  # a "trained" adapter: move B away from its initial value
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.01)
    batch = _batches(3)[0]
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path)
    assert reloaded.peft_config["default"].init_lora_weights is True
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"beta": 1.5}, "beta"), ({"max_samples": 0}, "max_samples"), ({"pooling": "mean"}, "pooling")],
)
def test_bad_rila_config(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        RilaConfig(**kwargs)


def test_low_memory_modes_give_identical_statistics() -> None:
    model = _model()
    forget, retain = _batches(1), _batches(2)
    plain = estimate_output_covariance(model, forget, retain, show_progress=False)
    grouped = estimate_output_covariance(
        model, forget, retain, show_progress=False, accumulator_device="cpu", layers_per_pass=1
    )
    for name in plain.names:
        torch.testing.assert_close(plain.forget[name], grouped.forget[name])
        torch.testing.assert_close(plain.retain[name], grouped.retain[name])
