"""GPU check: FILA on the bases practitioners use, on one CUDA device (about 5 minutes on an H100/H200).

Checks, each recorded as ``ok`` / ``failed`` (with the error) so one failure does not hide the others:

1. ``bf16_fila_ihl``: Gemma-3 270M in bf16; Fisher statistics are fp32 and finite; FILA init; the model
   output at init equals the base's (max |logit difference| recorded); a few IHL + retain NLL steps with
   `UnlearningTrainer` (bf16) keep the loss finite and change the adapter.
2. ``qlora_4bit_fila``: the same model loaded in 4-bit nf4 (bitsandbytes, bf16 compute) after
   `prepare_model_for_kbit_training`; FILA init; finite statistics; a few IHL steps.
3. ``low_memory_fisher``: peak `torch.cuda.max_memory_allocated` above the loaded model of the Fisher pass
   with accumulators on the GPU, with ``accumulator_device="cpu"``, with ``layers_per_pass``, and of one
   unlearning step of default LoRA; the statistics of the three modes are compared.
4. ``fused_loss_memory``: the step of ``benchmarks/fused_loss_memory.py`` (IHL + NLL, LoRA r=8) on a Gemma-3-shaped
   random model (vocabulary 262,144, hidden 640 as Gemma-3 270M, 2 layers, bf16) at 8 x 512 and 8 x 2048 tokens,
   fused vs full logits: peak `torch.cuda.max_memory_allocated` above the model and time per step (one warm-up, two
   timed steps); a step that runs out of GPU memory is recorded as not fitting.

Results: ``benchmarks/results/gpu_check.{json,md}`` (the exact command is recorded).

Without CUDA the script prints a message and exits with status 0. ``--device cpu --smoke`` runs every check
on tiny random models on the CPU (what can be verified without a GPU; results go to a temporary folder unless
``--results`` is given).

Usage::

    python benchmarks/gpu_check.py                          # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --smoke     # plumbing check anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import common

DEFAULT_RESULTS = common.RESULTS / "gpu_check.json"


# ----------------------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace, quantized: bool = False) -> tuple[Any, Any]:
    """Gemma-3 270M (or a tiny Llama with --smoke) in bf16, optionally 4-bit nf4."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_unlearn.models import load_model_and_tokenizer
    from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer

    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        if quantized
        else None
    )
    kwargs: dict[str, Any] = {}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": 0} if args.device == "cuda" else args.device)
    if args.smoke:
        tokenizer = tiny_tokenizer()
        folder = Path(args.workdir) / "tiny"
        if not folder.is_dir():
            tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.bfloat16, show_progress=False, **kwargs)
    if quant is None:
        model.to(args.device)
    return model.eval(), tokenizer


