"""Training-step cost of FILA's offset form against default LoRA.

FILA never modifies the base: each LoRA layer subtracts ``s * B0 (A0 x)`` computed from a frozen copy of
the initial factors. That is one extra rank-r product per target layer in the forward pass (and its input
gradient in the backward pass). The paper's residual form (``W_res = W - s * B0 A0`` in the base) has
exactly the compute of a default LoRA, so the default-LoRA step time below is also the residual form's.

Both models are trained in the same process, steps interleaved (LoRA, FILA, LoRA, ...), so machine noise
hits both alike; the result is the median over the measured steps after warm-up.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/fila_offset_cost.py --model gemma3-270m --threads 1
    python benchmarks/fila_offset_cost.py --model tiny          # seconds, for a smoke run

Writes ``benchmarks/results/fila_offset_cost.{json,md}`` (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import common
import torch


def _build(name: str, init: str, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model

    import peft_unlearn  # noqa: F401  (registers init_lora_weights="fila")
    from peft_unlearn.fila import FisherStatistics, initialize_fila_weights

    if name == "tiny":
        from peft_unlearn.testing import tiny_causal_lm

        model, vocab = tiny_causal_lm("llama", vocab_size=320, hidden_size=64), 320
    else:
        from peft_unlearn.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(name, dtype=torch.float32, show_progress=False)
        vocab = len(tokenizer)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=init
    )
    peft_model = get_peft_model(model, config)
    if init == "fila":  # uniform importance: the init cost is not measured here, only the training step
        importance = {
            n: torch.ones(m.lora_B["default"].weight.shape[0], m.lora_A["default"].weight.shape[1])
            for n, m in common.lora_layers(peft_model).items()
        }
        initialize_fila_weights(peft_model, fisher=FisherStatistics(importance, f_count=1), show_progress=False)
    return peft_model, vocab


def _step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="'gemma3-270m' (cached) or 'tiny'")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7, help="measured steps per model (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(common.RESULTS / "fila_offset_cost"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    models, vocab = {}, None
    for init in ("lora", "fila"):
        models[init], vocab = _build(args.model, True if init == "lora" else "fila", args.rank, seed=0)
        models[init].train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()
    }
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(args.warmup + args.steps):
        for key, model in models.items():  # interleaved
            seconds = _step(model, optimizers[key], batch)
            if step >= args.warmup:
                times[key].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": common.command_line(__file__, argv, OMP_NUM_THREADS=str(args.threads)),
        "model": args.model,
        "rank": args.rank,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "steps": args.steps,
        "step_seconds": times,
        "median_step_seconds": median,
        "fila_over_lora": median["fila"] / median["lora"],
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    overhead = 100 * (result["fila_over_lora"] - 1)
    out.with_suffix(".md").write_text(
        "# FILA offset form: training-step cost\n\n"
        f"Command: `{result['command']}`\n\n"
        f"{args.model}, r={args.rank}, all-linear targets, batch {args.batch_size} x {args.seq_len} tokens, fp32, "
        f"AdamW, {args.threads} CPU thread(s); median of {args.steps} interleaved steps after {args.warmup} warm-up "
        "steps (forward + backward + optimizer step).\n\n"
        "| adapter | median step (s) | relative |\n|---|---|---|\n"
        f"| default LoRA (= FILA residual form) | {median['lora']:.3f} | 1.00 |\n"
        f"| FILA offset form | {median['fila']:.3f} | {result['fila_over_lora']:.2f} |\n\n"
        f"The offset form costs {overhead:+.1f}% per step here. The paper's residual form has the compute of a "
        "default LoRA, but it rewrites the user's base weights, so it cannot serve 4-bit/8-bit or sharded bases "
        "and makes `disable_adapter()` / `unload()` differ from the original model; the offset form is the only "
        "form offered.\n"
    )
    print(json.dumps({k: result[k] for k in ("median_step_seconds", "fila_over_lora")}))
    return result


if __name__ == "__main__":
    main()
