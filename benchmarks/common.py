"""What the benchmark scripts share: data, the CPU unlearning recipe, measurement, child runs and results files.

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they import this
module as ``common``. torch, transformers and peft_unlearn are imported inside the functions that need them,
so ``--help`` and the report-only paths of the scripts stay fast.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
RESULTS = ROOT / "benchmarks" / "results"
#: the LoRA targets of the benchmarks: the seven projections of every decoder block (attention and MLP)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 2**30
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# process memory (Linux /proc)
# ----------------------------------------------------------------------------------------------
def proc_status(*fields: str) -> dict[str, int]:
    """``{field: bytes}`` of ``/proc/self/status`` fields such as ``VmRSS`` or ``VmHWM`` (missing, no /proc: 0)."""
    values = dict.fromkeys(fields, 0)
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in values:
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values


def peak_rss_bytes() -> int:
    """The resident-set high-water mark (``VmHWM``) of this process in bytes (0 without ``/proc``)."""
    return proc_status("VmHWM")["VmHWM"]


def reset_peak_rss(required: bool = True) -> bool:
    """Reset ``VmHWM`` to the current RSS through ``/proc/self/clear_refs`` (Linux >= 4.0).

    Returns True; where that is not possible it raises `OSError`, or returns False when not ``required``.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        if required:
            raise
        return False


class PeakMemory:
    """Peak memory of a ``with`` block above the memory in use when it starts, and its wall time.

    On CUDA: ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` at the start. Elsewhere
    the process RSS high-water mark (``VmHWM``, reset on entry) minus ``VmRSS`` at the start, which counts
    everything the process touches (allocator slack included); with ``host=False`` no memory is measured there.

    After the block: ``before``, ``peak`` and ``delta = peak - before`` in bytes (None when not measured) and
    ``seconds``.
    """

    def __init__(self, device: str, host: bool = True):
        self.device = device
        self.host = host
        self.before: int | None = None
        self.peak: int | None = None
        self.delta: int | None = None
        self.seconds = 0.0

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        elif self.host:
            reset_peak_rss()
            self.before = proc_status("VmRSS")["VmRSS"]
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self.host:
            self.peak = peak_rss_bytes()
        self.seconds = time.perf_counter() - self.start
        self.delta = None if self.peak is None or self.before is None else self.peak - self.before


# ----------------------------------------------------------------------------------------------
# data and training
# ----------------------------------------------------------------------------------------------
def read_texts(name: str, limit: int | None = None) -> list[str]:
    """The ``text`` fields of ``examples/data/<name>`` (JSON lines), the first ``limit`` when given."""
    rows = [json.loads(line)["text"] for line in (DATA / name).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of every text, truncated to ``max_length``, without padding."""
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def lora_kwargs(rank: int) -> dict[str, Any]:
    """Keyword arguments of a `LoraConfig` on `PROJECTIONS` with ``lora_alpha = 2 * rank`` and no dropout."""
    return {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(PROJECTIONS)}


def lora_layers(model: Any, adapter: str = "default") -> dict[str, Any]:
    """The LoRA layers of a PeftModel that hold ``adapter``, in module order.

    Keyed by module name in the base model (``model.layers.0.mlp.up_proj``), the names `FisherStatistics` uses.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: m for name, m in base.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


#: how `unlearning_config` trains, in words (for the settings a results file records)
RECIPE = "adamw_torch, constant lr, no warmup, no weight decay"


def unlearning_config(
    output_dir: str,
    spec: dict[str, Any],
    *,
    forget_loss: str = "inverted_hinge",
    retain_loss: str | None = "nll",
    **overrides: Any,
) -> Any:
    """The benchmarks' CPU recipe (`RECIPE`) as an `UnlearningConfig`: one log per step, no checkpoints.

    ``spec`` gives ``lr``, ``batch_size``, ``max_length`` and ``seed``; ``overrides`` are further (or
    different) `UnlearningConfig` arguments, e.g. ``max_steps``.
    """
    from peft_unlearn import UnlearningConfig

    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "forget_loss": forget_loss,
        "retain_loss": retain_loss,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "per_device_train_batch_size": spec["batch_size"],
        "max_length": spec["max_length"],
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": spec["seed"],
        "use_cpu": True,
        "disable_tqdm": True,
    }
    return UnlearningConfig(**{**kwargs, **overrides})


def memorization(
    model: Any, ids: list[list[int]], spec: dict[str, Any], pad_token_id: int, compute_el: bool = True
) -> dict[str, float]:
    """MA, EL_n, NLL and perplexity of ``ids`` with the run's ``el_n`` and ``el_prefix_stride`` (batches of 8)."""
    from peft_unlearn.metrics import evaluate_memorization

    return evaluate_memorization(
        model,
        ids,
        batch_size=8,
        el_n=(spec["el_n"],),
        el_prefix_stride=spec["el_prefix_stride"],
        pad_token_id=pad_token_id,
        compute_el=compute_el,
    )


