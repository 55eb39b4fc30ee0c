"""The forget-versus-keep frontier of LoRA initialisations on Gemma-3 270M (IHL + retain NLL).

Question: does a data-driven LoRA init (FILA at the paper's factor scale, FILA at the normalised
"stable" scale, VILA) forget memorized text in fewer steps than the default LoRA init *without* more
collateral damage on memorized text that must be kept? Every init runs at several learning rates and
seeds; each run stops as soon as forget MA **and** EL10 are at the never-seen level of the base model
(or at ``--max-steps``). At the stop it measures the memorized-heldout set (public passages the model
has memorized as well as the forget set but that are never trained on), never-seen perplexity and
retain MA.

Data (``examples/data``): forget = ``forget.jsonl`` (8 memorized public passages), memorized heldout =
``memorized_heldout.jsonl`` (8 more, never trained on), retain = ``retain.jsonl``, never-seen =
``heldout.jsonl`` (sets the stopping thresholds).

Every run is a separate single-threaded subprocess, so code that lands while the benchmark runs is
picked up by later runs. Results are written after every run; finished runs are skipped, so rerunning
the same command resumes. Runs of an init whose code is not available yet (a ``FilaConfig`` without
``factor_scale``, no ``peft_unlearn.fila.vila``) wait; the plan runs seed 0 of every (init, lr) first.

Usage::

    python benchmarks/init_frontier.py                       # the whole plan (resumes)
    python benchmarks/init_frontier.py --report-only         # rewrite .md/.png from the JSON
    python benchmarks/init_frontier.py --time-one lora:1e-3  # time one run, write nothing
    python benchmarks/init_frontier.py --forget-loss gradient_ascent  # gradient difference, its own file
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

DEFAULT_RESULTS = common.RESULTS / "init_frontier.json"

#: init name -> label in tables and plots
INITS = {
    "lora": "LoRA (default init)",
    "fila-paper": "FILA, paper scale",
    "fila-stable": "FILA, stable scale",
    "vila": "VILA",
    "vila-stable": "VILA, stable scale",
    "rila": "RILA (ReGLU)",
    "rila+rol": "RILA + retain-subspace penalty",
    "lora+rol": "LoRA + retain-subspace penalty",
}
#: inits that add the retain-subspace penalty (ReGLU's ROL) at ReGLU's official weight and rank
ROL_SETTINGS = {"retain_subspace_weight": 0.5, "retain_subspace_rank": 128}
SETS = ("forget", "mheldout", "retain", "neverseen")
FORGET_LOSS_LABELS = {"inverted_hinge": "IHL", "gradient_ascent": "gradient ascent", "npo": "NPO"}
"""Forget losses the frontier can run (next to the retain NLL), with their labels in titles."""
FILES = {
    "forget": "forget.jsonl",
    "mheldout": "memorized_heldout.jsonl",
    "retain": "retain.jsonl",
    "neverseen": "heldout.jsonl",
}
KEEP_MARGIN = 0.05  # heldout MA may drop at most this much below the base model
PPL_MARGIN = 1.10  # a run that forgot is "sound" when never-seen perplexity stays within 10% of the base


# ----------------------------------------------------------------------------------------------
# availability of an init in the current code (checked in a fresh process, so new code counts)
# ----------------------------------------------------------------------------------------------
_PROBE = r"""
import json, sys
init = sys.argv[1]
ok, why = True, ""
try:
    if init in ("fila-paper", "fila-stable"):
        from peft_unlearn.fila import FilaConfig
        if init == "fila-stable":
            FilaConfig(factor_scale="stable")
    if init.endswith("+rol"):
        from peft_unlearn import UnlearningConfig
        if "retain_subspace_weight" not in UnlearningConfig.__dataclass_fields__:
            raise RuntimeError("UnlearningConfig has no retain_subspace_weight (the ROL penalty) yet")
    if init.startswith("rila"):
        from peft_unlearn.fila import initialize_rila_weights  # noqa: F401
    elif init in ("vila", "vila-stable"):
        from peft import LoraConfig, get_peft_model
        from peft_unlearn.fila import initialize_vila_weights  # noqa: F401
        from peft_unlearn.fila import pending_data_driven_adapters
        from peft_unlearn.testing import tiny_causal_lm
        model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="vila"))
        if not pending_data_driven_adapters(model):
            ok, why = False, "init_lora_weights='vila' is not marked pending (trainer auto-init missing)"
