"""Two CPU processes (gloo): Fisher statistics are all-reduced and every rank computes the same FILA init."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import peft_unlearn  # noqa: F401
from peft_unlearn.fila import FisherStatistics, estimate_fisher, initialize_fila_weights
from peft_unlearn.testing import random_lm_batches, tiny_causal_lm
from tests.helpers import run_python

VOCAB = 320
NUM_BATCHES = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp


    from peft_unlearn.testing import random_lm_batches as batches


    def worker(rank, world_size, out_dir):
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"), rank=rank, world_size=world_size
        )

        forget = batches(NUM_BATCHES, 1)[rank::world_size]  # each rank sees its own shard
        retain = batches(NUM_BATCHES, 2)[rank::world_size]
        model = get_peft_model(
            tiny_causal_lm("llama", vocab_size=320),
            LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="fila"),
        )
        stats = estimate_fisher(model, forget, retain, show_progress=False)
        stats.save(os.path.join(out_dir, f"fisher_rank{rank}.safetensors"))
        info = initialize_fila_weights(model, forget, retain, show_progress=False)
        assert info["num_batches"] == NUM_BATCHES, info
        tensors = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                tensors[name + ".A"] = module.lora_A["default"].weight.detach().contiguous()
                tensors[name + ".B"] = module.lora_B["default"].weight.detach().contiguous()
                tensors[name + ".W"] = module.get_base_layer().weight.detach().contiguous()
        save_file(tensors, os.path.join(out_dir, f"init_rank{rank}.safetensors"))
        dist.barrier()
        dist.destroy_process_group()


    # imported once in the parent; the ranks are forked from it (much cheaper than re-importing per rank)
    import peft_unlearn  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from peft_unlearn.fila import estimate_fisher, initialize_fila_weights
    from peft_unlearn.testing import random_lm_batches, tiny_causal_lm

    NUM_BATCHES = int(sys.argv[2])
    TARGETS = sys.argv[3].split(",")

    if __name__ == "__main__":
        torch.set_num_threads(1)
        mp.start_processes(worker, args=(2, sys.argv[1]), nprocs=2, join=True, start_method="fork")
        print("DIST_OK")
    """
)


def _batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return random_lm_batches(n, seed=seed, vocab_size=VOCAB)


