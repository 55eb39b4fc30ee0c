"""Memorized-text unlearning on Gemma-3 270M: forget losses x {full fine-tuning, LoRA, FILA}.

Reproduces the shape of the paper's memorized-text experiment (Cha et al. 2025, Jang et al. 2023)
offline on CPU: the forget set is public text Gemma-3 270M has memorized (``examples/data``), the
retain set is original encyclopedic prose, and the never-seen set gives the stopping thresholds.

Every run stops as soon as forget MA **and** EL_n are at or below the never-seen level of the
base model ("forgotten"), or at ``--max-steps``. At the stop it also measures the MA of the
memorized-heldout set (``memorized_heldout.jsonl``: memorized public passages that are never trained
on, the knowledge to keep); runs recorded before that set existed have no such value. Forget MA is checked after every optimizer step;
EL_n only once MA is below its threshold; retain MA and never-seen perplexity only at the stop.
Each run is a separate subprocess, so its peak memory (``VmHWM``) is its own.

Results are appended to ``--results`` (JSON) after every run, and the markdown table and plot are
rewritten from it; finished runs are skipped, so the script resumes where it stopped. Several runners
(e.g. one per ``--phase``) may share one results file: each save merges with what the others wrote.

Usage::

    python benchmarks/gemma3_unlearning.py                 # grid (seed 0 first) + rank sweep
    python benchmarks/gemma3_unlearning.py --phase lr-probe  # the learning-rate probe
    python benchmarks/gemma3_unlearning.py --report-only     # rewrite .md/.png from the JSON
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import common

DEFAULT_RESULTS = common.RESULTS / "gemma3_unlearning.json"

LOSSES = {
    # name: (forget_loss, retain_loss); the paper's method first, so a partial run still compares it
    "IHL+retain": ("inverted_hinge", "nll"),
    "GA": ("gradient_ascent", None),
    "GD": ("gradient_ascent", "nll"),
    "NPO+retain": ("npo", "nll"),
}
METHODS = ("full", "lora", "fila")


# ----------------------------------------------------------------------------------------------
# one run (child process)
# ----------------------------------------------------------------------------------------------
def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration until forgotten (or the step cap) and measure it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    import peft_unlearn  # noqa: F401  (registers "fila")
    from peft_unlearn import UnlearningTrainer
    from peft_unlearn.models import load_model_and_tokenizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    t_load = time.time()
    quant = {}
    if spec.get("load_in_4bit"):  # QLoRA: nf4 base, fp32 compute (bitsandbytes runs it on CPU)
        from transformers import BitsAndBytesConfig

        quant["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    model, tokenizer = load_model_and_tokenizer(spec["model"], dtype=spec["dtype"], **quant)
    for module in model.modules():  # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights at eval-mode
        if hasattr(module, "support_avx512bf16_for_cpu"):  # no-grad forwards, after which no gradient flows
            module.support_avx512bf16_for_cpu = False  # through them: keep the trainable layout
    load_seconds = time.time() - t_load

    forget_ids = common.tokenize(tokenizer, common.read_texts("forget.jsonl", spec["n_forget"]), spec["max_length"])
    retain_ids = common.tokenize(tokenizer, common.read_texts("retain.jsonl"), spec["max_length"])
    heldout_ids = common.tokenize(tokenizer, common.read_texts("heldout.jsonl"), spec["max_length"])
    kept_ids = common.tokenize(tokenizer, common.read_texts("memorized_heldout.jsonl"), spec["max_length"])
    pad_id = tokenizer.pad_token_id
    el_key = f"el{spec['el_n']}"

    if spec.get("baseline_mheldout"):  # added to an existing baseline: the memorized-heldout set alone
        return common.memorization(model, kept_ids, spec, pad_id)
    if spec.get("baseline"):
        out = {  # EL (greedy generation) is costly: not needed on retain
            name: common.memorization(model, ids, spec, pad_id, compute_el=name != "retain")
            for name, ids in (("forget", forget_ids), ("retain", retain_ids), ("heldout", heldout_ids))
        }
        out["mheldout"] = common.memorization(model, kept_ids, spec, pad_id)
        out["load_seconds"] = load_seconds
        return out

    method, rank = spec["method"], spec["rank"]
    if method != "full":
        kw = common.lora_kwargs(rank)
        if method == "fila":  # this grid measured the paper's factor magnitudes (the library default is "stable")
            from peft_unlearn.fila import FilaConfig, FilaLoraConfig

            lora = FilaLoraConfig(**kw, fila_config=FilaConfig(factor_scale="paper"))
        else:
            lora = LoraConfig(**kw, init_lora_weights=True)
        model = get_peft_model(model, lora)

    forget_loss, retain_loss = LOSSES[spec["loss"]]
    monitor = common.forget_monitor(
        forget_ids, pad_id, spec["thresholds"], el_n=spec["el_n"], prefix_stride=spec["el_prefix_stride"]
    )
    args = common.unlearning_config(
        spec["output_dir"],
        spec,
        forget_loss=forget_loss,
        retain_loss=retain_loss,
        max_steps=spec["max_steps"],
        data_seed=spec["seed"],
        fila_batch_size=spec["batch_size"],
    )
    ref_model = None
    if method == "full" and forget_loss == "npo":  # adapters use their initial state; full FT needs a frozen copy
        ref_model, _ = load_model_and_tokenizer(spec["model"], dtype=spec["dtype"])
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        forget_dataset=Dataset.from_dict({"input_ids": forget_ids}),
        retain_dataset=Dataset.from_dict({"input_ids": retain_ids}) if retain_loss else None,
        processing_class=tokenizer,
        ref_model=ref_model,
        callbacks=[monitor],
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    fila_stats = common.init_stats(trainer)
    fila_seconds = float(fila_stats.get("seconds", 0.0))
    m = trainer.model
    # EL is the costly part (greedy generation): reuse the monitor's value when it stopped the run
    final = {"forget": common.memorization(m, forget_ids, spec, pad_id, compute_el=monitor.forgotten_at is None)}
    if monitor.forgotten_at is not None:
        final["forget"][el_key] = monitor.history[-1][f"forget_{el_key}"]
    for name, ids in (("retain", retain_ids), ("heldout", heldout_ids), ("mheldout", kept_ids)):
        final[name] = common.memorization(m, ids, spec, pad_id, compute_el=False)
    steps = trainer.state.global_step
    return {
        "forgotten": monitor.forgotten_at is not None,
        "steps": monitor.forgotten_at if monitor.forgotten_at is not None else steps,
        "steps_run": steps,
        "train_seconds": wall - monitor.eval_seconds - fila_seconds,
        "fila_init_seconds": fila_seconds,
        "fila_stats": fila_stats,
        "monitor_seconds": monitor.eval_seconds,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "forget_ma": final["forget"]["ma"],
        f"forget_{el_key}": final["forget"][el_key],
        "retain_ma": final["retain"]["ma"],
        "retain_nll": final["retain"]["nll"],
        "heldout_ppl": final["heldout"]["ppl"],
        "mheldout_ma": final["mheldout"]["ma"],
        "history": monitor.history,
        "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
    }


# ----------------------------------------------------------------------------------------------
# orchestration (parent process)
# ----------------------------------------------------------------------------------------------
def run_key(spec: dict[str, Any]) -> str:
    return (
        f"{spec['loss']}|{spec['method']}|r{spec['rank']}|lr{spec['lr']:g}|s{spec['seed']}"
        f"|bs{spec['batch_size']}|cap{spec['max_steps']}" + ("|4bit" if spec.get("load_in_4bit") else "")
    )


def plan(args: argparse.Namespace, phase: str | None = None) -> list[dict[str, Any]]:
    """The runs of ``phase`` (default ``args.phase``) in the order they are run."""
    phase = phase or args.phase
    lr_for = {"full": args.lr_full, "lora": args.lr_lora, "fila": args.lr_fila}
    runs: list[dict[str, Any]] = []
    probe = [
        {"loss": "IHL+retain", "method": method, "rank": 8, "seed": args.seeds[0], "lr": lr, "tag": "lr-probe"}
        for method, lrs in (
            ("fila", args.probe_lr_fila),
            ("lora", args.probe_lr_lora),
            ("full", args.probe_lr_full),
        )
        for lr in lrs
    ]
    if phase == "lr-probe":
        return probe
    if phase == "qlora":  # LoRA vs FILA on a 4-bit (nf4) base, seed 0
        return [
            {"loss": "IHL+retain", "method": m, "rank": 8, "seed": args.seeds[0], "lr": lr_for[m], "tag": "qlora"}
            | {"load_in_4bit": True}
            for m in ("lora", "fila")
        ]
    if phase in ("grid", "all"):
        for seed in args.seeds:
            for loss in args.losses:
                for method in METHODS:
                    runs.append(
                        {"loss": loss, "method": method, "rank": 8, "seed": seed, "lr": lr_for[method], "tag": "grid"}
                    )
            if phase == "all" and seed == args.seeds[0]:  # one seed of everything before more seeds
                runs.extend(probe)
                runs.extend(_rank_runs(args, lr_for))
    if phase == "ranks":
        runs.extend(_rank_runs(args, lr_for))
    return runs


def tags_by_key(args: argparse.Namespace, base_spec: dict[str, Any]) -> dict[str, list[str]]:
    """Which tables each run belongs to under the current settings.

    A run can serve two tables (the probe's FILA lr may be the grid's FILA lr), and a run measured
    under an earlier choice of learning rates must leave the grid table, so membership is derived
    from the full plan rather than stored with the run.
    """
    tags: dict[str, list[str]] = {}
    for spec in plan(args, "all") + plan(args, "grid") + plan(args, "lr-probe") + plan(args, "qlora"):
        key = run_key({**base_spec, **spec})
        if spec["tag"] not in tags.setdefault(key, []):
            tags[key].append(spec["tag"])
    return tags


def _rank_runs(args, lr_for) -> list[dict[str, Any]]:
    return [
        {
            "loss": "IHL+retain",
            "method": method,
            "rank": rank,
            "seed": args.seeds[0],
            "lr": lr_for[method],
            "tag": "ranks",
        }
        for rank in args.ranks
        if rank != 8
        for method in ("lora", "fila")
    ]


def child(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    return common.run_child(__file__, spec, timeout, env=common.child_env(spec["threads"]))


def _timed_child(key: str, spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    common.say(f"start {key}")
    return child(spec, timeout)


def _tags(run: dict[str, Any]) -> list[str]:
    spec = run["spec"]
    return spec.get("tags") or [spec.get("tag", "other")]


def report(results: dict[str, Any], path: Path) -> None:
    """Write the markdown table and the plot next to the JSON."""
    runs = [r for r in results["runs"].values() if "error" not in r["result"]]
    base = results.get("baseline", {})
    lines = common.report_head(
        "Memorized-text unlearning on Gemma-3 270M (CPU)",
        results.get("commands", [results.get("command", "")]),
        results,
    )
    if base:
        el_key = f"el{results['settings']['el_n']}"
        lines += [
            "Base model before unlearning (per-sequence means):",
            "",
            "| set | MA | EL | NLL | PPL |",
            "|---|---|---|---|---|",
        ]
        for name in ("forget", "retain", "heldout", "mheldout"):
            if name not in base:
                continue
            b = base[name]
            label = {"heldout": "never-seen (heldout.jsonl)", "mheldout": "memorized heldout"}.get(name, name)
            lines.append(
                f"| {label} | {b['ma']:.3f} | {b.get(el_key, float('nan')):.3f} | {b['nll']:.3f} | {b['ppl']:.2f} |"
            )
        lines += [
            "",
            f"Stopping thresholds (never-seen level): MA <= {results['thresholds']['ma']:.3f}, "
            f"{el_key.upper()} <= {results['thresholds']['el']:.3f}",
            "",
        ]

    def table(tag: str, group_keys: tuple[str, ...], title: str) -> None:
        sel = [r for r in runs if tag in _tags(r)]
        if not sel:
            return
        groups: dict[tuple, list[dict]] = {}
        for r in sel:
            groups.setdefault(tuple(r["spec"][k] for k in group_keys), []).append(r["result"])
        lines.extend(
            [
                f"## {title}",
                "",
                "| "
                + " | ".join(group_keys)
                + " | seeds | forgotten | steps | train s | FILA init s | retain MA | heldout MA | never-seen PPL"
                " | forget MA | peak RSS GiB |",
                "|" + "---|" * (len(group_keys) + 10),
            ]
        )
        for key in sorted(groups, key=str):
            rs = groups[key]
            lines.append(
                "| " + " | ".join(str(k) for k in key) + f" | {len(rs)} | {sum(r['forgotten'] for r in rs)}/{len(rs)}"
                f" | {common.fmt([r['steps'] for r in rs], 1)} | {common.fmt([r['train_seconds'] for r in rs], 0)}"
                f" | {common.fmt([r['fila_init_seconds'] for r in rs], 1)} | {common.fmt([r['retain_ma'] for r in rs], 3)}"
                f" | {common.fmt([r['mheldout_ma'] for r in rs if 'mheldout_ma' in r], 3)}"
                f" | {common.fmt([r['heldout_ppl'] for r in rs], 1)} | {common.fmt([r['forget_ma'] for r in rs], 3)}"
                f" | {common.fmt([r['peak_rss_bytes'] / 2**30 for r in rs], 2)} |"
            )
        lines.append("")

    table("grid", ("loss", "method", "rank", "lr"), "Forget losses x methods (r = 8)")
    table("ranks", ("loss", "method", "rank", "lr"), "Rank sweep (IHL + retain NLL, seed 0; r = 8 is in the grid)")
    table("lr-probe", ("loss", "method", "rank", "lr"), "Learning-rate probe (seed 0)")
    table("qlora", ("loss", "method", "rank", "lr"), "QLoRA: 4-bit nf4 base (IHL + retain NLL, seed 0)")
    table("other", ("loss", "method", "rank", "lr", "seed"), "Other runs (not part of the current plan)")
    lines += [
        "Columns: `steps` = optimizer steps until forget MA and EL are both at or below the never-seen level "
        "(the step cap when not forgotten); `train s` = training wall time excluding the per-step forget-MA checks "
        "and the FILA initialisation; retain MA, memorized-heldout MA, never-seen perplexity and forget MA are measured "
        "at the stop (heldout MA: mean over the runs that measured it; '–' = every run predates the memorized-heldout "
        "set). "
        "Mean ± sample std over seeds.",
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(lines))
    _plot(runs, path.with_suffix(".png"))


def _plot(runs: list[dict[str, Any]], png: Path) -> None:
    plt = common.pyplot()
    grid = [r for r in runs if "grid" in _tags(r)]
    ranks = [r for r in runs if {"ranks", "grid"} & set(_tags(r)) and r["spec"]["loss"] == "IHL+retain"]
    if plt is None or not grid:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"full": "tab:gray", "lora": "tab:blue", "fila": "tab:orange"}
    losses = [loss for loss in LOSSES if any(r["spec"]["loss"] == loss for r in grid)]
    width = 0.27
    for ax, metric, label in (
        (axes[0], "steps", "steps until forgotten (cap if not)"),
        (axes[1], "retain_ma", "retain MA at stop"),
    ):
        for j, method in enumerate(METHODS):
            means, stds = [], []
            for loss in losses:
                vals = [
                    r["result"][metric] for r in grid if r["spec"]["loss"] == loss and r["spec"]["method"] == method
                ]
                m, s = common.mean_std(vals)
                means.append(m)
                stds.append(s)
            xs = [i + (j - 1) * width for i in range(len(losses))]
            ax.bar(xs, means, width, yerr=stds, label=method, color=colors[method], capsize=3)
        ax.set_xticks(range(len(losses)), losses)
        ax.set_ylabel(label)
        ax.legend()
    ax = axes[2]
    for method in ("lora", "fila"):
        pts = sorted(
            (r["spec"]["rank"], r["result"]["steps"])
            for r in ranks
            if r["spec"]["method"] == method and r["spec"]["seed"] == 0
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method, color=colors[method])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("steps until forgotten (IHL)")
    ax.legend()
    fig.suptitle("Gemma-3 270M, memorized-text unlearning (CPU)")
    common.save_figure(fig, png)


def main(argv: list[str] | None = None) -> None:
    p = common.benchmark_parser(__doc__, DEFAULT_RESULTS)
    p.add_argument("--phase", choices=["all", "grid", "ranks", "lr-probe", "qlora"], default="all")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32])
    p.add_argument("--lr-lora", type=float, default=1e-3, help="learning rate of default-init LoRA in the grid")
    p.add_argument("--lr-fila", type=float, default=1e-4, help="learning rate of FILA in the grid")
    p.add_argument("--lr-full", type=float, default=1e-5, help="learning rate of full fine-tuning in the grid")
    p.add_argument("--probe-lr-lora", nargs="+", type=float, default=[1e-4, 3e-4])
    p.add_argument("--probe-lr-fila", nargs="+", type=float, default=[3e-4, 1e-3])
    p.add_argument("--probe-lr-full", nargs="+", type=float, default=[1e-4])
    p.add_argument("--jobs", type=int, default=1, help="runs measured in parallel (each a subprocess)")
    p.add_argument("--n-forget", type=int, default=8)
    common.add_run_arguments(p, max_steps=20)
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--redo",
        nargs="+",
        default=[],
        metavar="KEY",
        help="measure these finished runs again (keys as printed, e.g. 'IHL+retain|lora|r8|lr0.001|s0|bs4|cap20')",
    )
    common.add_child_arguments(p)
    args = p.parse_args(argv)
    if common.run_as_child(args, run_one):
        return

    results = common.load_results(args.results)
    settings = {
        "model": args.model,
        "dtype": args.dtype,
        "n_forget": args.n_forget,
        **common.run_settings(args),
        "optimizer": common.RECIPE,
        "lora": "all attention+MLP projections, alpha = 2r, dropout 0",
    }
    eval_keys = ("model", "dtype", "n_forget", "max_length", "el_n", "el_prefix_stride")
    common.check_settings(results, settings, eval_keys, args.results)
    base_spec = {  # what every run shares
        k: settings[k]
        for k in (
            "model",
            "dtype",
            "n_forget",
            "batch_size",
            "max_length",
            "max_steps",
            "el_n",
            "el_prefix_stride",
            "threads",
        )
    }
    tags = tags_by_key(args, base_spec)
    for key, run in results["runs"].items():
        run["spec"]["tags"] = tags.get(key, ["other"])
    if args.report_only:
        report(results, args.results)
        return
    results["settings"] = settings
    if "command" in results:  # files from before "commands" existed hold the one command that filled them
        results.setdefault("commands", [results["command"]])
    results["command"] = common.command_line(__file__, argv)
    common.record_command(results, results["command"])
    results["machine"] = common.machine_info()
    if "baseline" not in results:
        print("measuring the base model (thresholds) ...", flush=True)
        base = common.or_exit(child({**base_spec, "baseline": True, "seed": 0}, args.timeout))
        results["baseline"] = base
        results["thresholds"] = {"ma": base["heldout"]["ma"], "el": base["heldout"][f"el{args.el_n}"]}
        common.save_results(args.results, results)
    if "mheldout" not in results["baseline"]:  # a baseline measured before the memorized-heldout set existed
        print("measuring the base model on the memorized-heldout set ...", flush=True)
        kept = common.or_exit(child({**base_spec, "baseline_mheldout": True, "seed": 0}, args.timeout))
        kept.pop("wall_seconds", None)
        results["baseline"]["mheldout"] = kept
        common.save_results(args.results, results)
    unknown = [key for key in args.redo if key not in results["runs"]]
    if unknown:
        raise SystemExit(f"--redo: no run {unknown} in {args.results}; finished runs: {sorted(results['runs'])}")
    todo = []  # a run to redo keeps its old result until the new one replaces it
    for spec in [*plan(args), *(results["runs"][key]["spec"] for key in args.redo)]:
        spec = {**base_spec, **spec, "thresholds": results["thresholds"]}
        key = run_key(spec)
        done = key in results["runs"] and "error" not in results["runs"][key]["result"] and key not in args.redo
        if not done and key not in (k for k, _ in todo):
            todo.append((key, spec))
    kept = ("loss", "method", "rank", "seed", "lr", "batch_size", "max_steps")
    # runs are independent subprocesses; only this thread saves (merged with other runners' saves, under a lock)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {}
        for key, spec in todo:
            futures[pool.submit(_timed_child, key, spec, args.timeout)] = (key, spec)
        for fut in as_completed(futures):
            key, spec = futures[fut]
            result = fut.result()
            results["runs"][key] = {
                "spec": {**{k: spec[k] for k in kept}, "tags": tags.get(key, ["other"])},
                "result": result,
            }
            common.save_results(args.results, results)
            report(results, args.results)
            msg = result.get("error", "")[-500:] or (
                f"forgotten={result['forgotten']} steps={result['steps']} train_s={result['train_seconds']:.0f} "
                f"retain_ma={result['retain_ma']:.3f} ppl={result['heldout_ppl']:.1f} forget_ma={result['forget_ma']:.3f}"
            )
            common.say(f"done {key}: {msg}")
    report(results, args.results)


if __name__ == "__main__":
    main()
