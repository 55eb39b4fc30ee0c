"""Does the forgetting stick? `evaluate_robustness` on Gemma-3 270M after unlearning with every shipped recipe.

Each run unlearns the 8 memorized forget passages (``examples/data/forget.jsonl``) with one forget loss (+ its
retain loss), one adapter init and one seed, until forget MA and EL10 are at the never-seen level of the base
model or the step cap (the frontier's stopping rule), then runs every attack of
`peft_unlearn.metrics.evaluate_robustness` (bitsandbytes nf4 / fp4 / int8 reload, relearning on half of the
forget set for 1, 5, 15, 50 steps, merged and portable-adapter export, shifted / fixed-prefix / few-shot
prompts) with the memorized-heldout passages (``memorized_heldout.jsonl``, never trained on) as the knowledge that
must be kept. The base model under every attack is measured once (the ``reference`` run) and reused by every
run (`evaluate_robustness(reference=...)`): base, data and attack settings are the same for all.

Goal figures checked for every method: after nf4, fp4 and int8 the forget MA stays within 0.05 of the
unquantized unlearned model; after 15 relearning steps on half the forget set, the other half recovers at most a
quarter of the gap between the unlearned and the base forget MA.

Every run is a separate single-threaded subprocess; results are written after every run and finished runs are
skipped, so rerunning the same command resumes. The plan runs the shipped default first (IHL + retain NLL with
default LoRA and FILA, 3 seeds), then gradient difference, NPO, SimNPO and RMU with default LoRA (seed 0).

Usage::

    python benchmarks/robustness.py                  # the whole plan (resumes)
    python benchmarks/robustness.py --report-only    # rewrite .md/.png from the JSON
    python benchmarks/robustness.py --methods ihl-lora --seeds 0   # a part of the plan
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import common

DEFAULT_RESULTS = common.RESULTS / "robustness.json"
SETS = {"forget": "forget.jsonl", "mheldout": "memorized_heldout.jsonl", "retain": "retain.jsonl"}
NEVERSEEN = "heldout.jsonl"
QUANT_TOLERANCE = 0.05  # goal: |forget MA after quantization - unquantized unlearned MA| <= this
RELEARN_GOAL_STEPS = 15
RELEARN_GOAL_RECOVERY = 0.25  # goal: at most this fraction of the forget-MA gap comes back on the unseen half

#: method -> (label, forget loss, retain loss, init, learning rate). The learning rates are the sound ones of the
#: frontier (benchmarks/results/init_frontier*.md); NPO, SimNPO and RMU have no frontier yet and use LoRA's 1e-3.
METHODS = {
    "ihl-lora": ("IHL + retain NLL, LoRA", "inverted_hinge", "nll", "lora", 1e-3),
    "ihl-fila": ("IHL + retain NLL, FILA", "inverted_hinge", "nll", "fila", 1e-3),
    "ihl-lora-margin": ("IHL + retain NLL + quantization margin, LoRA", "inverted_hinge", "nll", "lora-margin", 1e-3),
    "gd-lora": ("gradient difference, LoRA", "gradient_ascent", "nll", "lora", 3e-4),
    "npo-lora": ("NPO + retain NLL, LoRA", "npo", "nll", "lora", 1e-3),
    "simnpo-lora": ("SimNPO + retain NLL, LoRA", "simnpo", "nll", "lora", 1e-3),
    "rmu-lora": ("RMU, LoRA", "rmu", "rmu", "lora", 1e-3),
}
FIRST_SEEDS_ONLY = ("ihl-lora-margin", "gd-lora", "npo-lora", "simnpo-lora", "rmu-lora")


# ----------------------------------------------------------------------------------------------
# one run (child process)
# ----------------------------------------------------------------------------------------------
def _robustness_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "el_n": spec["el_n"],
        "el_prefix_stride": spec["el_prefix_stride"],
        "batch_size": 8,
        "max_length": spec["max_length"],
        "relearn_steps": tuple(spec["relearn_steps"]),
        "seed": 0,  # the attacks' seed: the same for every run, so the base reference applies to all
    }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Unlearn with one (method, seed) and attack the result (public API only)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from peft_unlearn import UnlearningTrainer
    from peft_unlearn.metrics import RobustnessReport, evaluate_robustness
    from peft_unlearn.models import load_model_and_tokenizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model, tokenizer = load_model_and_tokenizer(spec["model"], dtype=spec["dtype"], show_progress=False)
    ids = {name: common.tokenize(tokenizer, common.read_texts(f), spec["max_length"]) for name, f in SETS.items()}
    if spec.get("thresholds_only"):  # the stopping rule: forget MA and EL at the base's never-seen level
        neverseen = common.tokenize(tokenizer, common.read_texts(NEVERSEEN), spec["max_length"])
        base = common.memorization(model, neverseen, spec, tokenizer.pad_token_id)
        return {"ma": base["ma"], "el": base[f"el{spec['el_n']}"]}
    kwargs = _robustness_kwargs(spec)
    t0 = time.perf_counter()
    if spec.get("reference"):  # the base model under every attack: a zero-initialised LoRA changes nothing
        model = get_peft_model(model, LoraConfig(**common.lora_kwargs(spec["rank"])))
        report = evaluate_robustness(model, tokenizer, ids["forget"], heldout=ids["mheldout"], **kwargs)
        return {"report": report.to_dict(), "attack_seconds": time.perf_counter() - t0}

    label, forget_loss, retain_loss, init, _ = METHODS[spec["method"]]
    if init == "fila":
        from peft_unlearn.fila import FilaLoraConfig

        config = FilaLoraConfig(**common.lora_kwargs(spec["rank"]))
    else:
        config = LoraConfig(**common.lora_kwargs(spec["rank"]))
    model = get_peft_model(model, config)
    monitor = common.forget_monitor(
        ids["forget"],
        tokenizer.pad_token_id,
        spec["thresholds"],
        el_n=spec["el_n"],
        prefix_stride=spec["el_prefix_stride"],
    )
    extra = {"quantization_margin": spec["margin"]} if init == "lora-margin" else {}
    args = common.unlearning_config(
        spec["output_dir"],
        spec,
        max_steps=spec["max_steps"],
        data_seed=spec["seed"],
        fila_batch_size=spec["batch_size"],
        forget_loss=forget_loss,
        retain_loss=retain_loss,
        **extra,
    )
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        forget_dataset=Dataset.from_dict({"input_ids": ids["forget"]}),
        retain_dataset=Dataset.from_dict({"input_ids": ids["retain"]}),
        processing_class=tokenizer,
        callbacks=[monitor],
    )
    trainer.train()
    train_seconds = time.perf_counter() - t0
    reference = RobustnessReport.from_dict(json.loads(Path(spec["results_path"]).read_text())["reference"]["report"])
    t1 = time.perf_counter()
    report = evaluate_robustness(
        trainer.model, tokenizer, ids["forget"], heldout=ids["mheldout"], reference=reference, **kwargs
    )
    return {
        "forgotten": monitor.forgotten_at is not None,
        "steps": monitor.forgotten_at or trainer.state.global_step,
        "train_seconds": train_seconds,
        "attack_seconds": time.perf_counter() - t1,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "report": report.to_dict(),
    }


# ----------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------
def _rows(report: dict[str, Any], **match: str) -> list[dict[str, Any]]:
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def _one(report: dict[str, Any], **match: str) -> dict[str, Any]:
    rows = _rows(report, **match)
    if len(rows) != 1:
        raise KeyError(f"{len(rows)} rows match {match}")
    return rows[0]


def summarize(report: dict[str, Any], relearn_steps: list[int]) -> dict[str, float]:
    """The figures of one run's report that the tables show."""
    out: dict[str, float] = {}
    forget = _one(report, attack="quantization", variant="nf4", set="forget", metric="ma")
    out["forget_ma"] = forget["unlearned_before"]
    out["base_forget_ma"] = forget["base_before"]
    held = _one(report, attack="quantization", variant="nf4", set="heldout", metric="ma")
    out["heldout_ma"] = held["unlearned_before"]
    for mode in ("nf4", "fp4", "int8"):
        row = _one(report, attack="quantization", variant=mode, set="forget", metric="ma")
        out[f"{mode}_forget_ma"] = row["unlearned_after"]
        out[f"{mode}_delta"] = row["unlearned_after"] - row["unlearned_before"]
        out[f"{mode}_base_forget_ma"] = row["base_after"]
        out[f"{mode}_heldout_ma"] = _one(report, attack="quantization", variant=mode, set="heldout", metric="ma")[
            "unlearned_after"
        ]
    for step in [0, *relearn_steps]:
        row = _one(report, attack="relearning", variant=f"steps={step}", set="forget_unseen", metric="ma")
        out[f"relearn{step}_unseen_ma"] = row["unlearned_after"]
        out[f"relearn{step}_recovery"] = row["gap_recovery"] if row["gap_recovery"] is not None else float("nan")
        out[f"relearn{step}_base_unseen_ma"] = row["base_after"]
    export = _rows(report, attack="export")
    out["export_max_delta"] = max(abs(r["unlearned_after"] - r["unlearned_before"]) for r in export)
    prompt = _rows(report, attack="prompt", metric="ma", set="forget")
    out["prompt_max_delta"] = max(r["unlearned_after"] - r["unlearned_before"] for r in prompt)
    worst = max(prompt, key=lambda r: r["gap_recovery"] if r["gap_recovery"] is not None else -1e9)
    out["prompt_worst_recovery"] = worst["gap_recovery"] if worst["gap_recovery"] is not None else float("nan")
    out["prompt_worst_variant"] = worst["variant"]
    return out


