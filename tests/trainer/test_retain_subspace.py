"""The retain-subspace penalty (ReGLU's ROL) as an UnlearningTrainer option: float64 brute force, off = zero, effect."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_unlearn  # noqa: F401  (registers the data-driven inits)
from peft_unlearn.testing import TINY_CORPUS, tiny_causal_lm
from peft_unlearn.trainer import UnlearningTrainer
from peft_unlearn.trainer.retain_subspace import retain_basis, subspace_penalty
from tests.helpers import quick_cpu_config

FORGET = [{"text": t} for t in TINY_CORPUS[5:9]]
RETAIN = [{"text": t} for t in TINY_CORPUS[:5]]
TARGETS = ["q_proj", "k_proj", "up_proj"]


def _peft_model(tokenizer, init="default", dtype=torch.float32, seed=0) -> nn.Module:
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0, dtype=dtype)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=TARGETS,
        lora_dropout=0.0,
        init_lora_weights=True if init in ("default", "lora") else init,
    )
    model = get_peft_model(base, config)
    if init == "default":  # default LoRA with a non-zero B, so the penalty has something to measure at once
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype))
    return model


def _trainer(model, tokenizer, tmp_path, **kwargs) -> UnlearningTrainer:
    args = quick_cpu_config(
        tmp_path, **{"max_steps": 3, "lr_scheduler_type": "constant", "seed": 0, "fila_batch_size": 2, **kwargs}
    )
    return UnlearningTrainer(model, args, forget_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer)


def _brute_force_projectors(model, trainer, rank: int) -> dict[str, torch.Tensor]:
    """Q_r Q_r^T per layer: float64 loop over the retain sequences (sum of the base layer's outputs over tokens)."""
    base = model.base_model.model
    modules = {n: m.get_base_layer() for n, m in base.named_modules() if hasattr(m, "lora_B")}
    projectors = {}
    for name, module in modules.items():
        moment, count = None, 0
        for example in trainer._retain_examples:
            ids = torch.tensor([example["input_ids"]])
            captured: list[torch.Tensor] = []
            handle = module.register_forward_hook(lambda m, a, o, out=captured: out.append(o.detach().double()))
            with torch.no_grad(), model.disable_adapter():
                model(input_ids=ids)
            handle.remove()
            pooled = captured[0][0].sum(0)  # [out]: one vector per sequence, summed over its tokens
            outer = torch.outer(pooled, pooled)
            moment = outer if moment is None else moment + outer
            count += 1
        evals, evecs = torch.linalg.eigh(moment / count)
        nonzero = int((evals > 1e-5 * evals.max()).sum())  # the retain span: at most one direction per sequence
        q = evecs[:, -min(rank, nonzero) :]
        projectors[name] = q @ q.T
    return projectors


def test_penalty_and_gradient_match_float64_brute_force(tokenizer, tmp_path) -> None:
    weight, rank = 0.5, 3
    model = _peft_model(tokenizer, dtype=torch.float64)
    trainer = _trainer(model, tokenizer, tmp_path, retain_subspace_weight=weight, retain_subspace_rank=rank)
    subspace = trainer._maybe_compute_retain_subspace()
    projectors = _brute_force_projectors(model, trainer, rank)
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_B")}
    assert len(subspace.bases) == len(layers) == 6

    expected = 0.0
    for name, layer in layers.items():
        b = layer.lora_B["default"].weight.detach().double()
        expected = expected + torch.trace(b.T @ projectors[name] @ b)
    value = subspace.penalty()
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-8)
    assert value.item() > 1e-3  # a random B has energy in the retain subspace

    model.zero_grad()
    (weight * value).backward()
    for name, layer in layers.items():
        b = layer.lora_B["default"].weight
        torch.testing.assert_close(
            b.grad.double(), 2 * weight * projectors[name] @ b.detach().double(), rtol=1e-5, atol=1e-6
        )
        assert layer.lora_A["default"].weight.grad is None  # the penalty reads B only

    # in compute_loss: added with its weight, logged unweighted, split over the micro-batches of a step
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    with torch.no_grad():
        with_penalty = trainer.compute_loss(model, batch)
        trainer._retain_subspace = None
        without = trainer.compute_loss(model, batch)
        trainer._retain_subspace = subspace
        assert trainer._metrics["train"]["retain_subspace_loss"][-1] == pytest.approx(expected.item(), rel=1e-6)
        torch.testing.assert_close((with_penalty - without).double(), weight * expected, rtol=1e-6, atol=1e-8)
        trainer.current_gradient_accumulation_steps = 2
        halved = trainer._retain_subspace_term({}, training=True)
        torch.testing.assert_close(halved.double(), weight * expected / 2, rtol=1e-6, atol=1e-8)


def test_rank_is_clamped_to_the_retain_span(tokenizer, tmp_path) -> None:
    # k far above the layer size: Q_r spans the retain span (5 sequences -> at most 5 directions), nothing more
    model = _peft_model(tokenizer, dtype=torch.float64)
    trainer = _trainer(model, tokenizer, tmp_path, retain_subspace_weight=1.0, retain_subspace_rank=10_000)
    subspace = trainer._maybe_compute_retain_subspace()
    projectors = _brute_force_projectors(model, trainer, 10_000)
    for (_, name), q in subspace.bases.items():
        assert 1 <= q.shape[1] <= len(RETAIN)
        torch.testing.assert_close((q @ q.T).double(), projectors[name], rtol=0, atol=1e-5)