except Exception as exc:
    ok, why = False, f"{type(exc).__name__}: {exc}"
print(json.dumps({"ok": ok, "why": why[:300]}))
"""


def available(init: str) -> tuple[bool, str]:
    """Whether ``init`` can run with the code as it is now (a fresh interpreter decides)."""
    if init == "lora":
        return True, ""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, init],
        capture_output=True,
        text=True,
        env=common.child_env(1),
        timeout=300,
        cwd=common.ROOT,
    )
    if proc.returncode != 0:
        return False, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "probe failed"
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer["ok"], answer["why"]


# ----------------------------------------------------------------------------------------------
# one run (child process)
# ----------------------------------------------------------------------------------------------
def default_results_path(forget_loss: str = "inverted_hinge", device: str = "cpu") -> Path:
    """The results file of a loss and device: `init_frontier.json` for IHL on the CPU, else suffixed.

    Steps and metrics are only compared within one file, so another loss or device gets its own, e.g.
    `init_frontier_gradient_ascent.json` or `init_frontier_cuda0.json`.
    """
    suffix = [forget_loss] if forget_loss != "inverted_hinge" else []
    suffix += [device.replace(":", "")] if device != "cpu" else []
    return DEFAULT_RESULTS.with_name(f"init_frontier_{'_'.join(suffix)}.json") if suffix else DEFAULT_RESULTS


def _loss_label(results: dict[str, Any]) -> str:
    """The loss of a results file for titles, e.g. "IHL + retain NLL" (files without the setting are IHL)."""
    return results.get("settings", {}).get("loss", "IHL + retain NLL").replace(" (weights 1)", "")


def _texts(name: str) -> list[str]:
    return common.read_texts(FILES[name])


def _lora_config(init: str, rank: int):
    from peft import LoraConfig

    kw = common.lora_kwargs(rank)
    if init in ("lora", "lora+rol"):
        return LoraConfig(**kw, init_lora_weights=True)
    if init in ("rila", "rila+rol"):  # the trainer runs the init (ReGLU's defaults: beta 0.8, 256 samples, c = 1)
        return LoraConfig(**kw, init_lora_weights="rila")
    from peft_unlearn.fila import FilaConfig, FilaLoraConfig

    if init == "vila":  # the paper's factor magnitudes, explicitly (the library default is now "stable")
        return FilaLoraConfig(**kw, init_lora_weights="vila", fila_config=FilaConfig(factor_scale="paper"))
    if init == "vila-stable":  # initialised before the trainer starts, see run_one
        return LoraConfig(**kw, init_lora_weights="vila")

    if "factor_scale" in FilaConfig.__dataclass_fields__:
        scale = "paper" if init == "fila-paper" else "stable"
        return FilaLoraConfig(**kw, fila_config=FilaConfig(factor_scale=scale))
    if init == "fila-stable":
        raise RuntimeError("FilaConfig has no factor_scale: the stable FILA scale is not available")
    return FilaLoraConfig(**kw)  # before factor_scale existed FILA always used the paper's magnitudes


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (init, lr, seed) until forgotten or the step cap and measure it (public API only)."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model

    from peft_unlearn import UnlearningTrainer
    from peft_unlearn.metrics import memorization_accuracy, pad_batch
    from peft_unlearn.models import load_model_and_tokenizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = spec.get("device", "cpu")
    model, tokenizer = load_model_and_tokenizer(spec["model"], dtype=spec["dtype"], show_progress=False)
    model.to(device)
    ids = {name: common.tokenize(tokenizer, _texts(name), spec["max_length"]) for name in SETS}
    pad_id = tokenizer.pad_token_id
    el_key = f"el{spec['el_n']}"

    def score(m, name: str, with_el: bool) -> dict[str, float]:
        return common.memorization(m, ids[name], spec, pad_id, compute_el=with_el)

    if spec.get("baseline"):
        out = {name: score(model, name, name != "retain") for name in SETS}
        held_input, held_mask, _ = pad_batch([{"input_ids": x} for x in ids["mheldout"]], pad_token_id=pad_id)
        out["mheldout"]["ma_per_passage"] = [float(v) for v in memorization_accuracy(model, held_input, held_mask)]
        return out

    model = get_peft_model(model, _lora_config(spec["init"], spec["rank"]))
    explicit_init_seconds = None
    if spec["init"] == "vila-stable":
        # FilaLoraConfig is FILA-only, so the factor scale of a VILA adapter is set through the public
        # initialize_vila_weights before the trainer starts (the trainer then finds nothing pending)
        from peft_unlearn.fila import FilaConfig, initialize_vila_weights

        t_init = time.perf_counter()
        initialize_vila_weights(
            model,
            _lm_batches(ids["forget"], spec["batch_size"], pad_id),
            _lm_batches(ids["retain"], spec["batch_size"], pad_id),
            show_progress=False,
            fila_config=FilaConfig(factor_scale="stable"),
        )
        explicit_init_seconds = time.perf_counter() - t_init
    monitor = common.forget_monitor(
        ids["forget"], pad_id, spec["thresholds"], el_n=spec["el_n"], prefix_stride=spec["el_prefix_stride"]
    )
    args = common.unlearning_config(
        spec["output_dir"],
        spec,
        max_steps=spec["max_steps"],
        data_seed=spec["seed"],
        fila_batch_size=spec["batch_size"],
        use_cpu=device == "cpu",
        forget_loss=spec.get("forget_loss", "inverted_hinge"),
        **(ROL_SETTINGS if spec["init"].endswith("+rol") else {}),
    )
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        forget_dataset=Dataset.from_dict({"input_ids": ids["forget"]}),
        retain_dataset=Dataset.from_dict({"input_ids": ids["retain"]}),
        processing_class=tokenizer,
        callbacks=[monitor],
    )
    t0 = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    # the trainer computes a data-driven init inside train(), before on_train_begin
    init_seconds = (monitor.train_begin or t0) - t0
    if explicit_init_seconds is not None:
        init_seconds += explicit_init_seconds
    train_seconds = t_end - (monitor.train_begin or t0) - monitor.eval_seconds
    m = trainer.model
    forgotten = monitor.forgotten_at is not None
    # EL is the costly part (greedy generation): the monitor's value when it checked EL at the last step,
    # none when forget MA never reached the threshold (then the run is not forgotten whatever EL is)
    last = monitor.history[-1] if monitor.history else {}
    final = {
        "forget": score(m, "forget", with_el=False),
        "mheldout": score(m, "mheldout", with_el=True),
        "retain": score(m, "retain", with_el=False),
        "neverseen": score(m, "neverseen", with_el=False),
    }
    if f"forget_{el_key}" in last:
        final["forget"][el_key] = last[f"forget_{el_key}"]
    held_input, held_mask, _ = pad_batch([{"input_ids": x} for x in ids["mheldout"]], pad_token_id=pad_id)
    per_passage = memorization_accuracy(m, held_input, held_mask)
    final["mheldout"]["ma_per_passage"] = [float(v) for v in per_passage]
    return {
        "forgotten": forgotten,
        "steps": monitor.forgotten_at if forgotten else trainer.state.global_step,
        "steps_run": trainer.state.global_step,
        "init_seconds": init_seconds,
        "init_stats": common.init_stats(trainer),
        "train_seconds": train_seconds,
        "monitor_seconds": monitor.eval_seconds,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "metrics": final,
        "history": monitor.history,
        "code": _code_version(),
    }


def _lm_batches(rows: list[list[int]], batch_size: int, pad_id: int) -> list[dict[str, Any]]:
    """Right-padded causal-LM batches in order (labels -100 on padding), like the trainer's init pass."""
    import torch

    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def _code_version() -> str:
    """The commit the run's code came from (``+dirty`` with uncommitted changes), for runs that span commits."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "peft_unlearn"], cwd=common.ROOT, capture_output=True, text=True
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------------------------
# orchestration (parent process)
# ----------------------------------------------------------------------------------------------
def run_key(spec: dict[str, Any]) -> str:
    return f"{spec['init']}|lr{spec['lr']:g}|s{spec['seed']}|r{spec['rank']}|cap{spec['max_steps']}"


def plan(args: argparse.Namespace, results: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The runs in the order they are run.

    Seed 0 (the first seed) of every (init, lr) first; then the other seeds, first for the (init, lr)
    whose first seed forgot (the informative part of the frontier), then the rest. Within a seed the
    learning rates come in the order of ``--lrs`` and every init runs at one learning rate before the
    next, so a partial run compares the inits at the same rates.
    """
    runs = [
        {"init": init, "lr": lr, "seed": seed, "rank": args.rank, "max_steps": args.max_steps}
        for seed in args.seeds
        for lr in args.lrs
        for init in args.inits
    ]
    first = args.seeds[0]
    done = (results or {}).get("runs", {})

    def priority(spec: dict[str, Any]) -> int:
        if spec["seed"] == first:
            return 0
        head = done.get(run_key({**spec, "seed": first}))
        return 1 if head is not None and head["result"]["forgotten"] else 2

    return sorted(runs, key=priority)  # stable: the order within a priority is kept


