"""Peak memory of the FILA Fisher pass in each memory mode vs one unlearning step of default LoRA.

Model: Gemma-3 270M in bf16, LoRA r=8 on all seven projections of every block (126 target layers).
Every configuration runs in a fresh subprocess: load the model, wrap it with PEFT, warm up with one
no-grad forward, then measure the phase alone.

Measure. On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the phase. On CPU:
the process RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the phase)
minus the RSS before it. The CPU figure counts everything the process touches (allocator slack
included), so it is an upper bound of what the tensors need.

Configurations:

* ``lora_step``: one unlearning step with a default-initialised LoRA adapter: forget and retain batch
  forward, inverted hinge loss + retain NLL, one backward, one AdamW step (what `UnlearningTrainer` does).
* ``fisher_default``: `estimate_fisher` with the accumulators next to the weights.
* ``fisher_offload``: ``accumulator_device`` off the accelerator. On CUDA this is ``"cpu"`` (pinned host
  memory, measured on the GPU). On CPU the host *is* the device, so the run uses ``"meta"`` accumulators:
  they take no memory, which leaves exactly the part that would stay on the accelerator (activations,
  one layer gradient at a time).
* ``fisher_groups{G}``: the layers in G groups (``layers_per_pass``), one pass each, finished groups off
  the accelerator (``"meta"`` on CPU, ``"cpu"`` on CUDA).
* ``fila_init``: `estimate_fisher` (default mode) then `initialize_fila_weights(fisher=...)`: the whole
  FILA init including the weighted SVDs.

Then a projection for Llama-3-8B shapes (formula in the report), from the measured bytes.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/fila_memory.py                 # resumable: skips finished configs
    python benchmarks/fila_memory.py --report-only                     # rewrite .md/.png from the JSON
    python benchmarks/fila_memory.py --device cuda --results benchmarks/results/fila_memory_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import common

DEFAULT_RESULTS = common.RESULTS / "fila_memory.json"

# Llama-3-8B shapes for the projection
LLAMA3_8B = {
    "layers": 32,
    "hidden": 4096,
    "intermediate": 14336,
    "kv_heads": 8,
    "head_dim": 128,
    "vocab": 128256,
    "total_params": 8_030_261_248,
}


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this (fresh) process and return its measurement."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_unlearn
    from peft_unlearn import estimate_fisher, initialize_fila_weights
    from peft_unlearn.models import load_model_and_tokenizer
    from peft_unlearn.testing import random_lm_batches

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = spec["device"]
    model, _ = load_model_and_tokenizer(spec["model"], dtype=torch.bfloat16, device=device, show_progress=False)
    init = "fila" if spec["config"] == "fila_init" else True
    model = get_peft_model(model, LoraConfig(**common.lora_kwargs(8), init_lora_weights=init))
    vocab = model.get_input_embeddings().weight.shape[0]

    def batches(seed: int) -> list[dict[str, torch.Tensor]]:
        out = random_lm_batches(
            spec["batches"],
            seed=seed,
            vocab_size=vocab,
            batch_size=spec["batch_size"],
            seq_len=spec["seq_len"],
            prompt_len=spec["seq_len"] // 4,
        )
        return [{k: v.to(device) for k, v in b.items()} for b in out]

    forget, retain = batches(1), batches(2)
    with torch.no_grad():  # warm-up: lazy allocations of the first forward are not the phase's
        model(input_ids=forget[0]["input_ids"][:1, :16])
    target_params = sum(m.get_base_layer().weight.numel() for m in common.lora_layers(model).values())
    off = "meta" if device == "cpu" else "cpu"
    config = spec["config"]
    info: dict[str, Any] = {}
    with common.PeakMemory(device) as meter:
        if config == "lora_step":
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            loss = common.ihl_nll_step(model, optimizer, forget[0], retain[0])
            optimizer.zero_grad(set_to_none=True)
            info["loss"] = float(loss)
        elif config == "fisher_default":
            stats = estimate_fisher(model, forget, retain, show_progress=False)
        elif config == "fisher_offload":
            stats = estimate_fisher(model, forget, retain, show_progress=False, accumulator_device=off)
        elif config.startswith("fisher_groups"):
            groups = int(config[len("fisher_groups") :])
            per_pass = -(-len(common.PROJECTIONS) * model.config.num_hidden_layers // groups)
            stats = estimate_fisher(
                model, forget, retain, show_progress=False, layers_per_pass=per_pass, accumulator_device=off
            )
            info["layers_per_pass"] = per_pass
        elif config == "fila_init":
            stats = estimate_fisher(model, forget, retain, show_progress=False)
            initialize_fila_weights(model, fisher=stats, show_progress=False)
        else:
            raise ValueError(f"unknown config {config!r}")
    if config.startswith("fisher") and off != "meta":
        info["finite"] = bool(all(torch.isfinite(v).all() for v in stats.importance_f.values()))
    return {
        "config": config,
        "peak_delta_bytes": int(meter.delta),
        "before_bytes": int(meter.before),
        "seconds": meter.seconds,
        "target_params": int(target_params),
        "bytes_per_target_param": meter.delta / target_params,
        "tokens_per_batch": spec["batch_size"] * spec["seq_len"],
        "measure": "torch.cuda.max_memory_allocated" if device == "cuda" else "VmHWM (RSS high-water) delta",
        "peft_unlearn": peft_unlearn.__version__,
        "torch": torch.__version__,
        **info,
    }


# ----------------------------------------------------------------------------------------------
# projection
# ----------------------------------------------------------------------------------------------


def _llama_targets(shape: dict[str, int]) -> tuple[int, int]:
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv_heads"] * shape["head_dim"]
    per_layer = [h * h, kv * h, kv * h, h * h, i * h, i * h, h * i]
    return shape["layers"] * sum(per_layer), max(per_layer)


def project(results: dict[str, Any], spec: dict[str, Any], tokens: int = 1024) -> dict[str, Any]:
    """Projected peak accelerator memory of FILA init and a LoRA step for Llama-3-8B shapes.

    peak = weights + accumulators on the accelerator + activations, with
      accumulators = 8 B (two fp32) x target params x (share on the accelerator: 1, 0, or 1/G),
      activations = a x tokens x layers x hidden + c x tokens x vocab, with c = 10 B per logit for the Fisher
      pass (the model's own loss: bf16 logits, an fp32 copy, fp32 log-softmax and gradient) and c = 4 B for the
      LoRA step (bf16 logits and gradient; the library's IHL/NLL work in chunks), where the per-(token x layer x hidden) constant ``a`` is calibrated on the Gemma measurement of
      the same configuration (its accumulator and logits terms subtracted).
    """
    gemma = {"layers": 18, "hidden": 640, "vocab": 262144}
    target_params, biggest = _llama_targets(LLAMA3_8B)
    weights_bf16 = 2 * LLAMA3_8B["total_params"]
    # nf4 targets: 0.5 B + one fp32 absmax per 64 weights; everything else (embeddings, head, norms) in bf16
    weights_4bit = int(target_params * (0.5 + 4 / 64)) + 2 * (LLAMA3_8B["total_params"] - target_params)
    rows = {}
    g_tokens = spec["batch_size"] * spec["seq_len"]
    for config, result in results.items():
        if "peak_delta_bytes" not in result:
            continue
        g_targets = result["target_params"]
        share = 1.0 if config in ("fisher_default", "fila_init") else 0.0
        if config.startswith("fisher_groups"):
            share = 1.0 / int(config[len("fisher_groups") :])
        roles_tokens = 2 * g_tokens if config == "lora_step" else g_tokens  # both graphs alive in a LoRA step
        c = 4 if config == "lora_step" else 10
        logits = c * roles_tokens * gemma["vocab"]
        acc = 8 * g_targets * share
        a = max(0.0, (result["peak_delta_bytes"] - acc - logits) / (roles_tokens * gemma["layers"] * gemma["hidden"]))
        l_tokens = 2 * tokens if config == "lora_step" else tokens
        act = a * l_tokens * LLAMA3_8B["layers"] * LLAMA3_8B["hidden"] + c * l_tokens * LLAMA3_8B["vocab"]
        above = 8 * target_params * share + act + (4 * biggest if config != "lora_step" else 0)
        if config == "lora_step":  # LoRA r=8 params + grads + AdamW states (fp32), negligible
            above += 16 * 8 * LLAMA3_8B["layers"] * 2 * 9 * LLAMA3_8B["hidden"]
        rows[config] = {
            "activation_constant_bytes": a,
            "above_model_gib": above / common.GIB,
            "bf16_80gb_gib": (weights_bf16 + above) / common.GIB,
            "qlora_24gb_gib": (weights_4bit + above) / common.GIB,
        }
    return {
        "tokens_per_batch": tokens,
        "target_params": target_params,
        "weights_bf16_gib": weights_bf16 / common.GIB,
        "weights_4bit_gib": weights_4bit / common.GIB,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def report(data: dict[str, Any], json_path: Path) -> None:
    results = data["results"]
    spec = data["spec"]
    lines = [
        "# FILA init memory vs one unlearning step (Gemma-3 270M, bf16)",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Device: {spec['device']} ({data.get('machine', '')}); measure: "
        f"{next(iter(results.values()), {}).get('measure', '?')}; {spec['batches']} forget + {spec['batches']} retain "
        f"batches of {spec['batch_size']} x {spec['seq_len']} tokens; LoRA r=8 on {', '.join(common.PROJECTIONS)}; "
        f"{spec['threads']} thread(s). Each row is a fresh process.",
        "",
        "| configuration | peak above loaded model | bytes / target param | vs LoRA step | time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    lora = results.get("lora_step", {}).get("peak_delta_bytes")
    for config in data["order"]:
        r = results.get(config)
        if not r or "peak_delta_bytes" not in r:
            continue
        ratio = f"{r['peak_delta_bytes'] / lora:.2f}x" if lora else "n/a"
        lines.append(
            f"| `{config}` | {r['peak_delta_bytes'] / common.MIB:,.0f} MiB | {r['bytes_per_target_param']:.2f} | {ratio} | "
            f"{r['seconds']:.1f} |"
        )
    if spec["device"] == "cpu":
        lines += [
            "",
            "On CPU the host is the device: `fisher_offload` and `fisher_groups*` use `meta` accumulators, so the",
            "figure is the part that stays on the accelerator when the accumulators live in host memory (`cpu`) on",
            "a GPU machine. The host then holds 8 bytes per target parameter (two fp32 accumulators) on top.",
        ]
    proj = project(results, spec)
    lines += [
        "",
        "## Projection: Llama-3-8B shapes",
        "",
        f"32 layers, hidden 4096, intermediate 14336, 8 KV heads of 128, vocab 128256; all 7 projections targeted "
        f"({proj['target_params'] / 1e9:.2f} B target params); {proj['tokens_per_batch']} tokens per batch. "
        f"Weights: {proj['weights_bf16_gib']:.1f} GiB in bf16, {proj['weights_4bit_gib']:.1f} GiB with nf4 "
        "targets (embeddings, head and norms in bf16).",
        "",
        "Formula: peak = weights + 8 B x target params x s + a x tokens x layers x hidden + c x tokens x vocab "
        "(+ one fp32 layer gradient, 4 B x 14336 x 4096, for the Fisher), with s = 1 (default), 0 (offload) or 1/G "
        "(G groups), and a (bytes per token x layer x hidden) calibrated on the Gemma row above after subtracting "
        "its accumulator and logits terms; c = 10 B per logit for the Fisher pass (the model's own loss: bf16 logits, "
        "fp32 copy, fp32 log-softmax and gradient), 4 B for the LoRA step (the library's chunked IHL/NLL). A LoRA "
        "step has both the forget and the retain graph alive (2 x tokens).",
        "",
        "| configuration | a (B) | above model | bf16 on 80 GB | fits | QLoRA 4-bit on 24 GB | fits |",
        "|---|---:|---:|---:|:-:|---:|:-:|",
    ]
    for config in data["order"]:
        row = proj["rows"].get(config)
        if not row:
            continue
        lines.append(
            f"| `{config}` | {row['activation_constant_bytes']:.1f} | {row['above_model_gib']:.1f} GiB | "
            f"{row['bf16_80gb_gib']:.1f} GiB | {'yes' if row['bf16_80gb_gib'] < 80 * 1e9 / common.GIB else 'no'} | "
            f"{row['qlora_24gb_gib']:.1f} GiB | {'yes' if row['qlora_24gb_gib'] < 24 * 1e9 / common.GIB else 'no'} |"
        )
    lines += [
        "",
        "In the offload and group modes the host holds the finished accumulators: 8 B x target params = "
        f"{8 * proj['target_params'] / common.GIB:.0f} GiB of host RAM for these shapes.",
        "",
        "The projection is a one-point calibration of the activation term (CPU allocator, bf16); treat it as an",
        "estimate. `benchmarks/gpu_check.py` measures the low-memory mode with `torch.cuda.max_memory_allocated`.",
    ]
    data["projection"] = proj
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(data, json_path.with_suffix(".png"))


def _plot(data: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    configs = [c for c in data["order"] if "peak_delta_bytes" in data["results"].get(c, {})]
    if plt is None or not configs:
        return
    values = [data["results"][c]["peak_delta_bytes"] / common.MIB for c in configs]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = ["tab:gray" if c == "lora_step" else "tab:blue" for c in configs]
    ax.barh(configs, values, color=colors)
    lora = data["results"].get("lora_step", {}).get("peak_delta_bytes")
    if lora:
        ax.axvline(lora / common.MIB, color="tab:gray", linestyle="--", linewidth=1)
    ax.set_xlabel("peak memory above the loaded model (MiB)")
    ax.set_title(f"Gemma-3 270M bf16 ({data['spec']['device']}): FILA init vs one LoRA unlearning step")
    ax.invert_yaxis()
    common.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=1, help="forget (and retain) batches per Fisher pass")
    parser.add_argument("--groups", type=int, nargs="*", default=[3, 9])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--fresh", action="store_true", help="redo every configuration")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--timeout", type=int, default=3600)
    common.add_child_arguments(parser)
    args = parser.parse_args(argv)
    if common.run_as_child(args, run_config):
        return

    spec = {
        "model": args.model,
        "device": args.device,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "batches": args.batches,
        "threads": args.threads,
    }
    order = ["lora_step", "fisher_default", "fisher_offload", *[f"fisher_groups{g}" for g in args.groups], "fila_init"]
    data: dict[str, Any] = {}
    if args.results.is_file() and not args.fresh:
        data = json.loads(args.results.read_text())
        if data.get("spec") != spec:
            print(f"settings differ from {args.results}; starting over", file=sys.stderr)
            data = {}
    command = common.command_line(__file__, argv, OMP_NUM_THREADS=str(args.threads))
    data.update(
        spec=spec,
        order=order,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    )
    if not args.report_only or "command" not in data:  # the command that measured, not the one that re-rendered
        data["command"] = command
    data.setdefault("results", {})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for config in order:
            if config in data["results"] and "peak_delta_bytes" in data["results"][config]:
                print(f"{config}: done, skipped", flush=True)
                continue
            env = common.child_env(args.threads, HF_HUB_OFFLINE="1")
            r = data["results"][config] = common.run_child(__file__, dict(spec, config=config), args.timeout, env=env)
            if "error" in r:
                print(f"{config}: FAILED\n{r['error']}", file=sys.stderr, flush=True)
            else:
                print(f"{config}: {r['peak_delta_bytes'] / common.MIB:.0f} MiB, {r['seconds']:.1f} s", flush=True)
            report(data, args.results)
    report(data, args.results)


if __name__ == "__main__":
    main()
