"""Cost of the FILA initialisation versus one unlearning epoch on Gemma-3 270M (CPU).

Measures, each in a fresh subprocess (so every peak is its own):

* ``fila``: the FILA initialisation as ``UnlearningTrainer.train()`` runs it before training, through the
  public API: `estimate_fisher` over the forget set (each forget batch paired with one retain batch, in
  order, tokenized like the trainer does), then `initialize_fila_weights(fisher=...)` (one weighted SVD per
  LoRA layer);
* ``epoch``: one unlearning epoch (IHL + retain NLL, one optimizer step per forget batch) with a plainly
  initialised LoRA adapter, via ``UnlearningTrainer.train()``.

Time is wall clock and process CPU time (all threads); memory is the process RSS high-water mark
(``VmHWM``). Two peaks are recorded: the whole fresh process (loading included) and the phase alone
(``VmHWM`` reset through ``/proc/self/clear_refs`` right before the phase). The RSS right after loading
the model and right before the phase are recorded too, so the peak increments can be compared.

``--control-threads 1`` repeats every measurement with one thread (much less sensitive to a shared,
oversubscribed machine).

Results go to ``--results`` (JSON) after every run, and the markdown table and the plot are rewritten
from it. Runs that are already in the file with the same settings are skipped (``--fresh`` redoes them).

Usage::

    PEFT_UNLEARN_CACHE=/work/cache python benchmarks/fila_init_cost.py --repeats 2 --control-threads 1
    python benchmarks/fila_init_cost.py --report-only --notes-file notes.md  # rewrite .md/.png
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import common

DEFAULT_RESULTS = common.RESULTS / "fila_init_cost.json"
PHASES = ("fila", "epoch")
TARGETS = {"time": 1.5, "memory": 1.3}


# ----------------------------------------------------------------------------------------------
# process memory helpers
# ----------------------------------------------------------------------------------------------
_MEM_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def _mem() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of ``/proc/self/status`` in bytes (missing fields: 0)."""
    return common.proc_status(*_MEM_FIELDS)