@pytest.mark.distributed
def test_two_gloo_ranks_get_identical_statistics_and_init(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_python([script, tmp_path, NUM_BATCHES, ",".join(TARGETS)], cwd=tmp_path, expect="DIST_OK")

    # single process over all the data (the same paired batches, in another order)
    forget, retain = _batches(NUM_BATCHES, 1), _batches(NUM_BATCHES, 2)
    model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=VOCAB),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="fila"),
    )
    single = estimate_fisher(model, forget, retain, show_progress=False)
    initialize_fila_weights(model, fisher=single, show_progress=False)

    ranks = [FisherStatistics.load(tmp_path / f"fisher_rank{r}.safetensors") for r in range(2)]
    for stats in ranks:
        assert (stats.f_count, stats.r_count, stats.num_batches) == (single.f_count, single.r_count, NUM_BATCHES)
        assert sorted(stats.names) == sorted(single.names)
        for name in single.names:
            torch.testing.assert_close(stats.importance_f[name], single.importance_f[name], rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(stats.importance_r[name], single.importance_r[name], rtol=1e-5, atol=1e-12)
    for name in single.names:  # bitwise identical on both ranks
        assert torch.equal(ranks[0].importance_f[name], ranks[1].importance_f[name])
        assert torch.equal(ranks[0].importance_r[name], ranks[1].importance_r[name])

    inits = [load_file(str(tmp_path / f"init_rank{r}.safetensors")) for r in range(2)]
    assert inits[0].keys() == inits[1].keys() and len(inits[0]) == 3 * 2 * len(TARGETS)
    for key in inits[0]:
        assert torch.equal(inits[0][key], inits[1][key]), key
    modules = dict(model.named_modules())
    for key in [k for k in inits[0] if k.endswith(".A")]:
        name = key[: -len(".A")]
        layer = modules[name]
        product = inits[0][name + ".B"] @ inits[0][key]  # singular-vector signs may differ: compare products
        expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(product, expected, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(inits[0][name + ".W"], layer.get_base_layer().weight, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (fully_shard) on CPU with gloo: sharded DTensor weights
# ---------------------------------------------------------------------------------------------------------------

FSDP_WORKER = textwrap.dedent(
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
        forget = random_lm_batches(NUM_BATCHES, 1)[rank::world_size]
        retain = random_lm_batches(NUM_BATCHES, 2)[rank::world_size]
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="fila")
        model = get_peft_model(tiny_causal_lm("llama", vocab_size=320), config)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer.weight, DTensor) and isinstance(q_proj.lora_A["default"].weight, DTensor)

        # Fisher statistics from layer hooks on sharded weights, then the FILA init of the sharded adapter
        stats = estimate_fisher(model, forget, retain, show_progress=False)
        stats.save(os.path.join(out_dir, f"fisher_rank{rank}.safetensors"))
        assert all(p.grad is None for p in model.parameters())
        initialize_fila_weights(model, fisher=stats, show_progress=False)
        assert pending_data_driven_adapters(model) == []
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        init = {k: v for k, v in full.items() if "lora_" in k}
        dense = {"q_proj.weight": dense_weight(q_proj.base_layer)}

        # one training step (gradients averaged over the ranks by FSDP)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = model(**forget[0]).loss
        loss.backward()
        optimizer.step()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        lora = {k: v for k, v in full.items() if "lora_" in k}
        if rank == 0:
            save_file(dense, os.path.join(out_dir, "dense.safetensors"))
            save_file(init, os.path.join(out_dir, "init.safetensors"))
            model.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=lora)  # the portable adapter
        dist.barrier()
        dist.destroy_process_group()


    import peft_unlearn  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from peft_unlearn.fila import estimate_fisher, initialize_fila_weights, pending_data_driven_adapters
    from peft_unlearn.fila.state import dense_weight
    from peft_unlearn.testing import random_lm_batches, tiny_causal_lm

    NUM_BATCHES = int(sys.argv[2])
    TARGETS = sys.argv[3].split(",")

    if __name__ == "__main__":
        torch.set_num_threads(1)
        mp.start_processes(worker, args=(2, sys.argv[1]), nprocs=2, join=True, start_method="fork")
        print("DIST_OK")
    """
)


@pytest.mark.distributed
def test_fsdp2_sharded_fila_init_step_and_portable_adapter(tmp_path):
    """Under FSDP2 (2 gloo ranks, DTensor weights) the Fisher statistics, the FILA init, one training step and the
    saved portable adapter equal the single-process run on the union of the ranks' data."""
    pytest.importorskip("torch.distributed.fsdp")
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    run_python([script, tmp_path, NUM_BATCHES, ",".join(TARGETS)], cwd=tmp_path, expect="DIST_OK")

    forget, retain = _batches(NUM_BATCHES, 1), _batches(NUM_BATCHES, 2)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="fila")
    model = get_peft_model(tiny_causal_lm("llama", vocab_size=VOCAB), config)
    original = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    single = estimate_fisher(model, forget, retain, show_progress=False)
    for r in range(2):
        stats = FisherStatistics.load(tmp_path / f"fisher_rank{r}.safetensors")
        assert (stats.f_count, stats.r_count, stats.num_batches) == (single.f_count, single.r_count, NUM_BATCHES)
        for name in single.names:
            torch.testing.assert_close(stats.importance_f[name], single.importance_f[name], rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(stats.importance_r[name], single.importance_r[name], rtol=1e-5, atol=1e-12)
    initialize_fila_weights(model, fisher=single, show_progress=False)

    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    dense = load_file(str(tmp_path / "dense.safetensors"))
    assert torch.equal(dense["q_proj.weight"], q_proj.base_layer.weight.detach())

    # the sharded init equals the single-process init (products: singular-vector signs could differ)
    init = load_file(str(tmp_path / "init.safetensors"))
    single_init = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(init) == len(single_init) == 2 * len(TARGETS) * len(model.base_model.model.model.layers)
    for key in [k for k in single_init if ".lora_A." in k]:
        b_key = key.replace(".lora_A.", ".lora_B.")
        torch.testing.assert_close(
            init[b_key] @ init[key], single_init[b_key] @ single_init[key], atol=1e-5, rtol=1e-4
        )

    # the same step in one process: the ranks' losses averaged (what FSDP's gradient averaging computes)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = (model(**forget[0]).loss + model(**forget[1]).loss) / 2
    loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "single")
    sharded = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert sharded.keys() == expected.keys() and len(expected) == 2 * 2 * len(TARGETS)
    for key, value in expected.items():  # rank 2r: [A; A0] and [B | -B0]
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-5)
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == 8 and config_json["init_lora_weights"] is True
    # the base weights were never modified
    for key, value in model.get_base_model().state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key