def test_retain_basis_randomized_path() -> None:
    gen = torch.Generator().manual_seed(0)
    # low rank (as with one vector per sequence): the randomized range finder is exact
    h = torch.randn(20, 300, generator=gen, dtype=torch.float64)
    cov = h.T @ h / 20
    q = retain_basis(cov, 8).double()
    evecs = torch.linalg.eigh(cov)[1][:, -8:]
    torch.testing.assert_close(q @ q.T, evecs @ evecs.T, rtol=0, atol=1e-5)
    assert retain_basis(cov, 128).shape == (300, 20)  # clamped to the rank
    # full rank with decaying spectrum: the top subspace is found closely
    basis = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))[0]
    full = basis @ torch.diag(0.5 ** torch.arange(300, dtype=torch.float64)) @ basis.T
    q = retain_basis(full, 8).double()
    torch.testing.assert_close(q @ q.T, basis[:, :8] @ basis[:, :8].T, rtol=0, atol=1e-4)
    assert retain_basis(torch.zeros(4, 4), 2).shape == (4, 0)


def test_off_adds_nothing(tokenizer, tmp_path) -> None:
    model = _peft_model(tokenizer)
    trainer = _trainer(model, tokenizer, tmp_path)  # retain_subspace_weight defaults to 0
    trainer.train()
    assert trainer._retain_subspace is None
    assert not any("retain_subspace" in key for entry in trainer.state.log_history for key in entry)
    assert trainer._retain_subspace_term({}, training=True) == 0.0


def _final_penalty(tokenizer, tmp_path, init: str, weight: float) -> tuple[float, float, list[float]]:
    model = _peft_model(tokenizer, init=init)
    trainer = _trainer(
        model,
        tokenizer,
        tmp_path / f"{init}{weight}",
        retain_subspace_weight=1e-9 if weight == 0 else weight,
        retain_subspace_rank=4,
        max_steps=6,
        learning_rate=0.1,
    )  # a negligible weight measures the penalty of the unpenalised run with the same Q_r
    trainer.train()
    start = trainer.state.log_history[0]["retain_subspace_loss"]
    logged = [e["retain_subspace_loss"] for e in trainer.state.log_history if "retain_subspace_loss" in e]
    return start, trainer._retain_subspace.penalty().item(), logged


@pytest.mark.parametrize("init", ["default", "rila"])
def test_pulls_b_out_of_the_retain_subspace(tokenizer, tmp_path, init) -> None:
    start_off, end_off, _ = _final_penalty(tokenizer, tmp_path, init, 0.0)
    start_on, end_on, logged = _final_penalty(tokenizer, tmp_path, init, 5.0)
    assert start_on == pytest.approx(start_off, rel=1e-5)  # same model, same subspace at the first step
    assert end_on < 0.5 * end_off
    assert end_on < 0.5 * start_on
    assert len(logged) == 6


def test_default_lora_init_starts_at_zero_and_stays_lower(tokenizer, tmp_path) -> None:
    # stock LoRA (B = 0): no penalty at the first step; training moves B, the penalty keeps it out of Q_r
    start_off, end_off, _ = _final_penalty(tokenizer, tmp_path, "lora", 0.0)
    start_on, end_on, _ = _final_penalty(tokenizer, tmp_path, "lora", 5.0)
    assert start_off == start_on == 0.0
    assert end_off > 1e-3
    assert end_on < 0.5 * end_off


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retain_subspace_weight": -0.1}, "retain_subspace_weight"),
        ({"retain_subspace_weight": float("nan")}, "retain_subspace_weight"),
        ({"retain_subspace_weight": True}, "retain_subspace_weight"),
        ({"retain_subspace_rank": 0}, "retain_subspace_rank"),
        ({"retain_subspace_rank": 2.5}, "retain_subspace_rank"),
        ({"retain_subspace_rank": True}, "retain_subspace_rank"),
    ],
)
def test_bad_settings(tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        quick_cpu_config(tmp_path, **kwargs)


def test_needs_retain_data_and_a_peft_model(tokenizer, tmp_path) -> None:
    args = quick_cpu_config(tmp_path, retain_subspace_weight=0.5, retain_loss=None)
    with pytest.raises(ValueError, match="retain_subspace_weight=0.5.*retain_dataset"):
        UnlearningTrainer(_peft_model(tokenizer), args, forget_dataset=FORGET, processing_class=tokenizer)
    args = quick_cpu_config(tmp_path, retain_subspace_weight=0.5)
    plain = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="PEFT"):
        UnlearningTrainer(plain, args, forget_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer)


def test_subspace_penalty_function() -> None:
    q = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))[0]
    b = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(subspace_penalty({"x": b}, {"x": q}), torch.trace(b.T @ q @ q.T @ b))
    with pytest.raises(ValueError, match="at least one layer"):
        subspace_penalty({}, {})