class PeakSampler:
    """Background thread sampling ``RssAnon``/``RssFile`` (no kernel high-water mark exists for them).

    Args:
        interval: Seconds between samples.

    Example:
        >>> with PeakSampler() as sampler:
        ...     pass
        >>> sampler.peaks["RssAnon"] >= 0
        True
    """

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval = interval
        self.peaks = dict.fromkeys(_MEM_FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, value in _mem().items():
            self.peaks[key] = max(self.peaks[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ----------------------------------------------------------------------------------------------
# child process: one measurement
# ----------------------------------------------------------------------------------------------
def _read_texts(name: str, limit: int | None = None) -> list[dict[str, str]]:
    return [{"text": text} for text in common.read_texts(name, limit)]


def _setup(spec: dict[str, Any], init: bool | str, output_dir: str) -> dict[str, Any]:
    """Load the model, wrap it with LoRA and build the trainer; returns the objects and the RSS checkpoints."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    import peft_unlearn  # noqa: F401  (registers init_lora_weights="fila")
    from peft_unlearn import UnlearningTrainer
    from peft_unlearn.models import load_model_and_tokenizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    mem_start = _mem()
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(spec["model"], dtype=spec["dtype"], device="cpu")
    load_seconds = time.perf_counter() - t0
    gc.collect()
    mem_loaded = _mem()
    lora = LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        lora_dropout=0.0,
        target_modules=list(spec["targets"]),
        init_lora_weights=init,
    )
    model = get_peft_model(model, lora)
    args = common.unlearning_config(output_dir, spec, num_train_epochs=1, fila_batch_size=spec["fila_batch_size"])
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        forget_dataset=Dataset.from_list(_read_texts("forget.jsonl", spec["n_forget"])),
        retain_dataset=Dataset.from_list(_read_texts("retain.jsonl")),
        processing_class=tokenizer,
    )
    base = model.get_base_model()
    return {
        "model": model,
        "tokenizer": tokenizer,
        "trainer": trainer,
        "load_seconds": load_seconds,
        "model_param_bytes": sum(p.numel() * p.element_size() for p in base.parameters()),
        "rss_start_bytes": mem_start["VmRSS"],
        "rss_loaded_bytes": mem_loaded["VmRSS"],
        "rss_anon_loaded_bytes": mem_loaded["RssAnon"],
        "rss_file_loaded_bytes": mem_loaded["RssFile"],
        "hwm_after_load_bytes": mem_loaded["VmHWM"],
    }


def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one phase (``fila`` or ``epoch``) in this (fresh) process."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback

    from peft_unlearn import estimate_fisher, initialize_fila_weights
    from peft_unlearn.trainer import CausalLMCollator, TokenizedDataset, tokenize_dataset

    phase = spec["phase"]
    with tempfile.TemporaryDirectory() as tmp:
        env = _setup(spec, "fila" if phase == "fila" else True, tmp)
        trainer = env.pop("trainer")
        model = env.pop("model")
        tokenizer = env.pop("tokenizer")
        fisher_mark: dict[str, Any] = {}
        if phase == "fila":
            pad = tokenizer.pad_token_id

            def loader(file: str, limit: int | None, name: str) -> DataLoader:
                examples = tokenize_dataset(
                    _read_texts(file, limit), tokenizer, max_length=spec["max_length"], name=name
                )
                return DataLoader(
                    TokenizedDataset(examples), batch_size=spec["fila_batch_size"], collate_fn=CausalLMCollator(pad)
                )

            forget_loader = loader("forget.jsonl", spec["n_forget"], "forget")
            retain_loader = loader("retain.jsonl", None, "retain")
            del trainer
        gc.collect()
        before = _mem()
        out: dict[str, Any] = dict(env)
        out.update(
            {
                "rss_before_phase_bytes": before["VmRSS"],
                "rss_anon_before_phase_bytes": before["RssAnon"],
                "rss_file_before_phase_bytes": before["RssFile"],
                "hwm_before_phase_bytes": before["VmHWM"],
            }
        )
        step_times: list[float] = []

        class StepTimer(TrainerCallback):
            """Wall time of every optimizer step."""

            def on_step_begin(self, args, state, control, **kwargs):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                step_times.append(time.perf_counter() - self.t0)

        reset_ok = common.reset_peak_rss(required=False)
        with PeakSampler() as sampler:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if phase == "fila":
                # what UnlearningTrainer.train() runs before training, through the public API: the Fisher pass
                # (each forget batch paired with one retain batch, in order), then one weighted SVD per layer
                fisher = estimate_fisher(model, forget_loader, retain_loader, show_progress=False)
                fisher_seconds = time.perf_counter() - wall0
                fisher_mark = {f"{k}_after_fisher_bytes": v for k, v in _mem().items()}
                fisher_mark["reset_ok"] = common.reset_peak_rss(required=False)  # the SVD phase gets its own peak
                info = initialize_fila_weights(model, fisher=fisher, show_progress=False)
                out["fila_stats"] = {
                    "fisher_seconds": fisher_seconds,
                    "svd_seconds": info["svd_seconds"],
                    "seconds": fisher_seconds + info["seconds"],
                    **{k: info[k] for k in ("num_layers", "f_count", "r_count", "num_batches")},
                }
            elif phase == "epoch":
                trainer.add_callback(StepTimer())
                result = trainer.train()
                out["train_runtime"] = float(result.metrics.get("train_runtime", float("nan")))
                out["steps"] = int(trainer.state.global_step)
                out["step_seconds"] = step_times
                logs = [h for h in trainer.state.log_history if "loss" in h]
                out["last_log"] = {k: v for k, v in (logs[-1] if logs else {}).items() if isinstance(v, (int, float))}
            else:
                raise ValueError(f"unknown phase {phase!r}")
            out["wall_seconds"] = time.perf_counter() - wall0
            out["cpu_seconds"] = time.process_time() - cpu0
        end = _mem()
        out["peak_reset_ok"] = reset_ok
        if phase == "fila" and fisher_mark:
            # VmHWM was reset after the Fisher pass: the phase peak is the larger of the two parts
            out["fisher_peak_rss_bytes"] = fisher_mark["VmHWM_after_fisher_bytes"]
            out["svd_peak_rss_bytes"] = end["VmHWM"]
            out["phase_peak_rss_bytes"] = max(end["VmHWM"], fisher_mark["VmHWM_after_fisher_bytes"])
            out["fisher_marks"] = fisher_mark
        else:
            out["phase_peak_rss_bytes"] = end["VmHWM"]
        out["process_peak_rss_bytes"] = max(out["phase_peak_rss_bytes"], before["VmHWM"])
        out["sampled_peak_rss_anon_bytes"] = sampler.peaks["RssAnon"]
        out["sampled_peak_rss_file_bytes"] = sampler.peaks["RssFile"]
        out["sampled_peak_rss_bytes"] = sampler.peaks["VmRSS"]
        out["rss_after_phase_bytes"] = end["VmRSS"]
        out["threads"] = torch.get_num_threads()
    return out


# ----------------------------------------------------------------------------------------------
# parent: subprocess runner, summary, report
# ----------------------------------------------------------------------------------------------
def child(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its result (or ``{"error": ...}``) with the load."""
    load_before = list(os.getloadavg())
    result = common.run_child(__file__, spec, timeout, wall_key="child_wall_seconds")  # the phase has "wall_seconds"
    result["loadavg_before"] = load_before
    if "error" not in result:
        result["loadavg_after"] = list(os.getloadavg())
    return result


def _median(values: list[Any]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")


_MEDIAN_KEYS = (
    "wall_seconds",
    "cpu_seconds",
    "process_peak_rss_bytes",
    "phase_peak_rss_bytes",
    "rss_loaded_bytes",
    "rss_anon_loaded_bytes",
    "rss_before_phase_bytes",
    "hwm_after_load_bytes",
    "sampled_peak_rss_anon_bytes",
    "sampled_peak_rss_file_bytes",
    "model_param_bytes",
)


def summarize(results: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Medians per phase and the FILA / epoch ratios of the runs with ``threads`` threads (default: the setting)."""
    threads = threads if threads is not None else results.get("settings", {}).get("threads")
    runs = [
        r
        for r in results.get("runs", {}).values()
        if "error" not in r["result"] and r.get("threads", results.get("settings", {}).get("threads")) == threads
    ]
    med: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        rs = [r["result"] for r in runs if r["phase"] == phase]
        if not rs:
            continue
        m: dict[str, float] = {"n": len(rs)}
        m.update({k: _median([r.get(k) for r in rs]) for k in _MEDIAN_KEYS})
        if phase == "fila":
            for k in ("fisher_seconds", "svd_seconds", "seconds"):
                m[k] = _median([r["fila_stats"][k] for r in rs])
            m["fisher_peak_rss_bytes"] = _median([r.get("fisher_peak_rss_bytes") for r in rs])
            m["svd_peak_rss_bytes"] = _median([r.get("svd_peak_rss_bytes") for r in rs])
        else:
            m["steps"] = _median([r["steps"] for r in rs])
            m["train_runtime"] = _median([r["train_runtime"] for r in rs])
        m["phase_increment_bytes"] = m["phase_peak_rss_bytes"] - m["rss_loaded_bytes"]
        m["anon_increment_bytes"] = m["sampled_peak_rss_anon_bytes"] - m["rss_anon_loaded_bytes"]
        med[phase] = m
    summary: dict[str, Any] = {"threads": threads, "medians": med}
    if "fila" in med and "epoch" in med:
        f, e = med["fila"], med["epoch"]
        summary["ratios"] = {
            "time_wall": f["wall_seconds"] / e["wall_seconds"],
            "time_cpu": f["cpu_seconds"] / e["cpu_seconds"],
            "time_fisher_only_wall": f["fisher_seconds"] / e["wall_seconds"],
            "peak_process": f["process_peak_rss_bytes"] / e["process_peak_rss_bytes"],
            "peak_phase": f["phase_peak_rss_bytes"] / e["phase_peak_rss_bytes"],
            "increment_over_loaded": f["phase_increment_bytes"] / e["phase_increment_bytes"],
            "anon_peak": f["sampled_peak_rss_anon_bytes"] / e["sampled_peak_rss_anon_bytes"],
            "anon_increment": f["anon_increment_bytes"] / e["anon_increment_bytes"],
        }
    return summary


def _status(value: float, target: float) -> str:
    return "meets" if value <= target else "misses"


def _g(value: Any) -> str:
    return f"{value / common.GIB:.2f}" if isinstance(value, (int, float)) and not math.isnan(value) else "–"


def _s(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and not math.isnan(value) else "–"


def report(results: dict[str, Any], path: Path) -> None:
    """Write the markdown report and the plot next to the JSON."""
    s = results.get("settings", {})
    thread_counts = sorted(
        {r.get("threads", s.get("threads")) for r in results.get("runs", {}).values()}, reverse=True
    )
    summaries = {t: summarize(results, t) for t in thread_counts}
    summary = summaries.get(s.get("threads")) or summarize(results)
    results["summary"] = summary
    results["summary_by_threads"] = {str(t): v for t, v in summaries.items()}
    lines = [
        "# FILA initialisation cost vs one unlearning epoch (Gemma-3 270M, CPU)",
        "",
        f"Command: `{results.get('command', '')}`",
        "",
        f"Machine: {json.dumps(results.get('machine', {}))}",
        "",
        *(
            [
                f"Profile command: `{results['profile_command']}`; machine: {json.dumps(results.get('profile_machine'))}",
                "",
            ]
            if results.get("profile_command")
            else []
        ),
        f"Settings: {json.dumps(s)}",
        "",
        "Each row is a fresh subprocess. `process peak` = `VmHWM` of the whole process (model loading included); "
        "`phase peak` = `VmHWM` reset right before the phase (`/proc/self/clear_refs`; for FILA the larger of the "
        "Fisher-pass and SVD-phase peaks); `loaded` = `VmRSS` right after `from_pretrained`; `incr.` = phase peak "
        "- loaded. `anon peak` = largest sampled `RssAnon` (20 ms sampling): the safetensors weights are "
        "memory-mapped and only paged in (as file-backed RSS) when first used, so `loaded` does not include "
        "most of the 1.0 GiB of weights yet. CPU s = process CPU time of all threads. Load average (1 min) "
        "before/after each run: the machine is shared (2 cores, several concurrent jobs), so wall times are "
        "inflated.",
        "",
        "| phase | threads | repeat | wall s | CPU s | Fisher s | SVD s | steps | loaded GiB | process peak GiB "
        "| phase peak GiB | Fisher / SVD peak GiB | incr. GiB | anon peak GiB | load avg before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _key, run in sorted(results.get("runs", {}).items()):
        r = run["result"]
        if "error" in r:
            lines.append(f"| {run['phase']} | {run.get('threads')} | {run['repeat']} | error: {r['error'][-200:]!r} |")
            continue
        fs = r.get("fila_stats", {})
        split = (
            f"{_g(r['fisher_peak_rss_bytes'])} / {_g(r['svd_peak_rss_bytes'])}"
            if "fisher_peak_rss_bytes" in r
            else "–"
        )
        lines.append(
            f"| {run['phase']} | {run.get('threads', s.get('threads'))} | {run['repeat']} | {_s(r['wall_seconds'])} | {_s(r['cpu_seconds'])} "
            f"| {_s(fs.get('fisher_seconds'))} | {_s(fs.get('svd_seconds'))} | {r.get('steps', '–')} "
            f"| {_g(r['rss_loaded_bytes'])} | {_g(r['process_peak_rss_bytes'])} | {_g(r['phase_peak_rss_bytes'])} "
            f"| {split} | {_g(r['phase_peak_rss_bytes'] - r['rss_loaded_bytes'])} "
            f"| {_g(r.get('sampled_peak_rss_anon_bytes'))} "
            f"| {r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |"
        )
    for threads, summ in summaries.items():
        med = summ["medians"]
        if med:
            lines += [
                "",
                f"## Medians, {threads} thread(s)",
                "",
                "| phase | n | wall s | CPU s | Fisher s | SVD s | loaded GiB | process peak GiB | phase peak GiB "
                "| incr. GiB | anon peak GiB | anon incr. GiB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for phase, m in med.items():
                lines.append(
                    f"| {phase} | {m['n']} | {_s(m['wall_seconds'])} | {_s(m['cpu_seconds'])} "
                    f"| {_s(m.get('fisher_seconds'))} | {_s(m.get('svd_seconds'))} | {_g(m['rss_loaded_bytes'])} "
                    f"| {_g(m['process_peak_rss_bytes'])} | {_g(m['phase_peak_rss_bytes'])} "
                    f"| {_g(m['phase_increment_bytes'])} | {_g(m['sampled_peak_rss_anon_bytes'])} "
                    f"| {_g(m['anon_increment_bytes'])} |"
                )
        ratios = summ.get("ratios")
        if ratios:
            t_time, t_mem = TARGETS["time"], TARGETS["memory"]
            lines += [
                "",
                f"## Ratios FILA init / one epoch, {threads} thread(s) (targets: time <= {t_time}x, peak memory <= {t_mem}x)",
                "",
                "| ratio | value | target | |",
                "|---|---|---|---|",
                f"| time, wall | {ratios['time_wall']:.2f} | {t_time} | {_status(ratios['time_wall'], t_time)} |",
                f"| time, CPU | {ratios['time_cpu']:.2f} | {t_time} | {_status(ratios['time_cpu'], t_time)} |",
                f"| time, Fisher pass only (wall) | {ratios['time_fisher_only_wall']:.2f} | – | |",
                f"| peak RSS, whole process | {ratios['peak_process']:.2f} | {t_mem} "
                f"| {_status(ratios['peak_process'], t_mem)} |",
                f"| peak RSS, phase only | {ratios['peak_phase']:.2f} | {t_mem} | {_status(ratios['peak_phase'], t_mem)} |",
                f"| peak increment over the loaded-model RSS | {ratios['increment_over_loaded']:.2f} | – | |",
                f"| peak anonymous RSS (sampled) | {ratios['anon_peak']:.2f} | – | |",
                f"| anonymous-RSS increment over loading | {ratios['anon_increment']:.2f} | – | |",
            ]
    if results.get("notes"):
        lines += ["", "## Reading the numbers", "", results["notes"].strip()]
    if results.get("profile"):
        lines += [
            "",
            "The JSON also keeps `profile`, an anatomy of the Fisher pass of an earlier implementation (autograd "
            "gradients of the base weights); it is no longer measured or rendered.",
        ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(summaries, path.with_suffix(".png"), s.get("rank"))


def _plot(summaries: dict[int, dict[str, Any]], png: Path, rank: Any = "?") -> None:
    """Bar plot: time (Fisher + SVD vs epoch) and peak RSS (loaded + increment), one group per thread count."""
    plt = common.pyplot()
    groups = [(t, s["medians"]) for t, s in summaries.items() if {"fila", "epoch"} <= set(s.get("medians", {}))]
    if plt is None or not groups:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(5 + 3 * len(groups), 4.6))
    width = 0.35
    for i, (_threads, med) in enumerate(groups):
        f, e = med["fila"], med["epoch"]
        x_f, x_e = i - width / 2, i + width / 2
        first = i == 0
        ax_t.bar(x_f, f["fisher_seconds"], width, color="tab:orange", label="FILA: Fisher pass" if first else None)
        ax_t.bar(
            x_f,
            f["svd_seconds"],
            width,
            bottom=f["fisher_seconds"],
            color="tab:red",
            label="FILA: SVD" if first else None,
        )
        ax_t.bar(x_e, e["wall_seconds"], width, color="tab:blue", label="1 epoch IHL + retain NLL" if first else None)
        _target_line(ax_t, TARGETS["time"] * e["wall_seconds"], i, width, f"target {TARGETS['time']}x epoch", first)
        ax_t.text(x_f, f["wall_seconds"] * 1.02, f"{f['wall_seconds'] / e['wall_seconds']:.2f}x", ha="center")
        for x, m, color in ((x_f, f, "tab:orange"), (x_e, e, "tab:blue")):
            loaded = m["rss_loaded_bytes"] / common.GIB
            ax_m.bar(x, loaded, width, color="tab:gray", label="RSS after loading" if first and m is f else None)
            ax_m.bar(x, m["phase_increment_bytes"] / common.GIB, width, bottom=loaded, color=color)
        target = TARGETS["memory"] * e["phase_peak_rss_bytes"] / common.GIB
        _target_line(ax_m, target, i, width, f"target {TARGETS['memory']}x training peak", first)
        ax_m.text(
            x_f,
            f["phase_peak_rss_bytes"] / common.GIB * 1.02,
            f"{f['phase_peak_rss_bytes'] / e['phase_peak_rss_bytes']:.2f}x",
            ha="center",
        )
    ticks = [f"{t} thread{'s' if t > 1 else ''}\nFILA | epoch" for t, _ in groups]
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(groups)), ticks)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
        ax.legend(fontsize=8, loc="upper right")
    ax_t.set_ylabel("wall seconds (median)")
    ax_t.set_title("time (label: FILA / epoch)")
    ax_m.set_ylabel("peak RSS GiB (median, phase)")
    ax_m.set_title("peak memory (label: FILA / epoch)")
    fig.suptitle(f"Gemma-3 270M, LoRA r={rank}, CPU: FILA initialisation vs one unlearning epoch")
    common.save_figure(fig, png)


def _target_line(ax: Any, y: float, i: int, width: float, label: str, first: bool) -> None:
    """The dashed target line over bar group ``i`` (labelled in the legend for the first group only)."""
    ax.hlines(y, i - width, i + width, colors="k", linestyles="--", label=label if first else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="alias, local directory or Hub id")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--targets", nargs="+", default=list(common.PROJECTIONS))
    p.add_argument("--batch-size", type=int, default=4, help="training batch size and FILA Fisher batch size")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-forget", type=int, default=None, help="first N forget passages (default: all)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--control-threads",
        type=int,
        nargs="*",
        default=[],
        help="also measure every phase with these thread counts (e.g. 1: less sensitive to a shared machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--fresh", action="store_true", help="discard runs already in --results")
    p.add_argument("--timeout", type=int, default=3600, help="per-run timeout in seconds")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--notes-file", type=Path, help="markdown stored with the results and shown in the report")
    p.add_argument("--report-only", action="store_true")
    common.add_child_arguments(p)
    args = p.parse_args(argv)
    if common.run_as_child(args, run_phase):
        return

    if args.rank < 1 or args.batch_size < 1 or args.max_length < 2 or args.repeats < 1:
        p.error("--rank, --batch-size and --repeats must be >= 1 and --max-length >= 2")
    unknown = sorted(set(args.targets) - set(common.PROJECTIONS))
    if unknown:
        p.error(f"--targets {unknown} unknown; choose from {list(common.PROJECTIONS)}")

    results = {"runs": {}} if args.fresh else common.load_results(args.results)
    for run in results.get("runs", {}).values():  # drop a value distorted by the peak reset (older files)
        run["result"].get("fila_stats", {}).pop("peak_memory_bytes", None)
    if args.notes_file is not None:
        results["notes"] = args.notes_file.read_text()
    if args.report_only:
        report(results, args.results)
        common.write_json(args.results, results)
        return

    settings = {
        "model": args.model,
        "dtype": args.dtype,
        "rank": args.rank,
        "alpha": args.alpha if args.alpha is not None else 2.0 * args.rank,
        "targets": args.targets,
        "batch_size": args.batch_size,
        "fila_batch_size": args.batch_size,
        "max_length": args.max_length,
        "n_forget": args.n_forget,
        "lr": args.lr,
        "threads": args.threads,
        "seed": args.seed,
        "losses": "inverted_hinge + retain nll (retain_pairing=random)",
        "device": "cpu",
    }
    if results.get("settings") not in (None, settings):
        print(f"--results {args.results} holds other settings; starting over.", flush=True)
        results = {"runs": {}}
    results["settings"] = settings
    command = common.command_line(__file__, argv)
    machine = {
        **common.machine_info(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "note": args.note,
    }
    results["command"] = command
    results["machine"] = machine
    # interleave the phases so slow periods of the shared machine hit both
    thread_counts = [args.threads] + [t for t in args.control_threads if t != args.threads]
    plan = [(phase, rep, t) for rep in range(args.repeats) for t in thread_counts for phase in args.phases]
    for phase, rep, n_threads in plan:
        key = f"{phase}#{rep}" if n_threads == args.threads else f"{phase}#{rep}@{n_threads}threads"
        if key in results["runs"] and "error" not in results["runs"][key]["result"]:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {key} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
        result = child({**settings, "phase": phase, "threads": n_threads}, args.timeout)
        results["runs"][key] = {"phase": phase, "repeat": rep, "threads": n_threads, "result": result}
        common.write_json(args.results, results)
        report(results, args.results)
        common.write_json(args.results, results)
        msg = result.get("error", "")[-800:] or (
            f"wall {result['wall_seconds']:.1f} s, cpu {result['cpu_seconds']:.1f} s, "
            f"phase peak {result['phase_peak_rss_bytes'] / common.GIB:.2f} GiB, loaded {result['rss_loaded_bytes'] / common.GIB:.2f} GiB"
        )
        print(f"    {msg}", flush=True)
    machine["loadavg_at_end"] = list(os.getloadavg())
    report(results, args.results)
    common.write_json(args.results, results)


if __name__ == "__main__":
    main()