def _batches(tokenizer: Any, texts: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for i in range(0, len(texts), args.batch_size):
        enc = tokenizer(
            texts[i : i + args.batch_size],
            padding=True,
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out[: args.batches]


def _forget_retain(tokenizer: Any, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The forget and the retain batches, on ``args.device``."""
    forget, retain = (_batches(tokenizer, common.read_texts(name), args) for name in ("forget.jsonl", "retain.jsonl"))
    return [_to(b, args.device) for b in forget], [_to(b, args.device) for b in retain]


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def _finite_fp32(stats: Any) -> bool:
    import torch

    tensors = list(stats.importance_f.values()) + list(stats.importance_r.values())
    return all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in tensors)


def _train(model: Any, tokenizer: Any, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """A few IHL + retain NLL steps with UnlearningTrainer on the already-initialised PeftModel."""
    from datasets import Dataset

    from peft_unlearn import UnlearningConfig, UnlearningTrainer

    config = UnlearningConfig(
        output_dir=str(Path(args.workdir) / "train"),
        forget_loss="inverted_hinge",
        retain_loss="nll",
        learning_rate=1e-4,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = UnlearningTrainer(
        model=model,
        args=config,
        forget_dataset=Dataset.from_dict(
            {"text": common.read_texts("forget.jsonl")[: args.batch_size * args.batches]}
        ),
        retain_dataset=Dataset.from_dict(
            {"text": common.read_texts("retain.jsonl")[: args.batch_size * args.batches]}
        ),
        processing_class=tokenizer,
    )
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    changed = any(not (p.detach().float() == before[n]).all() for n, p in model.named_parameters() if n in before)
    return {"losses": losses, "finite_loss": all(map(_is_finite, losses)), "adapter_changed": bool(changed)}


def _is_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def check_bf16_fila_ihl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from peft_unlearn import estimate_fisher, initialize_fila_weights

    model, tokenizer = _load(args)
    forget, retain = _forget_retain(tokenizer, args)
    with torch.no_grad():
        base_logits = model(input_ids=forget[0]["input_ids"], attention_mask=forget[0]["attention_mask"]).logits
    peft_model = get_peft_model(model, LoraConfig(**common.lora_kwargs(8), init_lora_weights="fila"))
    with common.PeakMemory(args.device, host=False) as fisher_peak:
        stats = estimate_fisher(peft_model, forget, retain, show_progress=False)
    init = initialize_fila_weights(peft_model, fisher=stats, show_progress=False)
    with torch.no_grad():
        logits = peft_model(input_ids=forget[0]["input_ids"], attention_mask=forget[0]["attention_mask"]).logits
    mask = forget[0]["attention_mask"].bool()
    diff = float((logits.float() - base_logits.float())[mask].abs().max())
    scale = float(base_logits.float()[mask].abs().max())
    train = _train(peft_model, tokenizer, args, steps=args.steps)
    ok = _finite_fp32(stats) and train["finite_loss"] and train["adapter_changed"]
    return {
        "ok": bool(ok),
        "fisher_fp32_finite": _finite_fp32(stats),
        "fisher_peak_bytes": fisher_peak.delta,
        "fisher_seconds": fisher_peak.seconds,
        "init_seconds": init.get("seconds"),
        "init_max_abs_logit_diff": diff,
        "base_max_abs_logit": scale,
        **train,
    }


def check_qlora_4bit_fila(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from peft_unlearn import estimate_fisher, initialize_fila_weights

    model, tokenizer = _load(args, quantized=True)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    forget, retain = _forget_retain(tokenizer, args)
    peft_model = get_peft_model(model, LoraConfig(**common.lora_kwargs(8), init_lora_weights="fila"))
    with common.PeakMemory(args.device, host=False) as fisher_peak:
        stats = estimate_fisher(peft_model, forget, retain, show_progress=False, accumulator_device="cpu")
    result: dict[str, Any] = {
        "fisher_fp32_finite": _finite_fp32(stats),
        "fisher_peak_bytes": fisher_peak.delta,
        "fisher_seconds": fisher_peak.seconds,
    }
    init = initialize_fila_weights(peft_model, fisher=stats, show_progress=False)
    result["init_seconds"] = init.get("seconds")
    result.update(_train(peft_model, tokenizer, args, steps=args.steps))
    result["ok"] = bool(result["fisher_fp32_finite"] and result["finite_loss"] and result["adapter_changed"])
    return result


def check_low_memory_fisher(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from peft_unlearn import estimate_fisher

    model, tokenizer = _load(args)
    forget, retain = _forget_retain(tokenizer, args)
    peft_model = get_peft_model(model, LoraConfig(**common.lora_kwargs(8)))
    layers = list(common.lora_layers(peft_model).values())
    num_layers = len(layers)
    target_params = sum(m.get_base_layer().weight.numel() for m in layers)
    modes = {
        "default": {},
        "accumulator_device_cpu": {"accumulator_device": "cpu"},
        "layers_per_pass": {"layers_per_pass": max(1, num_layers // 4), "accumulator_device": "cpu"},
    }
    out: dict[str, Any] = {"target_params": target_params, "modes": {}}
    reference = None
    for mode, kwargs in modes.items():
        with common.PeakMemory(args.device, host=False) as peak:
            stats = estimate_fisher(peft_model, forget, retain, show_progress=False, **kwargs)
        stats = stats.to("cpu")
        entry = {"peak_bytes": peak.delta, "seconds": peak.seconds, "finite": _finite_fp32(stats)}
        if reference is None:
            reference = stats
        else:
            entry["max_rel_diff_vs_default"] = max(
                float(
                    (stats.importance_f[n] - reference.importance_f[n]).abs().max()
                    / reference.importance_f[n].abs().max()
                )
                for n in reference.names
            )
        out["modes"][mode] = entry
        del stats
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    with common.PeakMemory(args.device, host=False) as peak:
        common.ihl_nll_step(peft_model, optimizer, forget[0], retain[0])
    out["lora_step"] = {"peak_bytes": peak.delta, "seconds": peak.seconds}
    low = out["modes"]["accumulator_device_cpu"]["peak_bytes"]
    out["low_memory_below_lora_step"] = None if low is None else bool(low <= peak.delta)
    # statistics identical up to the GPU/CPU difference of the fused multiply-add
    out["ok"] = all(m["finite"] for m in out["modes"].values()) and all(
        m.get("max_rel_diff_vs_default", 0.0) < 1e-5 for m in out["modes"].values()
    )
    return out


def check_fused_loss_memory(args: argparse.Namespace) -> dict[str, Any]:
    import fused_loss_memory as flm
    import torch

    spec = {"vocab": 262_144, "hidden": 640, "layers": 2, "dtype": "bfloat16", "device": args.device, "seq": 2048}
    sizes = ("8x512", "8x2048")
    if args.smoke:
        spec.update(vocab=4096, hidden=64, layers=1, seq=64)
        sizes = ("2x32", "2x64")
    oom = (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError)
    out: dict[str, Any] = {"model": spec, "cases": {}}
    for fused in (True, False):
        model = flm.build_model(spec)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        flm.unlearning_step(model, optimizer, flm._inputs(spec, 1, 32), fused, None)  # warm-up
        for size in sizes:
            batch, seq = flm.parse_size(size)
            inputs = flm._inputs(spec, batch, seq)
            entry: dict[str, Any] = {"steps": []}
            try:
                flm.unlearning_step(model, optimizer, inputs, fused, None)  # warm-up at this size
                for _ in range(2):
                    with common.PeakMemory(args.device, host=False) as peak:
                        loss = flm.unlearning_step(model, optimizer, inputs, fused, None)
                    entry["steps"].append({"peak_bytes": peak.delta, "seconds": peak.seconds, "loss": loss})
                entry["fits"] = True
            except oom as err:
                if not flm._is_oom(err):
                    raise
                optimizer.zero_grad(set_to_none=True)
                entry.update(fits=False, error=f"{type(err).__name__}: {str(err)[:200]}")
            out["cases"][flm.case_key(size, fused)] = entry
            del inputs
            if args.device == "cuda":
                torch.cuda.empty_cache()
        del model, optimizer
    out["ok"] = all(
        c["fits"] and all(math.isfinite(s["loss"]) for s in c["steps"])
        for k, c in out["cases"].items()
        if k.endswith("/fused")
    )
    return out


CHECKS = {
    "bf16_fila_ihl": check_bf16_fila_ihl,
    "qlora_4bit_fila": check_qlora_4bit_fila,
    "low_memory_fisher": check_low_memory_fisher,
    "fused_loss_memory": check_fused_loss_memory,
}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _gib(value: Any) -> str:
    return "n/a (CPU)" if value is None else f"{value / common.GIB:.2f} GiB"


def write_report(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# GPU check",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Device: {data['device_name']}; torch {data['torch']}; {data['total_seconds']:.0f} s in all.",
        "",
        "| check | status | details |",
        "|---|---|---|",
    ]
    for name, result in data["checks"].items():
        if "error" in result:
            lines.append(f"| `{name}` | failed | `{result['error'].splitlines()[-1][:150]}` |")
            continue
        details = []
        if "fisher_peak_bytes" in result:
            details.append(f"Fisher peak {_gib(result['fisher_peak_bytes'])}")
        if "init_max_abs_logit_diff" in result:
            details.append(
                f"init max abs logit diff {result['init_max_abs_logit_diff']:.3g} (logits up to "
                f"{result['base_max_abs_logit']:.3g})"
            )
        if "losses" in result:
            details.append(f"losses {', '.join(f'{x:.3f}' for x in result['losses'])}")
        for mode, entry in result.get("modes", {}).items():
            details.append(f"{mode}: {_gib(entry['peak_bytes'])}")
        if "lora_step" in result:
            details.append(f"LoRA step: {_gib(result['lora_step']['peak_bytes'])}")
        for case, entry in result.get("cases", {}).items():
            if not entry.get("fits"):
                details.append(f"{case}: does not fit")
                continue
            peak = max((s["peak_bytes"] for s in entry["steps"]), default=None, key=lambda x: x or 0)
            secs = sum(s["seconds"] for s in entry["steps"]) / max(len(entry["steps"]), 1)
            details.append(f"{case}: {_gib(peak)}, {secs:.2f} s/step")
        lines.append(f"| `{name}` | {'ok' if result.get('ok') else 'FAILED'} | {'; '.join(details)} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny random models (plumbing check)")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checks", nargs="*", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is available; nothing to check here (use --device cpu --smoke for a CPU run)."
        )
        return 0
    warnings.filterwarnings("ignore", category=UserWarning)
    args.workdir = tempfile.mkdtemp(prefix="peft_unlearn_gpu_check_")
    results = args.results or (Path(args.workdir) / "gpu_check.json" if args.smoke else DEFAULT_RESULTS)
    if args.smoke:
        args.batch_size, args.batches, args.max_length, args.steps = 2, 2, 32, 2

    start = time.perf_counter()
    data: dict[str, Any] = {
        "command": common.command_line(__file__, argv),
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "checks": {},
    }
    for name in args.checks:
        t0 = time.perf_counter()
        try:
            data["checks"][name] = CHECKS[name](args)
        except Exception:  # record and continue: one failing base must not hide the others
            data["checks"][name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
        data["checks"][name]["check_seconds"] = time.perf_counter() - t0
        status = "ok" if data["checks"][name].get("ok") else "FAILED"
        print(f"{name}: {status} ({data['checks'][name]['check_seconds']:.1f} s)", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        data["total_seconds"] = time.perf_counter() - start
        write_report(data, results)
    print(f"results: {results} and {results.with_suffix('.md')}")
    return 0 if all(c.get("ok") for c in data["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
