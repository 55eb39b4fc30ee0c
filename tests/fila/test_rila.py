"""RILA (ReGLU) init: float64 brute force, unchanged output at init, portable save loaded by plain PEFT."""

from __future__ import annotations

import textwrap

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
from peft_unlearn.fila import rila as rila_module
from peft_unlearn.fila.offset import get_offset
from peft_unlearn.fila.rila import top_eigenvectors
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


def _difference_of_covariances(n: int, n_f: int, n_r: int, beta: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y_f = torch.randn(n_f, n, generator=gen, dtype=torch.float64) * 3
    y_r = torch.randn(n_r, n, generator=gen, dtype=torch.float64)
    return (1 - beta) * (y_f.T @ y_f) / n_f - beta * (y_r.T @ y_r) / n_r


def _full_eigh_reference(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0)[:k], vectors.flip(-1)[:, :k]


@pytest.mark.parametrize("n, n_f, n_r, k", [(300, 6, 20, 4), (257, 1, 40, 1), (512, 12, 0, 8)])
def test_low_rank_eigenvectors_match_full_eigh(n: int, n_f: int, n_r: int, k: int) -> None:
    matrix = _difference_of_covariances(n, n_f, max(n_r, 1), 0.8 if n_r else 0.0, seed=n)
    values, reference = _full_eigh_reference(matrix, k)
    assert (values > 1e-6 * values[0]).all(), "the test needs k clearly positive eigenvalues"
    fast = top_eigenvectors(matrix, k, rank_bound=n_f + max(n_r, 1))
    full = top_eigenvectors(matrix, k)
    # both paths return the same vectors with the same signs; up to sign they are eigh's
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-8)
    signs = torch.sign((full * reference).sum(0))
    torch.testing.assert_close(full * signs, reference, rtol=0, atol=1e-8)
    torch.testing.assert_close(fast.T @ fast, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)


def test_low_rank_eigenvectors_rank_null_space_above_negative_eigenvalues() -> None:
    """With fewer positive eigenvalues than k, the rest are eigenvectors of 0, as in the full decomposition."""
    matrix = _difference_of_covariances(300, 2, 30, 0.8, seed=5)
    values, reference = _full_eigh_reference(matrix, 6)
    positive = int((values > 1e-8 * values[0]).sum())
    assert 1 <= positive < 6
    fast = top_eigenvectors(matrix, 6, rank_bound=32)
    signs = torch.sign((fast[:, :positive] * reference[:, :positive]).sum(0))
    torch.testing.assert_close(fast[:, :positive] * signs, reference[:, :positive], rtol=0, atol=1e-8)
    rest = fast[:, positive:]
    scale = matrix.abs().max()
    assert (matrix @ rest).abs().max() < 1e-9 * scale  # eigenvalue 0, not one of the negative ones
    torch.testing.assert_close(fast.T @ fast, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


def test_initialize_passes_the_vector_count_as_rank_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int | None] = []
    original = rila_module.top_eigenvectors

    def spy(matrix, k, *, rank_bound=None, seed=0):
        seen.append(rank_bound)
        return original(matrix, k, rank_bound=rank_bound, seed=seed)

    monkeypatch.setattr(rila_module, "top_eigenvectors", spy)
    model = _model()
    info = initialize_adapter_weights(model, _batches(1), _batches(2), show_progress=False)
    assert seen == [info["f_count"] + info["r_count"]] * info["num_layers"] and info["f_count"] == 6


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


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (fully_shard) on CPU with gloo: sharded DTensor weights, as for FILA (tests/fila/test_distributed.py)
# ---------------------------------------------------------------------------------------------------------------