def child(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    return common.run_child(__file__, spec, timeout, env=common.child_env(spec["threads"]))


def group_runs(results: dict[str, Any]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """``(init, lr) -> [result, ...]`` of the finished runs under the current settings."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    cap = results.get("settings", {}).get("max_steps")
    for run in results["runs"].values():
        spec = run["spec"]
        if cap is not None and spec["max_steps"] != cap:
            continue
        groups.setdefault((spec["init"], spec["lr"]), []).append(run["result"])
    return groups


def frontier(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per init: the fewest mean steps among the lrs that forgot in every seed and kept heldout MA.

    "Kept" = mean memorized-heldout MA at the stop at least the base model's minus ``KEEP_MARGIN``.
    """
    base = results["baseline"]["mheldout"]["ma"]
    best: dict[str, dict[str, Any]] = {}
    for (init, lr), rs in group_runs(results).items():
        if not all(r["forgotten"] for r in rs):
            continue
        held = common.mean_std([r["metrics"]["mheldout"]["ma"] for r in rs])[0]
        if held < base - KEEP_MARGIN:
            continue
        steps = common.mean_std([r["steps"] for r in rs])[0]
        cur = best.get(init)
        if cur is None or (steps, -held) < (cur["steps"], -cur["mheldout_ma"]):
            best[init] = {"lr": lr, "steps": steps, "mheldout_ma": held, "seeds": len(rs)}
    return best


def sound_points(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per init, the learning rates that are *sound*: every seed forgot and the model was not destroyed.

    Not destroyed = mean never-seen perplexity at most ``PPL_MARGIN`` times the base model's.
    """
    base_ppl = results["baseline"]["neverseen"]["ppl"]
    out: dict[str, list[dict[str, Any]]] = {}
    for (init, lr), rs in group_runs(results).items():
        ppl = common.mean_std([r["metrics"]["neverseen"]["ppl"] for r in rs])[0]
        if not all(r["forgotten"] for r in rs) or ppl > PPL_MARGIN * base_ppl:
            continue
        out.setdefault(init, []).append(
            {
                "lr": lr,
                "seeds": len(rs),
                "steps": common.mean_std([r["steps"] for r in rs])[0],
                "mheldout_ma": common.mean_std([r["metrics"]["mheldout"]["ma"] for r in rs])[0],
                "ppl": ppl,
            }
        )
    return out


def report(results: dict[str, Any], path: Path) -> None:
    """Write the markdown tables and the frontier plot next to the JSON."""
    base = results.get("baseline")
    el_key = f"el{results['settings']['el_n']}"
    lines = common.report_head(
        f"Forget-versus-keep frontier of LoRA inits on Gemma-3 270M ({_loss_label(results)}, CPU)",
        results.get("commands", []),
        results,
    )
    if not base:
        path.with_suffix(".md").write_text("\n".join(lines))
        return
    names = {"forget": "forget", "mheldout": "memorized heldout", "retain": "retain", "neverseen": "never-seen"}
    lines += ["Base model (per-passage means):", "", "| set | passages | MA | EL10 | PPL |", "|---|---|---|---|---|"]
    for name in SETS:
        b = base[name]
        el = b.get(el_key)
        lines.append(
            f"| {names[name]} | {len(_texts(name))} | {b['ma']:.3f} | {'–' if el is None else f'{el:.3f}'} "
            f"| {b['ppl']:.1f} |"
        )
    thr = results["thresholds"]
    lines += [
        "",
        f"Forgotten = forget MA <= {thr['ma']:.3f} and {el_key.upper()} <= {thr['el']:.3f} (the never-seen level).",
        "",
        "## Every (init, learning rate)",
        "",
        "| init | lr | seeds | forgotten | steps | heldout MA | heldout EL10 | never-seen PPL | retain MA "
        "| forget MA | init s | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = group_runs(results)
    order = list(INITS)
    for init, lr in sorted(groups, key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[1])):
        rs = groups[(init, lr)]
        met = [r["metrics"] for r in rs]
        lines.append(
            f"| {INITS.get(init, init)} | {lr:g} | {len(rs)} | {sum(r['forgotten'] for r in rs)}/{len(rs)} "
            f"| {common.fmt([r['steps'] for r in rs], 1)} | {common.fmt([x['mheldout']['ma'] for x in met], 3)} "
            f"| {common.fmt([x['mheldout'][el_key] for x in met], 3)} | {common.fmt([x['neverseen']['ppl'] for x in met], 1)} "
            f"| {common.fmt([x['retain']['ma'] for x in met], 3)} | {common.fmt([x['forget']['ma'] for x in met], 3)} "
            f"| {common.fmt([r['init_seconds'] for r in rs], 1)} | {common.fmt([r['train_seconds'] for r in rs], 0)} |"
        )
    best = frontier(results)
    lines += [
        "",
        f"## Fewest steps with heldout MA kept (within {KEEP_MARGIN} of the base {base['mheldout']['ma']:.3f})",
        "",
        "Among the learning rates at which every seed forgot; `vs LoRA` = steps / best-tuned default LoRA's steps "
        "(the paper's promise: <= 0.6 with no more heldout loss).",
        "",
        "| init | lr | seeds | steps | heldout MA | vs LoRA steps | heldout MA vs LoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = best.get("lora")
    for init in INITS:
        b = best.get(init)
        if b is None:
            lines.append(_missing_row(init, groups, "none qualifies", 5))
            continue
        ratio, dheld = _vs_lora(b, ref)
        lines.append(
            f"| {INITS[init]} | {b['lr']:g} | {b['seeds']} | {b['steps']:.1f} | {b['mheldout_ma']:.3f} "
            f"| {ratio} | {dheld} |"
        )
    sound = sound_points(results)
    fastest = {init: min(pts, key=lambda p: (p["steps"], -p["mheldout_ma"])) for init, pts in sound.items()}
    keeping = {init: max(pts, key=lambda p: (p["mheldout_ma"], -p["steps"])) for init, pts in sound.items()}
    lines += [
        "",
        f"## Sound learning rates (every seed forgot, never-seen PPL <= {PPL_MARGIN:g} x base "
        f"{results['baseline']['neverseen']['ppl']:.1f})",
        "",
        "Fastest: the sound lr with the fewest steps (for default LoRA this is the *best-tuned* baseline); most kept: "
        "the sound lr with the highest heldout MA. `vs LoRA` compares with best-tuned default LoRA.",
        "",
        "| init | fastest lr | steps | heldout MA | vs LoRA steps | heldout MA vs LoRA | most-kept lr | steps "
        "| heldout MA | sound lrs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = fastest.get("lora")
    for init in INITS:
        f, k = fastest.get(init), keeping.get(init)
        if f is None:
            lines.append(_missing_row(init, groups, "none", 8))
            continue
        ratio, dheld = _vs_lora(f, ref)
        lrs = ", ".join(f"{p['lr']:g}" for p in sorted(sound[init], key=lambda p: p["lr"]))
        lines.append(
            f"| {INITS[init]} | {f['lr']:g} | {f['steps']:.1f} | {f['mheldout_ma']:.3f} | {ratio} | {dheld} "
            f"| {k['lr']:g} | {k['steps']:.1f} | {k['mheldout_ma']:.3f} | {lrs} |"
        )
    lines += _equal_speed_table(results)
    lines += [
        "",
        "Columns: `steps` = optimizer steps until forgotten (the cap when not forgotten); heldout = the memorized "
        "heldout set (never trained on), measured at the stop like every other metric; `init s` = wall time of "
        "the trainer's init before the first step (Fisher / VILA pass + SVD; ~0 for default LoRA); `train s` = "
        "training time without the per-step forget checks. Mean ± sample std over seeds.",
        "",
    ]
    if results.get("failures"):
        lines += ["Failed attempts (retried on the next run of the command):", ""]
        lines += [f"- `{k}`: {v['error'][-200:]!r}" for k, v in sorted(results["failures"].items())]
        lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines))
    _plot(results, path.with_suffix(".png"))


def equal_speed(results: dict[str, Any]) -> dict[int, dict[str, list[float]]]:
    """``steps -> init -> [heldout MA, ...]`` over the single runs that forgot in ``steps`` without being destroyed.

    A run counts whatever its learning rate (never-seen perplexity at most ``PPL_MARGIN`` times the base model's):
    this compares the inits at equal forgetting speed, which is what a better init must win.
    """
    limit = PPL_MARGIN * results["baseline"]["neverseen"]["ppl"]
    out: dict[int, dict[str, list[float]]] = {}
    for (init, _lr), rs in group_runs(results).items():
        for r in rs:
            if r["forgotten"] and r["metrics"]["neverseen"]["ppl"] <= limit:
                out.setdefault(int(r["steps"]), {}).setdefault(init, []).append(r["metrics"]["mheldout"]["ma"])
    return out


def _equal_speed_table(results: dict[str, Any]) -> list[str]:
    table = equal_speed(results)
    lines = [
        "",
        "## Heldout MA at equal forgetting speed",
        "",
        f"Every single run that forgot without being destroyed (never-seen PPL <= {PPL_MARGIN:g} x base), whatever "
        "its learning rate, grouped by the step at which it forgot: mean heldout MA (number of runs). A better "
        "init keeps more at the same speed.",
        "",
        "| steps | " + " | ".join(INITS.values()) + " |",
        "|---|" + "---|" * len(INITS),
    ]
    for steps in sorted(table):
        cells = [f"{sum(v) / len(v):.3f} ({len(v)})" if (v := table[steps].get(init)) else "–" for init in INITS]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    return lines


def _missing_row(init: str, groups: dict[tuple[str, float], Any], none: str, empty: int) -> str:
    """A table row for an init without a value (``none`` when it has runs, else "not run yet"), ``empty`` cells after."""
    done = any(key[0] == init for key in groups)
    return f"| {INITS[init]} | {none if done else 'not run yet'} |" + " |" * empty


def _vs_lora(point: dict[str, Any], ref: dict[str, Any] | None) -> tuple[str, str]:
    """Steps relative to default LoRA's and the heldout-MA difference to it ("–" without a LoRA value)."""
    if not ref:
        return "–", "–"
    return f"{point['steps'] / ref['steps']:.2f}", f"{point['mheldout_ma'] - ref['mheldout_ma']:+.3f}"


def _plot(results: dict[str, Any], png: Path) -> None:
    plt = common.pyplot()
    groups = group_runs(results)
    if plt is None or not groups:
        return
    base = results["baseline"]["mheldout"]["ma"]
    cap = results["settings"]["max_steps"]
    colors = {
        "lora": "tab:blue",
        "fila-paper": "tab:orange",
        "fila-stable": "tab:green",
        "vila": "tab:purple",
        "vila-stable": "tab:pink",
        "rila": "tab:red",
        "rila+rol": "tab:brown",
        "lora+rol": "tab:cyan",
    }
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for init in INITS:
        pts = sorted((lr, rs) for (i, lr), rs in groups.items() if i == init)
        if not pts:
            continue
        xs, ys, xe, ye, full = [], [], [], [], []
        for _, rs in pts:
            mx, sx = common.mean_std([r["steps"] for r in rs])
            my, sy = common.mean_std([r["metrics"]["mheldout"]["ma"] for r in rs])
            xs.append(mx), ys.append(my), xe.append(sx), ye.append(sy), full.append(all(r["forgotten"] for r in rs))
        ax.plot(xs, ys, "-", color=colors[init], alpha=0.6)
        for (lr, _), x, y, dx, dy, ok in zip(pts, xs, ys, xe, ye, full):
            ax.errorbar(
                x,
                y,
                xerr=dx,
                yerr=dy,
                fmt="o",
                color=colors[init],
                mfc=colors[init] if ok else "white",
                capsize=3,
            )
            ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=colors[init])
        ax.plot([], [], "o-", color=colors[init], label=INITS[init])
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"base heldout MA {base:.3f}")
    ax.axhline(base - KEEP_MARGIN, color="gray", ls=":", lw=1, label=f"base - {KEEP_MARGIN}")
    ax.axvline(cap, color="red", ls=":", lw=1, label=f"step cap {cap} (hollow: not every seed forgot)")
    ax.set_xlabel("optimizer steps until forgotten (mean ± std over seeds)")
    ax.set_ylabel("memorized-heldout MA at the stop (kept knowledge)")
    ax.set_title(
        f"Gemma-3 270M, {_loss_label(results)}, r = 8: forget speed vs knowledge kept\n(labels: learning rate)"
    )
    ax.legend(fontsize=8, loc="lower right")
    common.save_figure(fig, png)


def main(argv: list[str] | None = None) -> None:
    p = common.benchmark_parser(__doc__, DEFAULT_RESULTS)
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    p.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=[1e-3, 1e-4, 3e-4, 3e-3, 3e-5],
        help="learning rates, in the order they are run (the most informative first)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument(
        "--forget-loss",
        default="inverted_hinge",
        choices=list(FORGET_LOSS_LABELS),
        help="forget loss next to the retain NLL (gradient_ascent + retain NLL is gradient difference); another "
        "loss than inverted_hinge writes init_frontier_<loss>.json unless --results is given",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where every run trains and is measured, e.g. cuda; results of another device than cpu go to "
        "init_frontier_<device>.json unless --results is given (steps and metrics are compared within one file)",
    )
    common.add_run_arguments(p, max_steps=10)
    p.add_argument("--wait", type=int, default=120, help="seconds between checks while only unavailable inits remain")
    p.add_argument("--max-wait", type=int, default=7200, help="give up waiting for unavailable inits after this")
    p.add_argument("--retries", type=int, default=1, help="how often a failed run is retried")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--time-one", metavar="INIT:LR", help="time one seed-0 run and print it (no results written)")
    common.add_child_arguments(p)
    args = p.parse_args(argv)
    if common.run_as_child(args, run_one):
        return
    if args.results == DEFAULT_RESULTS:
        args.results = default_results_path(args.forget_loss, args.device)

    settings = {
        "model": args.model,
        "dtype": args.dtype,
        "rank": args.rank,
        **common.run_settings(args),
        "loss": f"{FORGET_LOSS_LABELS[args.forget_loss]} + retain NLL (weights 1)",
        "optimizer": common.RECIPE,
        "lora": "q,k,v,o,gate,up,down projections, alpha = 2r, dropout 0",
    }
    base_spec = {k: settings[k] for k in ("model", "dtype", "batch_size", "max_length", "el_n", "el_prefix_stride")}
    base_spec["threads"] = args.threads
    if args.device != "cpu":  # the CPU results file predates the option: its specs have no device
        settings["device"] = base_spec["device"] = args.device
    if args.forget_loss != "inverted_hinge":  # likewise for the IHL file: its specs have no forget_loss
        base_spec["forget_loss"] = args.forget_loss
    results = common.load_results(args.results)
    results.setdefault("failures", {})
    if args.report_only:
        report(results, args.results)
        return
    common.check_settings(
        results, settings, ("model", "dtype", "max_length", "el_n", "el_prefix_stride"), args.results
    )

    if "baseline" not in results:
        common.say("measuring the base model (thresholds) ...")
        base = common.or_exit(child({**base_spec, "baseline": True, "seed": 0}, args.timeout))
        base.pop("wall_seconds", None)
        if args.time_one is None:
            results["baseline"] = base
            results["thresholds"] = {"ma": base["neverseen"]["ma"], "el": base["neverseen"][f"el{args.el_n}"]}
    thresholds = results.get("thresholds") or {
        "ma": base["neverseen"]["ma"],
        "el": base["neverseen"][f"el{args.el_n}"],
    }

    if args.time_one:
        init, lr = args.time_one.split(":")
        spec = {**base_spec, "init": init, "lr": float(lr), "seed": 0, "rank": args.rank, "max_steps": args.max_steps}
        t0 = time.time()
        out = child({**spec, "thresholds": thresholds}, args.timeout)
        out.pop("history", None)
        print(json.dumps({"wall_seconds": time.time() - t0, **out}, indent=1)[:4000])
        return

    common.record_command(results, common.command_line(__file__, argv))
    results["settings"] = settings
    results["machine"] = common.machine_info()
    common.save_results(args.results, results)
    _safe_report(results, args.results)

    checked: dict[str, tuple[float, bool, str]] = {}
    waited = 0.0
    while True:
        todo = []
        for spec in plan(args, results):
            key = run_key(spec)
            fails = results["failures"].get(key, {}).get("count", 0)
            if key not in results["runs"] and fails <= args.retries:
                todo.append((key, spec))
        if not todo:
            break
        picked = None
        for key, spec in todo:
            when, ok, why = checked.get(spec["init"], (0.0, False, ""))
            if time.time() - when > args.wait:
                ok, why = available(spec["init"])
                checked[spec["init"]] = (time.time(), ok, why)
                if not ok:
                    common.say(f"{spec['init']} not available yet: {why}")
            if ok:
                picked = (key, spec)
                break
        if picked is None:
            if waited >= args.max_wait:
                common.say(f"giving up: {len(todo)} runs wait for inits that never became available")
                break
            time.sleep(args.wait)
            waited += args.wait
            continue
        key, spec = picked
        common.say(f"start {key}")
        result = child({**base_spec, **spec, "thresholds": thresholds}, args.timeout)
        if "error" in result:
            entry = results["failures"].setdefault(key, {"count": 0})
            entry["count"] += 1
            entry["error"] = result["error"]
            common.say(f"FAILED {key}: {result['error'][-800:]}")
        else:
            results["failures"].pop(key, None)
            results["runs"][key] = {"spec": spec, "result": result}
            met = result["metrics"]
            common.say(
                f"done {key}: forgotten={result['forgotten']} steps={result['steps']} "
                f"heldout_ma={met['mheldout']['ma']:.3f} ppl={met['neverseen']['ppl']:.1f} "
                f"init_s={result['init_seconds']:.1f} train_s={result['train_seconds']:.0f} "
                f"wall_s={result['wall_seconds']:.0f}"
            )
        common.save_results(args.results, results)
        _safe_report(results, args.results)
    _safe_report(results, args.results)


def _safe_report(results: dict[str, Any], path: Path) -> None:
    """A broken report must not stop the measurements (rerun with --report-only after fixing it)."""
    try:
        report(results, path)
    except Exception as exc:  # noqa: BLE001
        common.say(f"report failed ({type(exc).__name__}: {exc}); the JSON is saved, rerun with --report-only")


if __name__ == "__main__":
    main()
