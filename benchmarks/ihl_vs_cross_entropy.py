"""Benchmark: Inverted Hinge Loss vs cross-entropy, forward+backward time and peak memory on large-vocab logits.

Compares, on the same random logits ``[B, T, V]`` (``requires_grad=True``) and labels:

* ``cross_entropy``: ``torch.nn.functional.cross_entropy`` with labels shifted (the HF causal-LM loss; the
  reference the IHL target is measured against),
* ``ihl``: :func:`peft_unlearn.losses.inverted_hinge_loss` (custom autograd Function, one ``[N, V]`` backward
  buffer),
* ``ihl_naive``: the official-code style IHL (slice + copy the shifted logits, select supervised rows, softmax,
  one-hot, masked max), kept here as the baseline.

Each method runs in its own subprocess (``--worker``) so allocator state and peak-memory counters do not leak
between methods. Peak memory on CPU is the increase of the process's peak resident set size (``VmHWM``, reset
before each iteration through ``/proc/self/clear_refs``) over the resident size just before the iteration, i.e. all
memory the forward+backward needs on top of the logits, including the final ``logits.grad``. On CUDA it is
``torch.cuda.max_memory_allocated`` over the allocated memory before the iteration. Two times are recorded per
iteration: wall-clock and process CPU time (``time.process_time``; with ``--threads 1`` it is the work done,
insensitive to time slicing on a loaded machine, which makes it the primary metric on a shared CPU; on CUDA only the
wall time is meaningful). Each is the median over ``--repeats`` timed iterations after ``--warmup`` untimed ones.
``--rounds`` repeats the whole comparison (methods interleaved) because ratios are more robust than absolute times
on a shared machine.

Example:
    python benchmarks/ihl_vs_cross_entropy.py --vocab 262144 --batch 4 --seq-len 128 --dtype float32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

METHODS = ("cross_entropy", "ihl", "ihl_naive")
NAME = "ihl_vs_cross_entropy"


# ----------------------------------------------------------------------------------------------------------------
# the three losses
# ----------------------------------------------------------------------------------------------------------------


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF causal-LM cross-entropy, shifting the labels (not the logits)."""
    shifted = labels.new_full(labels.shape, -100)
    shifted[:, :-1] = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)


