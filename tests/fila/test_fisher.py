"""Fisher estimation against a brute-force per-batch computation, plus caching and error paths."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

import peft_unlearn  # noqa: F401
from peft_unlearn.fila import FisherStatistics, estimate_fisher
from peft_unlearn.fila.fisher import resolve_fisher_targets
from peft_unlearn.testing import tiny_causal_lm

from ..helpers import backward_token_nll

VOCAB = 320


def _batches(n: int, seed: int, batch_size: int = 2, seq: int = 10) -> list[dict[str, torch.Tensor]]:
    """Batches with a masked prompt and right padding (labels -100 on both)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch_size, seq), generator=gen)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :3] = -100
        pad = int(torch.randint(0, 4, (1,), generator=gen))
        if pad:
            ids[0, -pad:] = 0
            mask[0, -pad:] = 0
            labels[0, -pad:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _autograd_reference(model, forget, retain=None, names=None):
    """The previous implementation: autograd gradients w.r.t. the target weights, ``F += n * g**2`` in fp32."""
    modules = resolve_fisher_targets(model, names)
    weights = [m.weight for m in modules.values()]
    transposed = [isinstance(m, Conv1D) for m in modules.values()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    result = {}
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with ctx:
            for role, loader in (("f", forget), ("r", retain)):
                if loader is None:
                    continue
                acc = {
                    n: torch.zeros(m.weight.shape[::-1] if t else m.weight.shape)
                    for (n, m), t in zip(modules.items(), transposed)
                }
                count = 0
                for batch in loader:
                    n = int((batch["labels"] != -100).sum())
                    grads = torch.autograd.grad(model(**batch).loss, weights)
                    for name, grad, t in zip(modules, grads, transposed):
                        grad = (grad.t() if t else grad).float()
                        acc[name].addcmul_(grad, grad, value=n)
                    count += n
                result[role] = (acc, count)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return result


def _linear_modules(model) -> dict[str, torch.nn.Module]:
    output = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output}


def _brute_force(model, forget, retain, names=None):
    """Independent computation: own shifted cross-entropy, .backward() on all parameters, loop per batch."""
    modules = _linear_modules(model)
    if names is not None:
        modules = {n: modules[n] for n in names}
    for p in model.parameters():
        p.requires_grad_(True)
    totals = {}
    for role, loader in (("f", forget), ("r", retain)):
        acc = {
            n: torch.zeros(m.weight.shape[::-1] if isinstance(m, Conv1D) else m.weight.shape, dtype=torch.float64)
            for n, m in modules.items()
        }
        count = 0
        for batch in loader:
            n = backward_token_nll(model, batch)
            for name, module in modules.items():
                grad = module.weight.grad.double()
                grad = grad.t() if isinstance(module, Conv1D) else grad
                acc[name] += n * grad**2
            count += n
        totals[role] = (acc, count)
    model.zero_grad(set_to_none=True)
    return totals


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_brute_force_float64(arch):
    model = tiny_causal_lm(arch, vocab_size=VOCAB, dtype=torch.float64)
    forget, retain = _batches(3, seed=1), _batches(3, seed=2)
    stats = estimate_fisher(model, forget, retain, show_progress=False)
    expected = _brute_force(model, forget, retain)
    assert set(stats.importance_f) == set(expected["f"][0])
    assert stats.f_count == expected["f"][1] and stats.r_count == expected["r"][1]
    assert stats.num_batches == 3
    for name, ref in expected["f"][0].items():
        assert stats.importance_f[name].dtype == torch.float32
        torch.testing.assert_close(stats.importance_f[name].double(), ref, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(stats.importance_r[name].double(), expected["r"][0][name], rtol=1e-5, atol=1e-12)
        assert stats.importance_f[name].abs().sum() > 0


def test_state_is_restored(tiny_gpt2):
    model = tiny_gpt2
    model.transformer.h[0].train()  # mixed modes must survive
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.transformer.wpe.weight.requires_grad_(False)
    flags["transformer.wpe.weight"] = False
    modes = {n: m.training for n, m in model.named_modules()}
    estimate_fisher(model, _batches(1, 0), _batches(1, 1), show_progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout(tiny_gpt2):
    batches = _batches(2, 0)
    first = estimate_fisher(tiny_gpt2, batches, show_progress=False)
    second = estimate_fisher(tiny_gpt2, batches, show_progress=False)
    for name in first.names:
        assert torch.equal(first.importance_f[name], second.importance_f[name])
    torch.manual_seed(0)
    dropped = estimate_fisher(tiny_gpt2, batches, show_progress=False, train_mode=True)  # gpt2 has dropout 0.1
    assert any(not torch.allclose(first.importance_f[n], dropped.importance_f[n]) for n in first.names)


def test_peft_model_uses_lora_targets_with_adapters_disabled():
    base = tiny_causal_lm("llama", vocab_size=VOCAB, dtype=torch.float64)
    forget, retain = _batches(2, 3), _batches(2, 4)
    expected = _brute_force(
        base, forget, retain, names=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    )
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    for module in peft_model.modules():  # a non-trivial adapter must not influence the statistics
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    stats = estimate_fisher(peft_model, forget, retain, show_progress=False)
    assert sorted(stats.names) == sorted(
        [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
        + [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    )
    for name in expected["f"][0]:
        torch.testing.assert_close(stats.importance_f[name].double(), expected["f"][0][name], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(stats.importance_r[name].double(), expected["r"][0][name], rtol=1e-5, atol=1e-12)
    # LoRA parameters are still trainable, base weights frozen, no .grad anywhere
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())
    assert all(p.grad is None for p in peft_model.parameters())


def test_fp32_accumulation_under_bf16_model():
    model = tiny_causal_lm("llama", vocab_size=VOCAB, dtype=torch.bfloat16)
    forget = _batches(12, 5)
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj"]
    stats32 = estimate_fisher(model, forget, target_modules=names, show_progress=False)
    stats16 = estimate_fisher(model, forget, target_modules=names, show_progress=False, fp32_accumulation=False)
    # independent fp32 accumulation of the bf16 gradients
    weights = {n: model.get_submodule(n).weight for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    expected = {n: torch.zeros(w.shape, dtype=torch.float32) for n, w in weights.items()}
    for batch in forget:
        for w in weights.values():
            w.requires_grad_(True)
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, list(weights.values()))
        n = int((batch["labels"] != -100).sum())
        for (name, _), grad in zip(weights.items(), grads):
            expected[name] += n * grad.float() ** 2
    for name in names:
        assert stats32.importance_f[name].dtype == torch.float32
        assert stats16.importance_f[name].dtype == torch.bfloat16
        torch.testing.assert_close(stats32.importance_f[name], expected[name], rtol=1e-5, atol=0)
        assert not torch.equal(stats16.importance_f[name].float(), stats32.importance_f[name])


def test_target_modules_max_batches_and_retain_cycling(tiny_llama):
    forget, retain = _batches(5, 6), _batches(2, 7)
    names = ["model.layers.1.self_attn.o_proj"]
    stats = estimate_fisher(tiny_llama, forget, retain, target_modules=names, max_batches=3, show_progress=False)
    assert stats.names == names and stats.num_batches == 3
    assert stats.f_count == sum(int((b["labels"] != -100).sum()) for b in forget[:3])
    # retain batches are drawn in order and restart: r0, r1, r0
    assert stats.r_count == sum(int((b["labels"] != -100).sum()) for b in (retain[0], retain[1], retain[0]))
    no_retain = estimate_fisher(tiny_llama, forget, target_modules=names, max_batches=3, show_progress=False)
    assert no_retain.r_count == 0 and no_retain.importance_r == {} and not no_retain.has_retain
    torch.testing.assert_close(no_retain.importance_f[names[0]], stats.importance_f[names[0]])


def test_relative_importance_formula():
    f = torch.tensor([[4.0, 0.0], [2.0, 8.0]])
    r = torch.tensor([[1.0, 3.0], [0.0, 2.0]])
    stats = FisherStatistics({"x": f}, {"x": r}, f_count=2, r_count=4)
    eps = 1e-3
    torch.testing.assert_close(stats.relative_importance(eps)["x"], (f / 2) / (eps + r / 4))
    forget_only = FisherStatistics({"x": f}, {}, f_count=2)
    torch.testing.assert_close(forget_only.layer_relative_importance("x"), f / 2)
    with pytest.raises(KeyError, match="No Fisher statistics for layer 'y'"):
        stats.layer_relative_importance("y")
    with pytest.raises(ValueError, match="f_count=0"):
        FisherStatistics({"x": f}, {}, f_count=0).layer_relative_importance("x")


def test_target_resolution_errors(tiny_llama):
    with pytest.raises(ValueError, match="not a module of the model"):
        resolve_fisher_targets(tiny_llama, ["model.layers.9.mlp.up_proj"])
    with pytest.raises(ValueError, match="is a LlamaRMSNorm"):
        resolve_fisher_targets(tiny_llama, ["model.norm"])
    with pytest.raises(TypeError, match="list of module names"):
        resolve_fisher_targets(tiny_llama, "q_proj")
    with pytest.raises(ValueError, match="empty"):
        resolve_fisher_targets(tiny_llama, [])
    assert "lm_head" not in resolve_fisher_targets(tiny_llama)


def test_data_errors(tiny_llama):
    batch = _batches(1, 0)[0]
    with pytest.raises(ValueError, match="need `input_ids` and `labels`"):
        estimate_fisher(tiny_llama, [{"input_ids": batch["input_ids"]}], show_progress=False)
    with pytest.raises(TypeError, match="must yield dicts"):
        estimate_fisher(tiny_llama, [batch["input_ids"]], show_progress=False)
    masked = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="no supervised tokens"):
        estimate_fisher(tiny_llama, [masked], show_progress=False)
    with pytest.raises(ValueError, match="retain dataloader produced no supervised"):
        estimate_fisher(tiny_llama, [batch], [masked], show_progress=False)
    with pytest.raises(ValueError, match="retain dataloader is empty"):
        estimate_fisher(tiny_llama, [batch], [], show_progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        estimate_fisher(tiny_llama, [batch], max_batches=0, show_progress=False)
    with pytest.raises(TypeError, match="max_batches"):
        estimate_fisher(tiny_llama, [batch], max_batches=1.5, show_progress=False)
    with pytest.raises(ValueError, match="forget_dataloader"):
        estimate_fisher(tiny_llama, None, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# hook-based gradients: equal to autograd on the weights, no weight gradient needed
# ---------------------------------------------------------------------------------------------------------------


def _assert_close_stats(stats, expected, rtol=1e-6):
    for role, have in (("f", stats.importance_f), ("r", stats.importance_r)):
        if role not in expected:
            assert have == {}
            continue
        ref, count = expected[role]
        assert (stats.f_count if role == "f" else stats.r_count) == count
        assert set(have) == set(ref)
        for name, value in ref.items():
            assert have[name].dtype == torch.float32
            torch.testing.assert_close(have[name], value, rtol=rtol, atol=rtol * float(value.abs().max()))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("with_retain", [True, False])
def test_hooks_match_autograd_on_weights_fp32(arch, with_retain):
    model = tiny_causal_lm(arch, vocab_size=VOCAB)
    forget, retain = _batches(3, seed=11), (_batches(2, seed=12) if with_retain else None)
    expected = _autograd_reference(model, forget, [retain[0], retain[1], retain[0]] if retain else None)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = estimate_fisher(model, forget, retain, show_progress=False)
    _assert_close_stats(stats, expected)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_frozen_peft_base_weights_never_need_grad():
    base = tiny_causal_lm("gemma3", vocab_size=VOCAB)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    seen = []  # requires_grad of the base weights while the Fisher pass runs
    for module in peft_model.modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            module.get_base_layer().register_forward_pre_hook(lambda m, a: seen.append(m.weight.requires_grad))
    forget = _batches(2, seed=13)
    stats = estimate_fisher(peft_model, forget, show_progress=False)
    assert seen and not any(seen)
    expected = _autograd_reference(peft_model, forget, names=stats.names)
    _assert_close_stats(stats, expected)
    assert all(p.grad is None for p in peft_model.parameters())


class _SharedLayerLM(torch.nn.Module):
    """A toy LM that calls the same Linear twice per forward (shared weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.shared = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, labels, attention_mask=None):
        hidden = torch.tanh(self.shared(torch.tanh(self.shared(self.embed(input_ids)))))
        logits = self.head(hidden)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return type("Out", (), {"loss": loss})()


def test_layer_called_twice_gets_square_of_summed_gradient():
    model = _SharedLayerLM()
    forget = _batches(2, seed=14)
    stats = estimate_fisher(model, forget, show_progress=False)
    expected = _autograd_reference(model, forget)
    assert stats.names == ["shared"]
    _assert_close_stats(stats, expected)


# ---------------------------------------------------------------------------------------------------------------
# quantized bases (bitsandbytes on CPU): the Fisher of the dequantized weight
# ---------------------------------------------------------------------------------------------------------------


def _quantized_and_dequantized(bits, tmp_path):
    """A tiny Llama loaded in 4-bit (nf4) or 8-bit, and an fp32 copy holding the dequantized weights."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=64).save_pretrained(tmp_path)
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    dense_modules = dict(dense.named_modules())
    count = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = module.weight.CB.float() * module.weight.SCB.float()[:, None] / 127
        else:
            continue
        dense_modules[name].weight.data.copy_(weight.float())
        count += 1
    assert count == 14
    return quantized, dense


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_gives_fisher_of_dequantized_weight(bits, tmp_path):
    quantized, dense = _quantized_and_dequantized(bits, tmp_path)
    forget, retain = _batches(2, seed=15), _batches(2, seed=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' "inputs will be cast to float16" (8-bit)
        stats = estimate_fisher(quantized, forget, retain, show_progress=False)
    expected = _autograd_reference(dense, forget, retain)
    assert all(p.grad is None for p in quantized.parameters())
    # 4-bit: x @ dequant(W)^T in fp32, the same arithmetic as the dense copy; 8-bit: LLM.int8 also quantizes the
    # activations (to int8 via fp16), so the output gradients differ by that rounding
    rtol = 1e-5 if bits == 4 else 0.15
    for role, have in (("f", stats.importance_f), ("r", stats.importance_r)):
        ref, count = expected[role]
        assert (stats.f_count if role == "f" else stats.r_count) == count
        for name, value in ref.items():
            assert have[name].shape == value.shape and torch.isfinite(have[name]).all()
            rel = float((have[name] - value).norm() / value.norm())
            assert rel < rtol, (name, rel)


# ---------------------------------------------------------------------------------------------------------------
# memory modes: identical statistics
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        {"accumulator_device": "cpu"},
        {"layers_per_pass": 3},
        {"layers_per_pass": 1, "accumulator_device": "cpu"},
        {"max_accumulator_bytes": 40_000},
    ],
)
def test_memory_modes_give_identical_statistics(tiny_gemma3, mode):
    forget, retain = _batches(3, seed=17), _batches(2, seed=18)
    reference = estimate_fisher(tiny_gemma3, forget, retain, show_progress=False)
    stats = estimate_fisher(tiny_gemma3, forget, retain, show_progress=False, **mode)
    assert list(stats.importance_f) == list(reference.importance_f)
    assert (stats.f_count, stats.r_count, stats.num_batches) == (
        reference.f_count,
        reference.r_count,
        reference.num_batches,
    )
    for name in reference.names:
        assert stats.importance_f[name].device.type == "cpu"
        assert torch.equal(stats.importance_f[name], reference.importance_f[name]), name
        assert torch.equal(stats.importance_r[name], reference.importance_r[name]), name


def test_plan_passes_and_multi_pass_errors(tiny_llama):
    from peft_unlearn.fila.fisher_passes import plan_passes

    shapes = {"a": (2, 2), "b": (2, 2), "c": (4, 4), "d": (1, 1)}
    assert plan_passes(shapes, 8) == [["a", "b", "c", "d"]]
    assert plan_passes(shapes, 8, layers_per_pass=3) == [["a", "b", "c"], ["d"]]
    assert plan_passes(shapes, 8, max_accumulator_bytes=64) == [["a", "b"], ["c"], ["d"]]
    assert plan_passes(shapes, 8, max_accumulator_bytes=1) == [["a"], ["b"], ["c"], ["d"]]
    with pytest.raises(ValueError, match="not both"):
        plan_passes(shapes, 8, layers_per_pass=1, max_accumulator_bytes=1)
    with pytest.raises(ValueError, match="`layers_per_pass` must be a positive int"):
        estimate_fisher(tiny_llama, _batches(1, 0), layers_per_pass=0, show_progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        estimate_fisher(tiny_llama, iter(_batches(2, 0)), layers_per_pass=2, show_progress=False)

    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(_batches(2, self.calls))

    with pytest.raises(RuntimeError, match="same batches every time"):
        estimate_fisher(tiny_llama, Shuffled(), layers_per_pass=4, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# cache: keyed by what determines the statistics
# ---------------------------------------------------------------------------------------------------------------


class _Exploding:
    def __iter__(self):
        raise AssertionError("the cache should have been used")


def _assert_same(a, b):
    assert (a.f_count, a.r_count, a.num_batches) == (b.f_count, b.r_count, b.num_batches)
    assert a.names == b.names
    for name in a.names:
        assert torch.equal(a.importance_f[name], b.importance_f[name])
        if b.importance_r:
            assert torch.equal(a.importance_r[name], b.importance_r[name])


def test_cache_round_trip_and_reuse(tiny_llama, tmp_path):
    path = tmp_path / "sub" / "fisher.safetensors"
    forget, retain = _batches(2, 8), _batches(2, 9)
    stats = estimate_fisher(tiny_llama, forget, retain, cache_path=path, show_progress=False)
    assert path.is_file()
    _assert_same(FisherStatistics.load(path), stats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reuse is silent
        cached = estimate_fisher(tiny_llama, iter(forget), iter(retain), cache_path=path, show_progress=False)
    _assert_same(cached, stats)
    with pytest.raises(AssertionError, match="cache should have been used"):  # the data is read to check the key
        estimate_fisher(tiny_llama, _Exploding(), _Exploding(), cache_path=path, show_progress=False)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("forget", "forget_data"),
        ("retain", "retain_data"),
        ("labels", "forget_data"),
        ("weights", "weights"),
        ("targets", "targets"),
        ("max_batches", "settings"),
        ("train_mode", "settings"),
        ("fp32", "settings"),
        ("model", "architecture"),
    ],
)
def test_cache_for_other_inputs_is_recomputed_with_a_warning(tiny_llama, tmp_path, change, field):
    path = tmp_path / "fisher.safetensors"
    forget, retain = _batches(3, 20), _batches(2, 21)
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    estimate_fisher(tiny_llama, forget, retain, target_modules=names, cache_path=path, show_progress=False)
    model, kwargs = tiny_llama, {"target_modules": names}
    if change == "forget":
        forget = _batches(3, 22)
    elif change == "retain":
        retain = _batches(2, 23)
    elif change == "labels":  # same tokens, other supervised positions
        forget = [dict(b, labels=torch.where(torch.arange(10) < 5, -100, b["input_ids"])) for b in forget]
    elif change == "weights":
        model = tiny_causal_lm("llama", vocab_size=VOCAB, seed=1)
    elif change == "targets":
        kwargs["target_modules"] = names[:1]
    elif change == "max_batches":
        kwargs["max_batches"] = 2
    elif change == "train_mode":
        kwargs["train_mode"] = True
    elif change == "fp32":
        kwargs["fp32_accumulation"] = False
    elif change == "model":
        model = tiny_causal_lm("gemma3", vocab_size=VOCAB)
        kwargs["target_modules"] = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    with pytest.warns(UserWarning, match=rf"Not reusing the Fisher cache .*{field}.*Recomputing and overwriting"):
        stats = estimate_fisher(model, iter(forget), iter(retain), cache_path=path, show_progress=False, **kwargs)
    fresh = estimate_fisher(model, forget, retain, show_progress=False, **kwargs)
    _assert_same(stats, fresh)
    _assert_same(FisherStatistics.load(path), fresh)  # overwritten with the new statistics and key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(estimate_fisher(model, forget, retain, cache_path=path, show_progress=False, **kwargs), fresh)


def test_cache_mismatch_error_mode_and_foreign_files(tiny_llama, tmp_path):
    path = tmp_path / "fisher.safetensors"
    estimate_fisher(tiny_llama, _batches(1, 0), cache_path=path, show_progress=False)
    content = path.read_bytes()
    with pytest.raises(ValueError, match="computed for other inputs.*forget_data.*on_cache_mismatch='recompute'"):
        estimate_fisher(tiny_llama, _batches(1, 1), cache_path=path, show_progress=False, on_cache_mismatch="error")
    assert path.read_bytes() == content
    with pytest.raises(ValueError, match="on_cache_mismatch"):
        estimate_fisher(tiny_llama, _batches(1, 1), cache_path=path, show_progress=False, on_cache_mismatch="x")

    from safetensors.torch import save_file

    bogus = tmp_path / "bogus.safetensors"  # somebody else's file: never overwritten
    save_file({"a": torch.zeros(1)}, str(bogus))
    before = bogus.read_bytes()
    with pytest.raises(ValueError, match="not a peft_unlearn Fisher file.*left untouched"):
        estimate_fisher(tiny_llama, _batches(1, 0), cache_path=bogus, show_progress=False)
    assert bogus.read_bytes() == before
    text = tmp_path / "notes.txt"
    text.write_text("my notes")
    with pytest.raises(ValueError, match="not a readable safetensors file.*left untouched"):
        estimate_fisher(tiny_llama, _batches(1, 0), cache_path=text, show_progress=False)
    assert text.read_text() == "my notes"

    legacy = tmp_path / "legacy.safetensors"  # written by an older version (no key): recomputed
    stats = estimate_fisher(tiny_llama, _batches(1, 0), show_progress=False)
    stats.save(legacy)
    with pytest.warns(UserWarning, match="written without a key"):
        estimate_fisher(tiny_llama, _batches(1, 0), cache_path=legacy, show_progress=False)


@pytest.mark.parametrize("bits", [4, 8])
def test_dense_weight_is_the_weight_the_quantized_layer_multiplies_with(bits, tmp_path):
    from peft_unlearn.fila.state import copy_into_, dense_weight

    quantized, dense = _quantized_and_dequantized(bits, tmp_path)
    layer = quantized.model.layers[0].mlp.up_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(x).detach()  # the training path (input requires grad), as in the Fisher pass
    weight = dense_weight(layer)
    assert weight.shape == (layer.out_features, layer.in_features) and weight.dtype == torch.float32
    torch.testing.assert_close(weight, dense.model.layers[0].mlp.up_proj.weight)
    rel = float((out - x.detach() @ weight.T).norm() / out.norm())
    assert rel < (1e-6 if bits == 4 else 2e-2), rel  # 8-bit also rounds the activations
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        layer(x.detach())  # a CPU inference forward may repack a 4-bit weight (absmax rounded to bf16)
    repacked = dense_weight(layer)
    assert float((repacked - weight).norm() / weight.norm()) < 1e-2
    conv = Conv1D(3, 2)
    assert torch.equal(dense_weight(conv), conv.weight.T)
    target = torch.nn.Parameter(torch.zeros(2, 3))
    copy_into_(target, torch.ones(2, 3, dtype=torch.float64))
    assert target.dtype == torch.float32 and bool((target == 1).all())
    with pytest.raises(ValueError, match=r"shape \(3, 2\) into a parameter of shape \(2, 3\)"):
        copy_into_(target, torch.ones(3, 2))


@pytest.mark.parametrize("reentrant", [True, False])
def test_train_mode_with_activation_checkpointing(reentrant):
    model = tiny_causal_lm("llama", vocab_size=VOCAB)  # no dropout: train mode is deterministic
    forget = _batches(2, seed=30)
    model.train()
    expected = _autograd_reference(model, forget)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.eval()
    flags = {n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")}
    assert any(flags.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_cache vs checkpointing notice
        stats = estimate_fisher(model, forget, show_progress=False, train_mode=True)
    _assert_close_stats(stats, expected)
    assert {
        n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
    } == flags
    assert not model.training


def test_trainer_fila_cache_is_not_reused_for_another_forget_set(tokenizer, tmp_path):
    from peft_unlearn.testing import TINY_CORPUS
    from peft_unlearn.trainer import UnlearningConfig, UnlearningTrainer

    cache = tmp_path / "fisher.safetensors"
    retain = [{"text": t} for t in TINY_CORPUS[:4]]

    def run(forget_texts):
        model = get_peft_model(
            tiny_causal_lm("llama", vocab_size=len(tokenizer)),
            LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="fila"),
        )
        args = UnlearningConfig(
            output_dir=str(tmp_path / "out"),
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            max_steps=1,
            per_device_train_batch_size=2,
            fila_batch_size=2,
            fila_cache=str(cache),
            disable_tqdm=True,
        )
        trainer = UnlearningTrainer(
            model=model,
            args=args,
            forget_dataset=[{"text": t} for t in forget_texts],
            retain_dataset=retain,
            processing_class=tokenizer,
        )
        trainer.train()
        return FisherStatistics.load(cache)

    first = run(TINY_CORPUS[4:6])
    with warnings.catch_warnings(record=True) as caught:  # same data: reused silently
        warnings.simplefilter("always")
        run(TINY_CORPUS[4:6])
    assert not [w for w in caught if "Fisher cache" in str(w.message)]
    with pytest.warns(UserWarning, match="Not reusing the Fisher cache.*forget_data"):
        second = run(TINY_CORPUS[6:8])
    assert second.f_count != first.f_count or not torch.equal(
        second.importance_f[second.names[0]], first.importance_f[first.names[0]]
    )


def test_rank_inside_a_process_group(tmp_path):
    """`rank()` reads the process-group rank (it shows the progress bar and writes the cache on rank 0 only)."""
    import torch.distributed as dist

    from peft_unlearn.fila.fisher_passes import rank

    assert rank() == 0  # no process group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert rank() == 0
    finally:
        dist.destroy_process_group()