FSDP_RILA_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp


    def worker(rank, world_size, out_dir):
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"), rank=rank, world_size=world_size
        )
        forget = random_lm_batches(4, 1)[rank::world_size]
        retain = random_lm_batches(4, 2)[rank::world_size]
        torch.manual_seed(0)
        config = RilaLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rila_config={"pooling": "token"})
        model = get_peft_model(tiny_causal_lm("llama", vocab_size=320), config)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer.weight, DTensor) and isinstance(q_proj.lora_A["default"].weight, DTensor)

        # the covariances (all-reduced over the ranks), then the RILA init of the sharded adapter
        stats = estimate_output_covariance(model, forget, retain, pooling="token", show_progress=False)
        sums = {f"f.{k}": v for k, v in stats.forget.items()} | {f"r.{k}": v for k, v in stats.retain.items()}
        sums["counts"] = torch.tensor([stats.f_count, stats.r_count])
        save_file(sums, os.path.join(out_dir, f"cov_rank{rank}.safetensors"))
        initialize_rila_weights(model, covariance=stats, show_progress=False)
        assert pending_data_driven_adapters(model) == []
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        init = {k: v for k, v in full.items() if "lora_" in k}

        model.train()  # one training step (gradients averaged over the ranks by FSDP)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(**forget[0]).loss.backward()
        optimizer.step()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        lora = {k: v for k, v in full.items() if "lora_" in k}
        if rank == 0:
            save_file(init, os.path.join(out_dir, "init.safetensors"))
            model.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=lora)  # the portable adapter
        dist.barrier()
        dist.destroy_process_group()


    import peft_unlearn  # noqa: F401
    from peft import get_peft_model
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from peft_unlearn.fila import (
        RilaLoraConfig, estimate_output_covariance, initialize_rila_weights, pending_data_driven_adapters
    )
    from peft_unlearn.testing import random_lm_batches, tiny_causal_lm

    TARGETS = sys.argv[2].split(",")

    if __name__ == "__main__":
        torch.set_num_threads(1)
        mp.start_processes(worker, args=(2, sys.argv[1]), nprocs=2, join=True, start_method="fork")
        print("DIST_OK")
    """
)


@pytest.mark.distributed
def test_fsdp2_sharded_rila_init_step_and_portable_adapter(tmp_path) -> None:
    """Under FSDP2 (2 gloo ranks, DTensor weights) the covariances, the RILA init, one training step and the
    portable adapter equal the single-process run on the union of the ranks' data."""
    pytest.importorskip("torch.distributed.fsdp")
    from safetensors.torch import load_file

    from peft_unlearn.fila import RilaLoraConfig, initialize_rila_weights
    from peft_unlearn.testing import random_lm_batches
    from tests.helpers import run_python

    targets = ["q_proj", "down_proj"]
    script = tmp_path / "fsdp_rila_worker.py"
    script.write_text(FSDP_RILA_WORKER)
    run_python([script, tmp_path, ",".join(targets)], cwd=tmp_path, expect="DIST_OK")

    forget, retain = random_lm_batches(4, 1), random_lm_batches(4, 2)
    torch.manual_seed(0)
    config = RilaLoraConfig(r=4, lora_alpha=8, target_modules=targets, rila_config={"pooling": "token"})
    model = get_peft_model(tiny_causal_lm("llama", vocab_size=320), config)
    single = estimate_output_covariance(model, forget, retain, pooling="token", show_progress=False)
    for r in range(2):
        sums = load_file(str(tmp_path / f"cov_rank{r}.safetensors"))
        assert sums["counts"].tolist() == [single.f_count, single.r_count]
        for name in single.names:
            torch.testing.assert_close(sums[f"f.{name}"], single.forget[name], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sums[f"r.{name}"], single.retain[name], rtol=1e-5, atol=1e-5)
    initialize_rila_weights(model, covariance=single, show_progress=False)

    init = load_file(str(tmp_path / "init.safetensors"))
    single_init = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(init) == len(single_init) == 2 * len(targets) * 2
    for key in [k for k in single_init if ".lora_A." in k]:  # products: eigenvector signs could differ
        b_key = key.replace(".lora_A.", ".lora_B.")
        torch.testing.assert_close(
            init[b_key] @ init[key], single_init[b_key] @ single_init[key], atol=1e-5, rtol=1e-4
        )

    model.train()  # the same step in one process: the ranks' losses averaged (FSDP's gradient averaging)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ((model(**forget[0]).loss + model(**forget[1]).loss) / 2).backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "single")
    sharded = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert sharded.keys() == expected.keys() and len(expected) == 2 * 2 * len(targets)
    # rank 2r: [A; A0] and [B | -B0], so B_full A_full = B A - B0 A0, the trained update (compared as a product:
    # close eigenvalues let rounding rotate Q inside their eigenspace, which changes the factors, not the product)
    for key in [k for k in expected if ".lora_A." in k]:
        b_key = key.replace(".lora_A.", ".lora_B.")
        update = expected[b_key] @ expected[key]
        assert update.abs().max() > 1e-4  # the step moved the adapter
        error = ((sharded[b_key] @ sharded[key] - update).norm() / update.norm()).item()
        assert error < 1e-2, (key, error)  # Adam is per coordinate, so a rotated Q moves the update by ~rounding