def goals(summary: dict[str, float]) -> dict[str, bool]:
    """The issue's goal figures for one run."""
    return {
        "quantization": all(abs(summary[f"{m}_delta"]) <= QUANT_TOLERANCE for m in ("nf4", "fp4", "int8")),
        "relearning": summary[f"relearn{RELEARN_GOAL_STEPS}_recovery"] <= RELEARN_GOAL_RECOVERY,
    }


def report(results: dict[str, Any], path: Path) -> None:
    """Write the markdown tables and the plot from the results."""
    settings = results.get("settings", {})
    steps = settings.get("relearn_steps", [1, 5, 15, 50])
    lines = common.report_head("Robustness of unlearning on Gemma-3 270M", results.get("commands", []), results)
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in results.get("runs", {}).values():
        groups.setdefault(run["spec"]["method"], []).append(run["result"])
    ref = results.get("reference")
    if ref:
        rsum = summarize(ref["report"], steps)
        lines += [
            "Base model (reference, every attack on the model before unlearning): forget MA "
            f"{rsum['forget_ma']:.3f}, memorized-heldout MA {rsum['heldout_ma']:.3f}; after nf4 / fp4 / int8 forget MA "
            f"{rsum['nf4_forget_ma']:.3f} / {rsum['fp4_forget_ma']:.3f} / {rsum['int8_forget_ma']:.3f} and heldout MA "
            f"{rsum['nf4_heldout_ma']:.3f} / {rsum['fp4_heldout_ma']:.3f} / {rsum['int8_heldout_ma']:.3f}: "
            "quantization alone lowers MA on the base as well.",
            "",
        ]
    lines += [
        "## Quantization (bitsandbytes reload of the merged model)",
        "",
        f"Δ = forget MA after quantization − the unquantized unlearned forget MA (goal: |Δ| <= {QUANT_TOLERANCE} for "
        "all three). Mean ± std over seeds.",
        "",
        "| method | runs | forgotten | steps | forget MA | Δ nf4 | Δ fp4 | Δ int8 | heldout MA | heldout MA nf4 "
        "| goal met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sums = {m: [summarize(r["report"], steps) for r in rs] for m, rs in groups.items()}
    for method in METHODS:
        if method not in groups:
            continue
        rs, ss = groups[method], sums[method]
        met = sum(goals(s)["quantization"] for s in ss)
        lines.append(
            f"| {METHODS[method][0]} | {len(rs)} | {sum(r['forgotten'] for r in rs)}/{len(rs)} "
            f"| {common.fmt([r['steps'] for r in rs], 1)} | {common.fmt([s['forget_ma'] for s in ss], 3)} | "
            + " | ".join(common.fmt([s[f"{m}_delta"] for s in ss], 3) for m in ("nf4", "fp4", "int8"))
            + f" | {common.fmt([s['heldout_ma'] for s in ss], 3)} | {common.fmt([s['nf4_heldout_ma'] for s in ss], 3)} "
            f"| {met}/{len(ss)} |"
        )
    lines += [
        "",
        "## Relearning (fresh LoRA r = 8, plain NLL, lr 1e-3, on half of the forget set)",
        "",
        "Forget MA of the half never relearned after k steps, and the fraction of the gap between the unlearned and "
        f"the base forget MA that came back (goal: <= {RELEARN_GOAL_RECOVERY:.0%} after {RELEARN_GOAL_STEPS} steps).",
        "",
        "| method | "
        + " | ".join(f"MA @{k}" for k in [0, *steps])
        + " | "
        + " | ".join(f"recovered @{k}" for k in steps)
        + " | goal met |",
        "|---|" + "---|" * (2 * len(steps) + 2),
    ]
    if ref:
        lines.append(
            "| base model | "
            + " | ".join(f"{rsum[f'relearn{k}_unseen_ma']:.3f}" for k in [0, *steps])
            + " | "
            + " | ".join("–" for _ in steps)
            + " | |"
        )
    for method in METHODS:
        if method not in groups:
            continue
        ss = sums[method]
        met = sum(goals(s)["relearning"] for s in ss)
        lines.append(
            f"| {METHODS[method][0]} | "
            + " | ".join(common.fmt([s[f"relearn{k}_unseen_ma"] for s in ss], 3) for k in [0, *steps])
            + " | "
            + " | ".join(common.fmt([s[f"relearn{k}_recovery"] for s in ss], 2) for k in steps)
            + f" | {met}/{len(ss)} |"
        )
    lines += [
        "",
        "## Export and prompt variants",
        "",
        "Export: the largest |Δ| of any forget / heldout metric after the merged reload (plain transformers) and the "
        "portable adapter on the original base (plain PEFT). Prompts: the largest rise of forget MA over the "
        "prompt variants (shifted starts, fixed prefixes, few-shot prefix), and the largest gap recovery.",
        "",
        "| method | export max abs Δ | prompt max MA rise | prompt worst recovery (variant) |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        if method not in groups:
            continue
        ss = sums[method]
        variants = sorted({s["prompt_worst_variant"] for s in ss})
        lines.append(
            f"| {METHODS[method][0]} | {common.fmt([s['export_max_delta'] for s in ss], 4)} "
            f"| {common.fmt([s['prompt_max_delta'] for s in ss], 3)} "
            f"| {common.fmt([s['prompt_worst_recovery'] for s in ss], 2)} ({', '.join(variants)}) |"
        )
    not_run = [METHODS[m][0] for m in METHODS if m not in groups]
    if not_run:
        lines += ["", "Not run (yet): " + "; ".join(not_run) + "."]
    if results.get("failures"):
        lines += ["", "Failed attempts (retried on the next run of the command):", ""]
        lines += [f"- `{k}`: {v['error'][-200:]!r}" for k, v in sorted(results["failures"].items())]
    lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines))
    _plot(results, groups, path.with_suffix(".png"))