def forget_monitor(
    forget_ids: list[list[int]], pad_token_id: int, thresholds: dict[str, float], *, el_n: int, prefix_stride: int
) -> Any:
    """A trainer callback that stops training once the forget set is forgotten.

    After every optimizer step it measures forget MA; only when MA is at most ``thresholds["ma"]`` it also
    measures EL_n (greedy generation, the costly part), and it stops training when that is at most
    ``thresholds["el"]``.

    Returns:
        A `transformers.TrainerCallback` with ``history`` (per step: ``step``, ``forget_ma`` and, where
        measured, ``forget_el{n}``), ``forgotten_at`` (the step, or None), ``eval_seconds`` (time spent in
        the checks) and ``train_begin`` (``time.perf_counter()`` at ``on_train_begin``, after the trainer's
        data-driven init).
    """
    from transformers import TrainerCallback

    from peft_unlearn.metrics import extraction_likelihood, memorization_accuracy, pad_batch

    input_ids, mask, _ = pad_batch([{"input_ids": x} for x in forget_ids], pad_token_id=pad_token_id)
    el_key = f"forget_el{el_n}"

    class ForgetMonitor(TrainerCallback):
        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []
            self.forgotten_at: int | None = None
            self.eval_seconds = 0.0
            self.train_begin: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            t0 = time.perf_counter()
            row = {"step": state.global_step, "forget_ma": float(memorization_accuracy(model, input_ids, mask).mean())}
            if row["forget_ma"] <= thresholds["ma"]:
                el = extraction_likelihood(
                    model, input_ids, mask, n=el_n, prefix_stride=prefix_stride, pad_token_id=pad_token_id
                )
                row[el_key] = float(el.mean())
                if row[el_key] <= thresholds["el"]:
                    self.forgotten_at = state.global_step
                    control.should_training_stop = True
            self.history.append(row)
            self.eval_seconds += time.perf_counter() - t0
            return control

    return ForgetMonitor()


def init_stats(trainer: Any) -> dict[str, Any]:
    """The scalar statistics of the data-driven init the trainer ran for adapter ``default`` ({} without one)."""
    stats = (getattr(trainer, "fila_stats", None) or {}).get("default") or {}
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}


def ihl_nll_step(model: Any, optimizer: Any, forget: dict[str, Any], retain: dict[str, Any]) -> Any:
    """One unlearning step as `UnlearningTrainer` takes it (IHL on ``forget`` + NLL on ``retain``); the loss."""
    from peft_unlearn.losses import inverted_hinge_loss, nll_loss

    def logits(batch: dict[str, Any]) -> Any:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    loss = inverted_hinge_loss(logits(forget), forget["labels"]) + nll_loss(logits(retain), retain["labels"])
    loss.backward()
    optimizer.step()
    return loss


# ----------------------------------------------------------------------------------------------
# one measurement per fresh subprocess
# ----------------------------------------------------------------------------------------------
def child_env(threads: int, **extra: str) -> dict[str, str]:
    """This environment with this checkout first on ``PYTHONPATH`` and ``OMP_NUM_THREADS=threads`` (+ ``extra``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), **extra}


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the hidden ``--child SPEC --child-out FILE`` arguments that `run_child` calls a script with."""
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)


