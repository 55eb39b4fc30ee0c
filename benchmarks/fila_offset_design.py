"""Design trial: where should the frozen offset ``- s * B0 (A0 x)`` of a data-driven adapter live?

Three implementations of the same function ``y = W x + s * B (A drop(x)) - s * B0 (A0 x)`` on tiny models:

* ``hook`` (today's `peft_unlearn.fila.offset`): non-persistent buffers beside PEFT, a forward hook on each LoRA
  layer, a class patch of ``get_delta_weight`` for merging, and the ``_fila_init/`` sidecar for raw saves.
* ``variant``: a PEFT ``LoraVariant`` (PEFT's mechanism for DoRA and friends) that owns the offset: its ``init``
  registers persistent ``lora_offset_A``/``lora_offset_B`` buffers, its ``forward`` and ``merge_*``/``unmerge``
  subtract the offset. Here it is attached to the layers by hand after ``get_peft_model`` (what
  ``LoraLayer.resolve_lora_variant`` would do if the variant were registered for ``init_lora_weights="fila"``).
* ``adapter``: a second, frozen LoRA adapter ``<name>_offset`` with ``A = A0``, ``B = -B0``, dropout 0, active
  together with the trained one (``base_model.set_adapter([name, name + "_offset"])``), so that PEFT itself
  forwards, merges and saves it.

For each, and for plain LoRA as the baseline, it measures: the training-step time (median of interleaved steps,
one thread), the output at init against the base, ``merge_and_unload`` against the unmerged model after one
step, a save with PEFT's ``save_pretrained`` and a reload in a fresh model, an nf4 4-bit base (bitsandbytes on
CPU), a mixed batch (``adapter_names=["default", "__base__"]``) and FSDP2 (two gloo ranks, ``fully_shard``): the
loss and the output of one step against one process.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/fila_offset_design.py            # about a minute on 2 CPU cores
    python benchmarks/fila_offset_design.py --steps 4 --skip-fsdp        # smoke run

Writes ``benchmarks/results/fila_offset_design.json`` (the design notes are in ``fila_offset_design.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peft_unlearn  # noqa: E402, F401  (the hook design needs the registered init)
from peft_unlearn.fila.offset import set_offset  # noqa: E402
from peft_unlearn.fila.state import iter_lora_layers  # noqa: E402
from peft_unlearn.testing import tiny_causal_lm  # noqa: E402

DESIGNS = ("lora", "hook", "variant", "adapter")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4
VOCAB = 320


# ----------------------------------------------------------------------------------------------------------------
# the two candidate designs
# ----------------------------------------------------------------------------------------------------------------


class OffsetVariant(LoraVariant):
    """A LoraVariant that subtracts the frozen initial product ``s * B0 A0`` (forward, merge, unmerge)."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        if "lora_offset_A" not in module._modules:
            module.lora_offset_A = BufferDict(persistent=True)
            module.lora_offset_B = BufferDict(persistent=True)
        module.lora_offset_A[adapter_name] = module.lora_A[adapter_name].weight.detach().clone()
        module.lora_offset_B[adapter_name] = module.lora_B[adapter_name].weight.detach().clone()

    @staticmethod
    def _offset_delta(module: LoraLayer, adapter: str, like: torch.Tensor) -> torch.Tensor:
        a0 = module.lora_offset_A[adapter].to(like.device, torch.float32)
        b0 = module.lora_offset_B[adapter].to(like.device, torch.float32)
        product = b0 @ a0
        if module.fan_in_fan_out:
            product = product.T
        return (product * module.scaling[adapter]).to(like.dtype)

    @staticmethod
    def _delta(module: LoraLayer, adapter: str, like: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(adapter).to(like.dtype)
        return delta - OffsetVariant._offset_delta(module, adapter, like)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + OffsetVariant._delta(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += OffsetVariant._delta(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - OffsetVariant._delta(module, active_adapter, orig_weight)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        a0 = module.lora_offset_A[active_adapter].to(x.dtype)
        b0 = module.lora_offset_B[active_adapter].to(x.dtype)
        trained = lora_b(lora_a(module.lora_dropout[active_adapter](x)))
        return result + (trained - F.linear(F.linear(x, a0), b0)) * scaling


def _attach_variant(model, adapter: str = "default") -> None:
    for _, layer in iter_lora_layers(model, adapter):
        layer.lora_variant[adapter] = OffsetVariant()
        OffsetVariant.init(layer, adapter)


def _attach_adapter(model, adapter: str = "default", values: bool = True) -> None:
    config = model.peft_config[adapter]
    offset = LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules, lora_dropout=0.0
    )
    model.add_adapter(f"{adapter}_offset", offset)
    if values:
        with torch.no_grad():
            for _, layer in iter_lora_layers(model, adapter):
                layer.lora_A[f"{adapter}_offset"].weight.copy_(layer.lora_A[adapter].weight)
                layer.lora_B[f"{adapter}_offset"].weight.copy_(-layer.lora_B[adapter].weight)
    _activate_adapter_pair(model, adapter)


def _activate_adapter_pair(model, adapter: str = "default") -> None:
    model.base_model.set_adapter([adapter, f"{adapter}_offset"])  # marks both trainable: freeze the offset again
    for name, param in model.named_parameters():
        if f".{adapter}_offset." in name:
            param.requires_grad_(False)


def _attach_hook(model, adapter: str = "default") -> None:
    for _, layer in iter_lora_layers(model, adapter):
        set_offset(layer, adapter, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)


# ----------------------------------------------------------------------------------------------------------------
# building the models
# ----------------------------------------------------------------------------------------------------------------


def _random_init(model, adapter: str = "default", seed: int = 1) -> None:
    """Non-zero A_init, B_init (the data-driven init's job), the same for every design."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model, adapter):
            for param in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _base(hidden: int = 64, quantized: bool = False, path: Path | None = None):
    if not quantized:
        return tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=hidden, seed=0)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)


def build(design: str, base=None, hidden: int = 64, dropout: float = 0.0):
    base = base if base is not None else _base(hidden)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=dropout)
    model = get_peft_model(base, config)
    if design != "lora":
        _random_init(model)
        {"hook": _attach_hook, "variant": _attach_variant, "adapter": _attach_adapter}[design](model)
    return model


def _ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def _train_step(model, ids, lr: float = 1e-2) -> float:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# the measurements
# ----------------------------------------------------------------------------------------------------------------


def step_times(steps: int, hidden: int, length: int) -> dict[str, float]:
    """Median training-step time per design (ms), steps interleaved so that machine noise hits all alike."""
    models = {d: build(d, hidden=hidden, dropout=0.1) for d in DESIGNS}
    optimizers = {
        d: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for d, m in models.items()
    }
    ids = _ids(4, length)
    times: dict[str, list[float]] = {d: [] for d in DESIGNS}
    for step in range(steps + 3):
        for design, model in models.items():
            model.train()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizers[design].step()
            optimizers[design].zero_grad()
            if step >= 3:  # warm-up
                times[design].append((time.perf_counter() - start) * 1e3)
    return {d: statistics.median(t) for d, t in times.items()}


def correctness(design: str) -> dict[str, float | str | None]:
    ids = _ids()
    base_logits = _logits(_base(), ids)
    model = build(design)
    out: dict[str, float | str | None] = {"init_vs_base": _diff(_logits(model, ids), base_logits)}
    _train_step(model, ids)
    trained = _logits(model, ids)
    # mixed batch: row 0 uses the adapter, row 1 the base model
    mixed = _logits(model, ids, adapter_names=["default", "__base__"])
    with model.disable_adapter():
        base_now = _logits(model, ids)
    out["mixed_batch_vs_expected"] = max(_diff(mixed[0], trained[0]), _diff(mixed[1], base_now[1]))
    # save with PEFT's own save_pretrained, reload in a fresh process-like model
    with tempfile.TemporaryDirectory() as folder:
        kwargs = {"fila_portable": False} if design == "hook" else {}
        if design == "hook":  # the raw format needs the registered init name and the _fila_init/ sidecar
            model.peft_config["default"].init_lora_weights = "fila"
        model.save_pretrained(folder, **kwargs)
        files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        out["saved_files"] = ", ".join(f for f in files if not f.endswith("README.md"))
        from safetensors.torch import load_file

        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        out["offset_tensors_in_adapter_file"] = sum("lora_offset_" in k for k in saved)
        out["resume_vs_trained"] = _resume(design, folder, ids, trained)
    merged = _logits(model.merge_and_unload(), ids)
    out["merge_and_unload_vs_trained"] = _diff(merged, trained)
    return out


def _resume(design: str, folder: str, ids: torch.Tensor, trained: torch.Tensor) -> float | str:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        if design == "hook":
            from peft_unlearn.fila.saving import restore_fila_state

            fresh = PeftModel.from_pretrained(_base(), folder)
            restore_fila_state(fresh, folder)
        elif design == "variant":
            # what PEFT does for a registered variant: the layer gets the variant (and its buffers) at injection
            fresh = get_peft_model(_base(), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS))
            _attach_variant(fresh)
            state = load_file(os.path.join(folder, "adapter_model.safetensors"))
            result = set_peft_model_state_dict(fresh, state)
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            if unexpected:
                return f"unexpected keys {unexpected[:2]}"
        elif design == "adapter":
            fresh = PeftModel.from_pretrained(_base(), folder)
            fresh.load_adapter(os.path.join(folder, "default_offset"), "default_offset")
            _activate_adapter_pair(fresh)
        else:
            fresh = PeftModel.from_pretrained(_base(), folder)
        return _diff(_logits(fresh.eval(), ids), trained)
    except Exception as error:  # noqa: BLE001 - the trial records what fails
        return f"{type(error).__name__}: {str(error)[:120]}"


def quantized(design: str, base_dir: Path) -> dict[str, float | str]:
    try:
        ids = _ids()
        base_logits = _logits(_base(quantized=True, path=base_dir), ids)
        model = build(design, base=_base(quantized=True, path=base_dir))
        out: dict[str, float | str] = {"nf4_init_vs_base": _diff(_logits(model.train(), ids), base_logits)}
        _train_step(model, ids)
        out["nf4_step"] = "ok"
        return out
    except Exception as error:  # noqa: BLE001
        return {"nf4_init_vs_base": f"{type(error).__name__}: {str(error)[:120]}"}


_FSDP_WORKER = """
import os, sys, json
import torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, sys.argv[3])
import fila_offset_design as trial
from torch.distributed.fsdp import fully_shard

def worker(rank, world, out_dir, design):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rdv"), rank=rank, world_size=world)
    model = trial.build(design)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = trial._ids()
    init = trial._logits(model, ids)
    loss = trial._train_step(model, ids)
    after = trial._logits(model, ids)
    if rank == 0:
        torch.save({"init": init, "loss": loss, "after": after}, os.path.join(out_dir, "fsdp.pt"))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.start_processes(worker, args=(2, sys.argv[1], sys.argv[2]), nprocs=2, join=True, start_method="fork")
"""


def fsdp(design: str) -> dict[str, float | str]:
    import subprocess

    ids = _ids()
    single = build(design)
    init = _logits(single, ids)
    loss = _train_step(single, ids)
    after = _logits(single, ids)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "worker.py"
        script.write_text(_FSDP_WORKER)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(
            [sys.executable, str(script), folder, design, str(Path(__file__).parent)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if run.returncode != 0:
            return {"fsdp2": f"failed: {run.stderr.strip().splitlines()[-1][:160]}"}
        got = torch.load(Path(folder) / "fsdp.pt")
    return {
        "fsdp2_init_vs_single": _diff(got["init"], init),
        "fsdp2_loss_vs_single": abs(got["loss"] - loss),
        "fsdp2_after_step_vs_single": _diff(got["after"], after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--skip-fsdp", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fila_offset_design.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results: dict[str, dict] = {d: {} for d in DESIGNS}
    times = step_times(args.steps, args.hidden, args.length)
    for design in DESIGNS:
        results[design]["step_ms"] = round(times[design], 2)
        results[design]["step_vs_lora"] = round(times[design] / times["lora"], 3)
    with tempfile.TemporaryDirectory() as folder:
        base_dir = Path(folder) / "base"
        _base().save_pretrained(base_dir)
        for design in DESIGNS:
            results[design].update(correctness(design))
            results[design].update(quantized(design, base_dir))
            if not args.skip_fsdp:
                results[design].update(fsdp(design))
            print(design, json.dumps(results[design]), flush=True)
    meta = {
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "step_model": f"tiny llama, hidden {args.hidden}, 7 targets x 2 layers, r={RANK}, batch 4 x {args.length}",
        "steps": args.steps,
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