def naive_ihl(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Official-code style IHL: shifted copy of the logits, softmax, one-hot, masked max, mean over tokens."""
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1, :].contiguous().view(-1, vocab)
    shift_labels = labels[:, 1:].contiguous().view(-1)
    keep = shift_labels != -100
    probs = torch.softmax(shift_logits[keep], dim=-1)
    target = F.one_hot(shift_labels[keep], vocab).bool()
    p_true = probs[target]
    p_other = probs.masked_fill(target, float("-inf")).amax(dim=-1)
    return torch.clamp(1.0 + p_true - p_other, min=0.0).mean()


def _loss_fn(method: str):
    if method == "cross_entropy":
        return cross_entropy_loss
    if method == "ihl":
        from peft_unlearn.losses import inverted_hinge_loss

        return inverted_hinge_loss
    if method == "ihl_naive":
        return naive_ihl
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# ----------------------------------------------------------------------------------------------------------------
# worker (one method, one process)
# ----------------------------------------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    logits = (torch.randn(args.batch, args.seq_len, args.vocab, generator=gen) * 2.0).to(device, dtype)
    logits.requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen).to(device)
    labels[:, : args.prompt_len] = -100  # prompt tokens are not supervised
    loss_fn = _loss_fn(args.worker)
    cuda = device.type == "cuda"

    def step() -> float:
        logits.grad = None
        loss = loss_fn(logits, labels)
        loss.backward()
        return float(loss)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    wall_times, cpu_times, peaks, loss_value = [], [], [], None
    for i in range(args.warmup + args.repeats):
        logits.grad = None
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = common.proc_status("VmRSS")["VmRSS"]
            common.reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_value = step()
        sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = torch.cuda.max_memory_allocated() if cuda else common.peak_rss_bytes()
        peaks.append(peak - before)
        if i >= args.warmup:
            wall_times.append(wall)
            cpu_times.append(cpu)
    return {
        "method": args.worker,
        "loss": loss_value,
        "wall_times_s": wall_times,
        "cpu_times_s": cpu_times,
        "wall_time_s": statistics.median(wall_times),
        "cpu_time_s": statistics.median(cpu_times),
        "peak_memory_bytes": max(peaks),
        "peak_memory_bytes_per_iteration": peaks,
    }


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------


def _worker_cmd(args: argparse.Namespace, method: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    for key in ("vocab", "batch", "seq_len", "prompt_len", "dtype", "repeats", "warmup", "threads", "device", "seed"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return cmd


def _machine_info(args: argparse.Namespace) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "device": args.device,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        info["cpu"] = platform.processor()
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _write_outputs(report: dict, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")

    summary = report["summary"]
    cfg = report["config"]
    mib = 1024**2
    lines = [
        f"# IHL vs cross-entropy ({cfg['dtype']}, vocab {cfg['vocab']}, {cfg['tokens']} tokens)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"torch {report['machine']['torch']}, {report['machine'].get('cpu', '')}, device {cfg['device']}, "
        f"{cfg['threads']} torch thread(s), {cfg['rounds']} round(s) x {cfg['repeats']} timed repeats "
        f"(after {cfg['warmup']} warmup). Load average at start: {report['machine'].get('load_average_at_start')}.",
        "",
        "| method | CPU time (s) | CPU time / CE | wall time (s) | wall time / CE | peak extra memory (MiB) "
        "| memory / CE |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        s = summary[method]
        lines.append(
            f"| {method} | {s['cpu_time_s']:.3f} | {s['cpu_time_ratio_vs_cross_entropy']:.3f} | "
            f"{s['wall_time_s']:.3f} | {s['wall_time_ratio_vs_cross_entropy']:.3f} | "
            f"{s['peak_memory_bytes'] / mib:.0f} | {s['memory_ratio_vs_cross_entropy']:.3f} |"
        )
    lines += [
        "",
        "Per-round time ratios vs cross_entropy, CPU / wall (each round runs every method in a fresh process):",
        "",
    ]
    for method in METHODS:
        cpu = ", ".join(f"{r:.3f}" for r in summary[method]["cpu_time_ratio_per_round"])
        wall = ", ".join(f"{r:.3f}" for r in summary[method]["wall_time_ratio_per_round"])
        lines.append(f"- {method}: CPU {cpu}; wall {wall}")
    lines += [
        "",
        "Times: forward+backward of one batch, median over rounds of each round's median (CE = cross_entropy). "
        "CPU time is the process CPU time, the primary metric on a shared CPU with 1 thread (it ignores time "
        "slicing; it does count the kernel's page-fault work for fresh buffers). Memory: peak resident memory "
        "added by one forward+backward (includes the final `logits.grad`) over the memory held before the "
        "iteration (logits, labels).",
        "Absolute times are noisy: the machine is shared with other jobs (see the load average); compare the ratios.",
    ]
    losses = ", ".join(f"{m} {report['rounds'][0][m]['loss']:.4f}" for m in METHODS)
    lines += [
        f"Loss values (round 0): {losses}. `ihl` and `ihl_naive` compute the same loss; for half-precision logits "
        "they may differ slightly because `ihl` sums in fp32 while the naive softmax runs in the logits' dtype.",
    ]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")

    plt = common.pyplot()
    if plt is None:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    colors = ["#4c72b0", "#dd8452", "#c44e52"]
    time_key = "wall_time_s" if cfg["device"].startswith("cuda") else "cpu_time_s"
    times = [summary[m][time_key] for m in METHODS]
    time_ratios = [summary[m][time_key.replace("_s", "_ratio_vs_cross_entropy")] for m in METHODS]
    mems = [summary[m]["peak_memory_bytes"] / mib for m in METHODS]
    mem_ratios = [summary[m]["memory_ratio_vs_cross_entropy"] for m in METHODS]
    for ax, values, ratios, title, unit in (
        (axes[0], times, time_ratios, f"forward+backward {time_key.split('_')[0]} time", "s"),
        (axes[1], mems, mem_ratios, "peak extra memory", "MiB"),
    ):
        bars = ax.bar(METHODS, values, color=colors)
        for bar, ratio in zip(bars, ratios):
            ax.annotate(
                f"{ratio:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set_title(title)
        ax.set_ylabel(unit)
    fig.suptitle(f"vocab {cfg['vocab']}, {cfg['tokens']} tokens, {cfg['dtype']}, {cfg['device']}")
    common.save_figure(fig, out_dir / f"{stem}.png", dpi=120)


def run_driver(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        results = {}
        for method in METHODS:
            proc = subprocess.run(_worker_cmd(args, method), capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"worker {method} failed (rc {proc.returncode}):\n{proc.stderr}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"round {r}: {method:14s} cpu {results[method]['cpu_time_s']:.3f}s "
                f"wall {results[method]['wall_time_s']:.3f}s  "
                f"peak +{results[method]['peak_memory_bytes'] / 1024**2:.0f} MiB  loss {results[method]['loss']:.4f}",
                flush=True,
            )
        rounds.append(results)

    summary = {}
    for method in METHODS:
        summary[method] = {}
        for metric in ("cpu", "wall"):
            key = f"{metric}_time_s"
            per_round = [rd[method][key] for rd in rounds]
            ratios = [rd[method][key] / rd["cross_entropy"][key] for rd in rounds]
            summary[method][key] = statistics.median(per_round)
            summary[method][f"{metric}_time_per_round_s"] = per_round
            summary[method][f"{metric}_time_ratio_per_round"] = ratios
            summary[method][f"{metric}_time_ratio_vs_cross_entropy"] = statistics.median(ratios)
        per_round_mem = [rd[method]["peak_memory_bytes"] for rd in rounds]
        summary[method]["peak_memory_bytes"] = max(per_round_mem)
        summary[method]["peak_memory_bytes_per_round"] = per_round_mem
    for method in METHODS:
        summary[method]["memory_ratio_vs_cross_entropy"] = (
            summary[method]["peak_memory_bytes"] / summary["cross_entropy"]["peak_memory_bytes"]
        )
    tokens = args.batch * args.seq_len
    return {
        "command": common.command_line(__file__, argv),
        "config": {
            "vocab": args.vocab,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "tokens": tokens,
            "supervised_tokens": args.batch * (args.seq_len - max(args.prompt_len, 1)),
            "prompt_len": args.prompt_len,
            "dtype": args.dtype,
            "device": args.device,
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "logits_bytes": tokens * args.vocab * torch.empty((), dtype=getattr(torch, args.dtype)).element_size(),
        },
        "machine": _machine_info(args),
        "summary": summary,
        "rounds": rounds,
        "note": args.note,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=262144, help="vocabulary size V (Gemma 3: 262144)")
    parser.add_argument("--batch", type=int, default=4, help="batch size B")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length T (tokens = B * T)")
    parser.add_argument("--prompt-len", type=int, default=0, help="unsupervised (-100) tokens at the start of rows")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per method and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    parser.add_argument("--rounds", type=int, default=2, help="how many times the whole comparison is repeated")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--stem", default=None, help=f"output file stem (default {NAME}, + _<dtype> if not fp32)")
    parser.add_argument("--note", default="", help="free text stored in the results (e.g. machine load)")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="only re-render the .md/.png of an existing results .json"
    )
    parser.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return
    if args.from_json is not None:
        _write_outputs(json.loads(args.from_json.read_text()), args.from_json.parent, args.from_json.stem)
        return
    report = run_driver(args, argv)
    stem = args.stem or (NAME if args.dtype == "float32" else f"{NAME}_{args.dtype}")
    _write_outputs(report, args.output_dir, stem)
    for method in METHODS:
        s = report["summary"][method]
        print(
            f"{method:14s} cpu time x{s['cpu_time_ratio_vs_cross_entropy']:.3f}  "
            f"wall time x{s['wall_time_ratio_vs_cross_entropy']:.3f}  memory x{s['memory_ratio_vs_cross_entropy']:.3f}"
        )
    print(f"wrote {args.output_dir / stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