def run_as_child(args: argparse.Namespace, measure: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """As a child (``--child``): measure the spec, write the result as JSON to ``--child-out`` and return True."""
    if not args.child:
        return False
    Path(args.child_out).write_text(json.dumps(measure(json.loads(args.child))))
    return True


def run_child(
    script: str | Path,
    spec: dict[str, Any],
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    wall_key: str = "wall_seconds",
) -> dict[str, Any]:
    """Measure ``spec`` in a fresh interpreter: ``python script --child SPEC --child-out FILE``.

    A fresh process per measurement keeps every peak-memory counter its own and picks up code that changed
    since the benchmark started. The child gets ``spec`` plus ``output_dir``, a scratch folder removed
    afterwards.

    Args:
        script: The benchmark script (it handles ``--child`` with `run_as_child`).
        spec: The measurement, JSON-serialisable.
        timeout: Seconds before the child is killed.
        env: The child's environment (None: this one), e.g. from `child_env`.
        wall_key: Key of the child's wall time in the result.

    Returns:
        The child's result, or ``{"error": ...}`` when it failed or timed out (never raised); with ``wall_key``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(script),
            "--child",
            json.dumps({**spec, "output_dir": tmp}),
            "--child-out",
            str(out),
        ]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout} s", wall_key: time.time() - t0}
        if proc.returncode != 0 or not out.exists():
            return {"error": proc.stderr[-3000:], "returncode": proc.returncode, wall_key: time.time() - t0}
        result = json.loads(out.read_text())
        result[wall_key] = time.time() - t0
        return result


# ----------------------------------------------------------------------------------------------
# results files
# ----------------------------------------------------------------------------------------------
def load_results(path: Path) -> dict[str, Any]:
    """The results file at ``path``, or ``{"runs": {}}`` when there is none yet."""
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` (indented, sorted keys) atomically: to a temporary file next to ``path``, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results``, merged with what other runners wrote to the same file meanwhile.

    Several runners (one per core or GPU, each with its own part of the plan) may share one results file:
    under an exclusive lock (``<name>.lock`` next to it) the file on disk is re-read, its finished runs,
    failures and commands are kept, and ``results`` is updated in place to the merged state before it is
    written back. A run in ``results`` replaces the one on disk with the same key, and a failure is dropped
    once its run is finished. ``failures`` is only written when either side has it.

    ``results`` holds ``runs`` (key -> run) and optionally ``failures`` and ``commands``.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = load_results(path)
        results["runs"] = {**disk.get("runs", {}), **results.get("runs", {})}
        if "failures" in disk or "failures" in results:
            failures = {**disk.get("failures", {}), **results.get("failures", {})}
            results["failures"] = {k: v for k, v in failures.items() if k not in results["runs"]}
        commands = list(disk.get("commands", []))
        commands += [c for c in results.get("commands", []) if c not in commands]
        results["commands"] = commands
        write_json(path, results)


def or_exit(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` of `run_child`, or exit (`SystemExit`) with its error: for what nothing can go on without."""
    if "error" in result:
        raise SystemExit(result["error"])
    return result


def check_settings(results: dict[str, Any], settings: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    """Exit (`SystemExit`) when the results file was measured with other ``settings`` in one of ``keys``."""
    old = results.get("settings")
    if old and any(old.get(k) != settings[k] for k in keys):
        raise SystemExit(f"--results {path} was measured with other evaluation settings {old}; use another file.")


def command_line(script: str | Path, argv: list[str] | None = None, **env: str) -> str:
    """The shell command, from the repository root, that reproduces this run of ``script`` with ``argv``.

    ``argv`` None means ``sys.argv[1:]``; ``env`` are assignments before ``python``, e.g.
    ``OMP_NUM_THREADS=1 python benchmarks/fila_memory.py --fresh``. Words are quoted as a shell needs.
    """
    args = sys.argv[1:] if argv is None else argv
    rel = Path(script).resolve().relative_to(ROOT).as_posix()
    return shlex.join([*(f"{k}={v}" for k, v in env.items()), "python", rel, *args])


def record_command(results: dict[str, Any], command: str) -> None:
    """Append ``command`` to ``results["commands"]`` unless it is there already."""
    commands = results.setdefault("commands", [])
    if command not in commands:
        commands.append(command)


def machine_info() -> dict[str, Any]:
    """Platform, CPU count and the torch, transformers and peft_unlearn versions."""
    import torch
    import transformers

    import peft_unlearn

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft_unlearn": peft_unlearn.__version__,
    }


# ----------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------
def say(msg: str) -> None:
    """Print ``msg`` with the time, in one write (lines from several threads do not interleave)."""
    sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stdout.flush()


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN, NaN for no values; std 0 for one)."""
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` of ``values`` (the value alone for one, ``–`` for none)."""
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def report_head(title: str, commands: list[str], results: dict[str, Any]) -> list[str]:
    """The first lines of a resumable benchmark's report: title, commands, machine and settings."""
    return [
        f"# {title}",
        "",
        "Commands (each resumes the same results file; finished runs are skipped):",
        "",
        *[f"    {cmd}" for cmd in commands],
        "",
        f"Machine: {results.get('machine', {})}",
        "",
        f"Settings: {json.dumps(results.get('settings', {}))}",
        "",
    ]


def benchmark_parser(doc: str, default_results: Path) -> argparse.ArgumentParser:
    """The parser of a resumable benchmark: ``doc`` as its help, ``--model``, ``--dtype`` and ``--results``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--results", type=Path, default=default_results)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, max_steps: int) -> None:
    """Add what every run of an unlearning benchmark is measured with: batch, lengths, step cap, EL, threads."""
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=max_steps)
    parser.add_argument("--el-n", type=int, default=10)
    parser.add_argument("--el-prefix-stride", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1 is much faster on a shared, oversubscribed CPU)",
    )
    parser.add_argument("--timeout", type=int, default=1800, help="per-run timeout in seconds")


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The values of the `add_run_arguments` arguments, for the settings a results file records."""
    keys = ("batch_size", "max_length", "max_steps", "el_n", "el_prefix_stride", "threads")
    return {k: getattr(args, k) for k in keys}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it to ``path`` (PNG) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
