"""Fisher estimation against a brute-force per-batch computation, plus caching and error paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

import peft_unlearn  # noqa: F401
from peft_unlearn.fila import FisherStatistics, estimate_fisher
from peft_unlearn.fila.fisher import resolve_fisher_targets
from peft_unlearn.testing import tiny_causal_lm

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
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).double(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            loss.backward()
            n = int((labels != -100).sum())
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


def test_cache_round_trip_and_reuse(tiny_llama, tmp_path):
    path = tmp_path / "sub" / "fisher.safetensors"
    forget, retain = _batches(2, 8), _batches(2, 9)
    stats = estimate_fisher(tiny_llama, forget, retain, cache_path=path, show_progress=False)
    assert path.is_file()
    loaded = FisherStatistics.load(path)
    assert (loaded.f_count, loaded.r_count, loaded.num_batches) == (stats.f_count, stats.r_count, stats.num_batches)
    for name in stats.names:
        assert torch.equal(loaded.importance_f[name], stats.importance_f[name])
        assert torch.equal(loaded.importance_r[name], stats.importance_r[name])

    class Exploding:
        def __iter__(self):
            raise AssertionError("the cache should have been used")

    cached = estimate_fisher(tiny_llama, Exploding(), Exploding(), cache_path=path, show_progress=False)
    assert torch.equal(cached.importance_f[stats.names[0]], stats.importance_f[stats.names[0]])


def test_cache_mismatch_is_an_error(tiny_llama, tiny_gpt2, tmp_path):
    path = tmp_path / "fisher.safetensors"
    estimate_fisher(
        tiny_llama, _batches(1, 0), target_modules=["model.layers.0.mlp.up_proj"], cache_path=path, show_progress=False
    )
    with pytest.raises(ValueError, match="do not match the model's target layers.*missing layers"):
        estimate_fisher(tiny_llama, _batches(1, 0), cache_path=path, show_progress=False)
    with pytest.raises(ValueError, match="do not match"):
        estimate_fisher(tiny_gpt2, _batches(1, 0), cache_path=path, show_progress=False)
    bogus = tmp_path / "bogus.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(bogus))
    with pytest.raises(ValueError, match="not a peft_unlearn Fisher file"):
        estimate_fisher(tiny_llama, _batches(1, 0), cache_path=bogus, show_progress=False)


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