def _plot(results: dict[str, Any], groups: dict[str, list[dict[str, Any]]], png: Path) -> None:
    if not groups or common.pyplot() is None:
        return
    from peft_unlearn.metrics import RobustnessReport
    from peft_unlearn.plotting import plot_relearning

    reports = {
        METHODS[m][0]: [RobustnessReport.from_dict(r["report"]) for r in groups[m]] for m in METHODS if m in groups
    }
    plot_relearning(
        reports,
        title="Gemma-3 270M: forget MA of the never-relearned half vs relearning steps",
        path=png,
        figsize=(8.0, 5.0),
    )


# ----------------------------------------------------------------------------------------------
# orchestration (parent process)
# ----------------------------------------------------------------------------------------------
def run_key(spec: dict[str, Any]) -> str:
    return f"{spec['method']}|s{spec['seed']}"


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The shipped default (IHL, LoRA and FILA) over every seed first, then the defence (the quantization margin)
    and the other losses on the first seed, in the order of ``FIRST_SEEDS_ONLY``."""
    runs = []
    for method in args.methods:
        seeds = args.seeds[:1] if method in FIRST_SEEDS_ONLY else args.seeds
        runs += [{"method": method, "seed": seed, "lr": METHODS[method][4]} for seed in seeds]
    head = [r for r in runs if r["method"] not in FIRST_SEEDS_ONLY]
    tail = [r for r in runs if r["method"] in FIRST_SEEDS_ONLY]
    return head + sorted(tail, key=lambda r: FIRST_SEEDS_ONLY.index(r["method"]))


def main(argv: list[str] | None = None) -> None:
    p = common.benchmark_parser(__doc__, DEFAULT_RESULTS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--relearn-steps", nargs="+", type=int, default=[1, 5, 15, 50])
    p.add_argument("--margin", type=float, default=2.0, help="quantization_margin of the ihl-lora-margin method")
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    common.add_run_arguments(p, max_steps=10)
    common.add_child_arguments(p)
    args = p.parse_args(argv)
    if common.run_as_child(args, run_one):
        return
    results = common.load_results(args.results)
    results.setdefault("failures", {})
    if args.report_only:
        report(results, args.results)
        return
    settings = {
        "model": args.model,
        "dtype": args.dtype,
        "rank": args.rank,
        **common.run_settings(args),
        "relearn_steps": args.relearn_steps,
        "optimizer": common.RECIPE,
        "lora": "q,k,v,o,gate,up,down projections, alpha = 2r, dropout 0",
    }
    common.check_settings(results, settings, ("model", "dtype", "max_length", "el_n", "relearn_steps"), args.results)
    base_spec = {k: settings[k] for k in ("model", "dtype", "batch_size", "max_length", "el_n", "el_prefix_stride")}
    base_spec.update(threads=args.threads, rank=args.rank, relearn_steps=args.relearn_steps)
    common.record_command(results, common.command_line(__file__, argv))
    results["settings"] = settings
    results["machine"] = common.machine_info()
    common.save_results(args.results, results)

    if "thresholds" not in results:
        from peft_unlearn.metrics import evaluate_memorization  # noqa: F401  (fails fast without the package)

        common.say("measuring the never-seen thresholds ...")
        results["thresholds"] = common.or_exit(
            common.run_child(
                __file__,
                {**base_spec, "thresholds_only": True, "seed": 0},
                args.timeout,
                env=common.child_env(args.threads),
            )
        )
        results["thresholds"].pop("wall_seconds", None)
        common.save_results(args.results, results)
    if "reference" not in results:
        common.say("attacking the base model (reference) ...")
        ref = common.or_exit(
            common.run_child(
                __file__, {**base_spec, "reference": True, "seed": 0}, args.timeout, env=common.child_env(args.threads)
            )
        )
        results["reference"] = ref
        common.save_results(args.results, results)
        common.say(f"reference done in {ref['wall_seconds']:.0f} s")
    _safe_report(results, args.results)
    for spec in plan(args):
        key = run_key(spec)
        if key in results["runs"] or results["failures"].get(key, {}).get("count", 0) > args.retries:
            continue
        common.say(f"start {key}")
        full = {
            **base_spec,
            **spec,
            "max_steps": args.max_steps,
            "thresholds": results["thresholds"],
            "margin": args.margin,
            "results_path": str(args.results.resolve()),
        }
        result = common.run_child(__file__, full, args.timeout, env=common.child_env(args.threads))
        if "error" in result:
            entry = results["failures"].setdefault(key, {"count": 0})
            entry["count"] += 1
            entry["error"] = result["error"]
            common.say(f"FAILED {key}: {result['error'][-800:]}")
        else:
            results["failures"].pop(key, None)
            results["runs"][key] = {"spec": spec, "result": result}
            s = summarize(result["report"], args.relearn_steps)
            common.say(
                f"done {key}: forgotten={result['forgotten']} steps={result['steps']} forget_ma={s['forget_ma']:.3f} "
                f"nf4 Δ={s['nf4_delta']:+.3f} relearn15={s['relearn15_recovery']:.2f} wall={result['wall_seconds']:.0f}s"
            )
        common.save_results(args.results, results)
        _safe_report(results, args.results)


def _safe_report(results: dict[str, Any], path: Path) -> None:
    """A broken report must not stop the measurements (rerun with --report-only after fixing it)."""
    try:
        report(results, path)
    except Exception as exc:  # noqa: BLE001
        common.say(f"report failed ({type(exc).__name__}: {exc}); the JSON is saved, rerun with --report-only")


if __name__ == "__main__":
    main()
