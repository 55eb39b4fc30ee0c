"""VILA importance against a brute-force per-batch computation; the init keeps the output and saves portably."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

import peft_unlearn
from peft_unlearn import UnlearningTrainer
from peft_unlearn.fila import (
    FisherStatistics,
    estimate_vila_importance,
    fila_init_layer,
    initialize_fila_weights,
    initialize_vila_weights,
    pending_data_driven_adapters,
)
from peft_unlearn.fila.state import iter_lora_layers
from peft_unlearn.fila.vila import vila_layer_importance
from peft_unlearn.testing import TINY_CORPUS, random_lm_batches, tiny_causal_lm

from ..helpers import backward_token_nll, quick_cpu_config, run_python
from .test_saving import PLAIN_PEFT_SCRIPT

VOCAB = 320
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def _batches(n: int, seed: int, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    return random_lm_batches(n, seed=seed, vocab_size=VOCAB, batch_size=batch_size)


def _peft(arch: str = "llama", dtype=torch.float32, init=True, seed: int = 3, r: int = 2):
    base = tiny_causal_lm(arch, vocab_size=VOCAB, dtype=dtype, seed=seed)
    return get_peft_model(
        base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[arch], init_lora_weights=init)
    )


def _factors(model, adapter="default"):
    return [
        (name, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
        for name, layer in iter_lora_layers(model, adapter)
    ]


def _brute_force(model, forget, retain, sigma=0.05, seed=42):
    """Independent computation: own shifted cross-entropy, .backward(), explicit per-batch gradient lists."""
    factors = _factors(model)
    saved = [(a.detach().clone(), b.detach().clone()) for _, a, b in factors]
    gen = torch.Generator().manual_seed(seed)  # documented order: A then B of each layer, in model order
    with torch.no_grad():
        for _, a, b in factors:
            for p in (a, b):
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float32) * sigma).to(p.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    for _, a, b in factors:
        a.requires_grad_(True), b.requires_grad_(True)
    model.eval()
    result = {}
    for role, loader in (("f", forget), ("r", retain)):
        per_batch = []  # (n, {name: (g_A, g_B)})
        for batch in loader:
            n = backward_token_nll(model, batch)
            per_batch.append((n, {name: (a.grad.double().clone(), b.grad.double().clone()) for name, a, b in factors}))
        total = sum(n for n, _ in per_batch)
        full = {}
        for name, _, _ in factors:
            variances = []
            for k in (0, 1):
                mean = sum(n * g[name][k] for n, g in per_batch) / total
                second = sum(n * g[name][k] ** 2 for n, g in per_batch) / total
                variances.append(torch.clamp(second - mean**2, min=0))
            full[name] = variances[1] @ variances[0]
        result[role] = (full, total)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for (_, a, b), (a0, b0) in zip(factors, saved):
            a.copy_(a0), b.copy_(b0)
    return result


def test_layer_importance_formula():
    gen = torch.Generator().manual_seed(0)
    grads_a = [torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    grads_b = [torch.randn(4, 2, generator=gen, dtype=torch.float64) for _ in range(3)]
    ns = [3, 5, 2]
    total = sum(ns)

    def var(gs):
        mean = sum(n * g for n, g in zip(ns, gs)) / total
        return (sum(n * g * g for n, g in zip(ns, gs)) / total - mean * mean).clamp_min(0)

    got = vila_layer_importance(
        sum(n * g for n, g in zip(ns, grads_a)),
        sum(n * g * g for n, g in zip(ns, grads_a)),
        sum(n * g for n, g in zip(ns, grads_b)),
        sum(n * g * g for n, g in zip(ns, grads_b)),
        total,
    )
    assert got.shape == (4, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), var(grads_b) @ var(grads_a), rtol=1e-5, atol=1e-7)
    # identical gradients in every batch: zero variance (the mean gradient is not importance)
    same = vila_layer_importance(3 * grads_a[0], 3 * grads_a[0] ** 2, 3 * grads_b[0], 3 * grads_b[0] ** 2, 3)
    assert same.abs().max() < 1e-6
    with pytest.raises(ValueError, match="count"):
        vila_layer_importance(grads_a[0], grads_a[0], grads_b[0], grads_b[0], 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_brute_force_float64(arch):
    model = _peft(arch, dtype=torch.float64)
    forget, retain = _batches(3, seed=1), _batches(3, seed=2)
    stats = estimate_vila_importance(model, forget, retain, show_progress=False)
    expected = _brute_force(model, forget, retain)
    assert isinstance(stats, FisherStatistics)
    assert set(stats.importance_f) == set(expected["f"][0]) and stats.num_batches == 3
    assert stats.f_count == expected["f"][1] and stats.r_count == expected["r"][1]
    base_shapes = {
        name: tuple(layer.get_base_layer().weight.shape[:: -1 if arch == "gpt2" else 1])
        for name, layer in iter_lora_layers(model, "default")
    }
    assert stats.shapes() == base_shapes  # nn.Linear layout [out, in], Conv1D transposed
    for name, ref in expected["f"][0].items():
        for role, got in (
            ("f", stats.importance_f[name] / stats.f_count),
            ("r", stats.importance_r[name] / stats.r_count),
        ):
            want = expected[role][0][name]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-14 + 1e-5 * float(want.abs().max()))
        assert ref.abs().sum() > 0
    # the relative importance is the ratio of the variances themselves (no second division by the count)
    name = next(iter(expected["f"][0]))
    rel = stats.layer_relative_importance(name, eps=1e-5).double()
    torch.testing.assert_close(rel, expected["f"][0][name] / (1e-5 + expected["r"][0][name]), rtol=1e-3, atol=1e-10)


def test_state_is_restored_and_base_weights_get_no_gradient():
    model = _peft("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.base_model.model.model.layers[0].train()  # mixed modes must survive
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.random.get_rng_state()
    seen = []
    layer = iter_lora_layers(model, "default")[0][1]
    handle = layer.register_forward_pre_hook(
        lambda mod, args: seen.append(
            (mod.get_base_layer().weight.requires_grad, mod.lora_A["default"].weight.requires_grad)
        )
    )
    estimate_vila_importance(model, _batches(2, 0), _batches(2, 1), show_progress=False)
    handle.remove()
    assert seen and all(not base and lora for base, lora in seen)  # only the factors take gradients
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_sigma_seed_and_epochs_change_the_statistics():
    forget, retain = _batches(3, 1), _batches(3, 2)
    model = _peft("llama")
    ref = estimate_vila_importance(model, forget, retain, show_progress=False)
    again = estimate_vila_importance(model, forget, retain, show_progress=False)
    other_seed = estimate_vila_importance(model, forget, retain, seed=7, show_progress=False)
    other_sigma = estimate_vila_importance(model, forget, retain, sigma=0.2, show_progress=False)
    two = estimate_vila_importance(model, forget, retain, epochs=2, show_progress=False)
    name = ref.names[0]
    assert torch.equal(ref.importance_f[name], again.importance_f[name])  # deterministic
    assert not torch.allclose(ref.importance_f[name], other_seed.importance_f[name], rtol=1e-3, atol=0)
    assert not torch.allclose(ref.importance_f[name], other_sigma.importance_f[name], rtol=1e-3, atol=0)
    # a repeated fixed batch order leaves the variance unchanged; the counts double
    assert two.f_count == 2 * ref.f_count and two.num_batches == 6
    torch.testing.assert_close(two.importance_f[name] / two.f_count, ref.importance_f[name] / ref.f_count)
    only_forget = estimate_vila_importance(model, forget, None, max_batches=2, show_progress=False)
    assert not only_forget.has_retain and only_forget.num_batches == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_keeps_the_output_and_equals_fila_with_the_same_statistics(arch):
    forget, retain = _batches(2, 1), _batches(2, 2)
    ids = _batches(1, 5)[0]["input_ids"]
    model = _peft(arch, init=True)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    info = initialize_vila_weights(model, forget, retain, show_progress=False)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - reference).abs().max() < 1e-4
    assert info["num_layers"] == len(iter_lora_layers(model, "default"))
    assert info["importance_seconds"] <= info["seconds"]
    # same statistics through the FILA entry point give the same factors
    twin = _peft(arch, init=True)
    stats = estimate_vila_importance(twin, forget, retain, show_progress=False)
    initialize_fila_weights(twin, fisher=stats, show_progress=False)
    for (_, a, b), (_, a2, b2) in zip(_factors(model), _factors(twin)):
        torch.testing.assert_close(a, a2), torch.testing.assert_close(b, b2)
    # and the factors are FILA's per-layer formula on the VILA relative importance
    plain = tiny_causal_lm(arch, vocab_size=VOCAB, seed=3)
    modules = dict(plain.named_modules())
    name, layer = iter_lora_layers(model, "default")[0]
    weight = modules[name].weight.detach()
    weight = weight.mT if arch == "gpt2" else weight
    a0, b0 = fila_init_layer(weight, stats.layer_relative_importance(name), 2, float(layer.scaling["default"]))
    torch.testing.assert_close(layer.lora_A["default"].weight, a0)
    torch.testing.assert_close(layer.lora_B["default"].weight, b0)


def test_precomputed_importance_and_cache(tmp_path):
    forget, retain = _batches(2, 1), _batches(2, 2)
    cache = tmp_path / "vila.safetensors"
    first = estimate_vila_importance(_peft(), forget, retain, cache_path=cache, show_progress=False)
    assert cache.is_file()
    loaded = estimate_vila_importance(_peft(), [], None, cache_path=cache, show_progress=False)  # no pass needed
    for name in first.names:
        assert torch.equal(first.importance_f[name], loaded.importance_f[name])
    a, b = _peft(), _peft()
    initialize_vila_weights(a, importance=first)
    initialize_vila_weights(b, importance=cache)
    for (_, a1, b1), (_, a2, b2) in zip(_factors(a), _factors(b)):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    with pytest.raises(ValueError, match="do not match"):
        estimate_vila_importance(_peft(r=3, arch="gpt2"), forget, cache_path=cache, show_progress=False)


def test_errors():
    model = _peft()
    forget = _batches(1, 0)
    with pytest.raises(ValueError, match="sigma"):
        estimate_vila_importance(model, forget, sigma=0.0)
    with pytest.raises(ValueError, match="epochs"):
        estimate_vila_importance(model, forget, epochs=0)
    with pytest.raises(ValueError, match="max_batches"):
        estimate_vila_importance(model, forget, max_batches=0)
    with pytest.raises(ValueError, match="forget_dataloader"):
        estimate_vila_importance(model, None)
    with pytest.raises(ValueError, match="adapter_name"):
        estimate_vila_importance(model, forget, adapter_name="nope")
    with pytest.raises(TypeError, match="PeftModel"):
        estimate_vila_importance(tiny_causal_lm("llama", vocab_size=VOCAB), forget)
    masked = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in forget]
    with pytest.raises(ValueError, match="no supervised tokens"):
        estimate_vila_importance(model, masked, show_progress=False)
    with pytest.raises(ValueError, match="forget_dataloader"):
        initialize_vila_weights(model)
    with pytest.raises(TypeError, match="importance"):
        initialize_vila_weights(model, importance=42)
    # nothing was lost: the adapter is still a fresh default LoRA
    assert all(float(b.detach().abs().max()) == 0 for _, _, b in _factors(model))


def test_public_exports():
    assert peft_unlearn.initialize_vila_weights is initialize_vila_weights
    assert peft_unlearn.estimate_vila_importance is estimate_vila_importance


def test_portable_save_loads_with_plain_peft(tmp_path):
    base = tiny_causal_lm("llama", vocab_size=VOCAB, seed=3)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS["llama"], init_lora_weights="vila")
    )
    assert pending_data_driven_adapters(model) == ["default"]
    initialize_vila_weights(model, _batches(2, 1), _batches(2, 2), show_progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    for batch in _batches(2, 4):
        (-model(**batch).loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ids = _batches(1, 5)[0]["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    adapter_dir = tmp_path / "portable"
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["init_lora_weights"] is True  # a plain LoRA for stock PEFT
    torch.save(ids, tmp_path / "ids.pt")
    case = {
        "base": str(base_dir),
        "adapter": str(adapter_dir),
        "ids": str(tmp_path / "ids.pt"),
        "out": str(tmp_path / "out.pt"),
    }
    script = tmp_path / "plain_peft_check.py"
    script.write_text(PLAIN_PEFT_SCRIPT)
    run_python([script, json.dumps([case])], cwd=tmp_path, expect="PLAIN_PEFT_OK")
    assert (torch.load(tmp_path / "out.pt") - logits).abs().max() <= 1e-4


def test_trainer_initialises_a_vila_adapter_automatically(tmp_path, tokenizer):
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0)
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights="vila")
    )
    ids = torch.tensor([tokenizer("Jane Doe was born in Paris in 1970.")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    seen = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                seen["logits"] = model(input_ids=ids).logits
            seen["pending"] = pending_data_driven_adapters(model)

    args = quick_cpu_config(tmp_path, max_steps=2, seed=0)
    forget = [{"text": t} for t in TINY_CORPUS[:4]]
    retain = [{"text": t} for t in TINY_CORPUS[4:8]]
    trainer = UnlearningTrainer(
        model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer, callbacks=[AtStart()]
    )
    trainer.train()
    assert seen["pending"] == []  # the VILA weights were computed before the first step
    assert (seen["logits"] - before).abs().max() < 1e-4  # and the model at step 0 is the original model
    stats = trainer.fila_stats["default"]
    assert stats["num_layers"] == 14 and 0 < stats["importance_seconds"] <= stats["seconds"]
    layer = iter_lora_layers(model, "default")[0][1]
    assert float(layer.lora_B["default"].weight.detach().abs().max()) > 0  # no longer PEFT's B = 0


def test_fila_lora_config_carries_the_factor_scale_of_a_vila_adapter():
    """`FilaLoraConfig(init_lora_weights="vila", fila_config=...)`: the scale reaches the VILA init; output kept."""
    from peft_unlearn.fila import FilaConfig, FilaLoraConfig

    forget, retain = _batches(2, 1), _batches(2, 2)
    ids = _batches(1, 5)[0]["input_ids"]
    norms = {}
    for scale in ("paper", "stable"):
        base = tiny_causal_lm("llama", vocab_size=VOCAB, seed=3)
        with torch.no_grad():
            reference = base(input_ids=ids).logits
        config = FilaLoraConfig(
            r=2, lora_alpha=4, target_modules=TARGETS["llama"], init_lora_weights="vila",
            fila_config=FilaConfig(factor_scale=scale),
        )  # fmt: skip
        model = get_peft_model(base, config)
        initialize_vila_weights(model, forget, retain, show_progress=False)
        with torch.no_grad():
            assert (model(input_ids=ids).logits - reference).abs().max() < 1e-4
        norms[scale] = sum(float(b.norm()) for _, _, b in _factors(model))
    assert norms["stable"] < 0.5 * norms["paper"]  # the stable scale starts with smaller factors
    with pytest.raises(ValueError, match="'fila' or 'vila'"):
        FilaLoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
