"""Peak memory and time of one unlearning step, fused linear + loss vs the full-logits path, at Gemma-3's vocabulary.

The step is what `UnlearningTrainer` does for ``forget_loss="inverted_hinge", retain_loss="nll"`` with LoRA r=8 on
the seven projections of every block: the registry's loss terms (`peft_unlearn.losses.LossBatch` with
``fused=True`` or ``False``, the latter being the path of ``fused_loss=False``) on a forget and a retain batch of
``B x T`` tokens (the first quarter of every row is a masked prompt), one backward, one AdamW step.

Model: a Gemma-3-shaped decoder built from ``Gemma3TextConfig`` with random weights: the vocabulary of Gemma-3
(262,144 tokens, tied embedding, no final soft-capping, as Gemma-3 270M) with reduced depth and width (defaults:
1 layer, hidden 128). The memory this benchmark is about, the ``[tokens, vocab]`` logits and their gradients,
depends on the tokens and the vocabulary only; the width sets the matmul time (hidden 640, Gemma-3 270M's, costs
5x the time on the 2-core CPU the committed results were measured on).

Measure (one fresh subprocess per case): a warm-up step on 1 x 32 tokens (lazy allocations), then ``--steps``
timed steps. On CPU: the process RSS high-water mark (``VmHWM``, reset before each step) minus the RSS at the step's
start (model, adapter and optimizer state already resident), i.e. the **peak above the model**; everything the
process touches counts, allocator slack included. The address space of every CPU case is capped with
``RLIMIT_AS`` (``--cap-gib``, default 14 GiB), so a step that needs more fails with an allocation error and is
recorded as ``does not fit`` instead of exhausting the machine. On CUDA (``--device cuda``, bf16):
``torch.cuda.max_memory_allocated`` minus the allocated bytes at the step's start; an out-of-memory error is
recorded the same way.

The report fits ``peak = a + b * tokens`` per path through the measured sizes and uses it for the sizes that do
not fit under the cap (labelled *extrapolated*), then projects the peak of real models on one 80 GB and one 24 GB
GPU with a formula (labelled *projection*, assumptions in the report).

Usage::

    flock /tmp/heavy.lock python benchmarks/fused_loss_memory.py            # resumable: skips finished cases
    python benchmarks/fused_loss_memory.py --report-only                    # rewrite .md/.png from the JSON
    python benchmarks/fused_loss_memory.py --device cuda --results benchmarks/results/fused_loss_memory_cuda.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import common

DEFAULT_RESULTS = common.RESULTS / "fused_loss_memory.json"
VOCAB = 262_144
DEFAULT_SIZES = ("8x128", "8x256", "8x512", "8x2048")
GOAL_SIZES = ("8x512", "8x2048")
GB = 1e9

# Shapes of the projection (Hugging Face configs of the text models; parameter counts approximate).
PROJECTED_MODELS = {
    "Llama-3-8B": {
        "params": 8.03e9,
        "layers": 32,
        "hidden": 4096,
        "intermediate": 14336,
        "heads": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "vocab": 128_256,
    },
    "Gemma-3-4B (text)": {
        "params": 3.88e9,
        "layers": 34,
        "hidden": 2560,
        "intermediate": 10240,
        "heads": 8,
        "kv_heads": 4,
        "head_dim": 256,
        "vocab": 262_144,
    },
    "Gemma-3-12B (text)": {
        "params": 11.77e9,
        "layers": 48,
        "hidden": 3840,
        "intermediate": 15360,
        "heads": 16,
        "kv_heads": 8,
        "head_dim": 256,
        "vocab": 262_144,
    },
}
GPUS = {"80 GB": 80e9, "24 GB": 24e9}


def parse_size(size: str) -> tuple[int, int]:
    """``"8x512"`` -> ``(8, 512)`` (batch, sequence length).

    Raises:
        ValueError: If it is not two positive integers joined by ``x``.
    """
    try:
        batch, seq = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {size!r} must look like BATCHxSEQ, e.g. 8x512") from None
    if batch < 1 or seq < 2:
        raise ValueError(f"size {size!r} needs batch >= 1 and sequence length >= 2")
    return batch, seq


# ----------------------------------------------------------------------------------------------
# one case (run in a fresh process)
# ----------------------------------------------------------------------------------------------


def build_model(spec: dict[str, Any]) -> Any:
    """The Gemma-3-shaped random model of `spec` with LoRA r=8 on the seven projections, on `spec["device"]`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    hidden = spec["hidden"]
    config = Gemma3TextConfig(
        vocab_size=spec["vocab"],
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=spec["layers"],
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=max(4096, spec["seq"]),
        sliding_window=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(spec["device"])
    return get_peft_model(model, LoraConfig(**common.lora_kwargs(8)))


def _inputs(spec: dict[str, Any], batch: int, seq: int) -> dict[str, Any]:
    from peft_unlearn.testing import random_lm_batches

    inputs = {}
    for seed, part in ((1, "forget"), (2, "retain")):
        b = random_lm_batches(
            1, seed=seed, vocab_size=spec["vocab"], batch_size=batch, seq_len=seq, prompt_len=seq // 4
        )
        inputs.update({f"{part}_{k}": v.to(spec["device"]) for k, v in b[0].items()})
    return inputs


def unlearning_step(model: Any, optimizer: Any, inputs: dict[str, Any], fused: bool, chunk: int | None) -> float:
    """One IHL (forget) + NLL (retain) step through the loss registry, as `UnlearningTrainer.compute_loss` takes it."""
    from types import SimpleNamespace

    from peft_unlearn.losses import LossBatch, get_loss

    config = SimpleNamespace(loss_chunk_size=chunk, quantization_margin=None, kl_mask="labels")
    batch = LossBatch(inputs, config, fused=fused)
    loss = 0.0
    for role, name in (("forget", "inverted_hinge"), ("retain", "nll")):
        term = get_loss(role, name).term(batch, model, None)
        loss = loss + term.total / term.count.clamp_min(1).to(term.total.dtype)
        del term
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return isinstance(err, MemoryError) or any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate", "cannot allocate", "bad_alloc")
    )


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one case in this process: warm-up on 1 x 32 tokens, then `spec["steps"]` timed steps."""
    if spec["device"] == "cpu" and spec.get("cap_gib"):
        import resource

        cap = int(spec["cap_gib"] * common.GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import time

    import torch

    torch.set_num_threads(spec["threads"])
    model = build_model(spec)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    unlearning_step(model, optimizer, _inputs(spec, 1, 32), spec["fused"], spec["chunk"])
    batch, seq = parse_size(spec["size"])
    inputs = _inputs(spec, batch, seq)
    result: dict[str, Any] = {
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "rss_before_bytes": common.proc_status("VmRSS")["VmRSS"],
        "steps": [],
    }
    for _ in range(spec["steps"]):
        try:
            cpu0 = time.process_time()
            with common.PeakMemory(spec["device"]) as meter:
                loss = unlearning_step(model, optimizer, inputs, spec["fused"], spec["chunk"])
            cpu = time.process_time() - cpu0
        except (RuntimeError, MemoryError) as err:
            if not _is_oom(err):
                raise
            optimizer.zero_grad(set_to_none=True)
            limit = f"RLIMIT_AS {spec['cap_gib']} GiB" if spec["device"] == "cpu" else "the GPU's memory"
            result.update(fits=False, error=f"{type(err).__name__}: {str(err)[:300]}", limit=limit)
            return result
        result["steps"].append({"peak_bytes": meter.delta, "seconds": meter.seconds, "cpu_seconds": cpu, "loss": loss})
    result["fits"] = True
    return result


# ----------------------------------------------------------------------------------------------
# report: fit, extrapolation, projection
# ----------------------------------------------------------------------------------------------


def case_key(size: str, fused: bool) -> str:
    return f"{size}/{'fused' if fused else 'unfused'}"


def summary(run: dict[str, Any]) -> dict[str, Any] | None:
    """``{"peak": max peak bytes, "seconds": mean step time}`` of a finished case that fits (else None).

    The time is the process CPU time of the step (user + system, all threads) when recorded, which a shared,
    oversubscribed machine disturbs much less than the wall time (``wall_seconds``, also returned).
    """
    if not run or not run.get("fits") or not run.get("steps"):
        return None
    peaks = [s["peak_bytes"] for s in run["steps"] if s["peak_bytes"] is not None]
    steps = run["steps"]
    wall = sum(s["seconds"] for s in steps) / len(steps)
    cpu = [s["cpu_seconds"] for s in steps if s.get("cpu_seconds") is not None]
    return {
        "peak": max(peaks) if peaks else None,
        "seconds": sum(cpu) / len(cpu) if len(cpu) == len(steps) else wall,
        "wall_seconds": wall,
    }


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``y = a + b x`` through ``points`` (None with fewer than 2 distinct x)."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def lora_params(shape: dict[str, Any], rank: int = 8) -> int:
    """LoRA parameters of rank `rank` on the seven projections of every layer."""
    d, i, q, kv = (
        shape["hidden"],
        shape["intermediate"],
        shape["heads"] * shape["head_dim"],
        shape["kv_heads"] * shape["head_dim"],
    )
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d)
    return rank * per_layer * shape["layers"]


def projection(shape: dict[str, Any], tokens: int, unfused_bytes_per_logit: float) -> dict[str, float]:
    """Projected peak bytes of one step (formula, see `ASSUMPTIONS`) on the fused and the unfused path."""
    d, i, v, layers = shape["hidden"], shape["intermediate"], shape["vocab"], shape["layers"]
    weights = 2 * shape["params"]  # bf16
    lora = 16 * lora_params(shape)  # fp32 parameter, gradient, two AdamW moments
    # gradient checkpointing: each layer's input kept (bf16), one layer's activations recomputed at a time
    activations = 2 * layers * tokens * d + 2 * tokens * (12 * d + 3 * i)
    # fused: one chunk of fp32 logits and its ~4 temporaries; per token a few fp32 [d] vectors (hidden, pw, grads)
    chunk_rows = max(1, (1 << 24) // v)
    fused = 16 * chunk_rows * v + 24 * tokens * d
    unfused = unfused_bytes_per_logit * tokens * v
    base = weights + lora + activations
    return {"base": base, "fused": base + fused, "unfused": base + unfused, "weights": weights}


ASSUMPTIONS = [
    "weights in bf16 (2 bytes per parameter); LoRA r=8 on the seven projections, fp32 parameter + gradient + two "
    "AdamW moments (16 bytes per LoRA parameter);",
    "gradient checkpointing: every layer's input kept in bf16 (2 x layers x tokens x hidden) plus one layer's "
    "recomputed activations (2 x tokens x (12 x hidden + 3 x intermediate)), attention by SDPA/flash (no "
    "tokens^2 term);",
    "unfused logits terms: the bytes per [token x vocab] element at the peak measured by this benchmark on the "
    "full-logits path (the slope of its fit; fp32 on the CPU; bf16 logits would roughly halve it), times tokens "
    "x vocab; the forget and retain halves are each B x T tokens and only one half's logits is alive at a time "
    "besides the IHL buffer, as measured;",
    "fused terms: one chunk of 2**24 fp32 logits with about four temporaries of that size (16 x 2**24 bytes) plus "
    "24 bytes per token and hidden unit (hidden states, the precomputed hidden-state gradient pieces);",
    "not counted: the CUDA context and allocator fragmentation (add 1-3 GB), the reference model (NPO/KL: none "
    "with adapters disabled).",
]


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / common.GIB:.2f}"


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Measured summaries, the per-path linear fit in tokens, goal checks and the projection."""
    runs = results["runs"]
    table = []
    fits: dict[str, Any] = {}
    for fused in (True, False):
        points = []
        for key, run in runs.items():
            size, path = key.split("/")
            if (path == "fused") != fused:
                continue
            s = summary(run)
            if s and s["peak"] is not None:
                batch, seq = parse_size(size)
                points.append((batch * seq, s["peak"], s["seconds"]))
        mem = linear_fit([(x, y) for x, y, _ in points])
        time = linear_fit([(x, t) for x, _, t in points])
        fits["fused" if fused else "unfused"] = {"memory": mem, "time": time, "points": len(points)}
    sizes = sorted({k.split("/")[0] for k in runs}, key=lambda s: math.prod(parse_size(s)))
    for size in sizes:
        tokens = math.prod(parse_size(size))
        row: dict[str, Any] = {"size": size, "tokens": tokens}
        for path in ("fused", "unfused"):
            run = runs.get(f"{size}/{path}")
            s = summary(run)
            entry: dict[str, Any] = {"status": "not run"}
            if s:
                entry = {"status": "measured", **s}
            elif run and run.get("fits") is False:
                entry = {"status": "does not fit", "limit": run.get("limit")}
            elif run and "error" in run:
                entry = {"status": "failed"}
            fit = fits[path]
            if entry["status"] != "measured" and fit["memory"]:
                a, b = fit["memory"]
                entry["extrapolated_peak"] = a + b * tokens
                if fit["time"]:
                    entry["extrapolated_seconds"] = fit["time"][0] + fit["time"][1] * tokens
            row[path] = entry
        table.append(row)
    unfused_slope = fits["unfused"]["memory"][1] if fits["unfused"]["memory"] else None
    per_logit = unfused_slope / VOCAB if unfused_slope else None
    projected = []
    if per_logit:
        for name, shape in PROJECTED_MODELS.items():
            for size in GOAL_SIZES:
                tokens = math.prod(parse_size(size))
                p = projection(shape, tokens, per_logit)
                projected.append({"model": name, "size": size, **p})
    return {"table": table, "fits": fits, "unfused_bytes_per_logit": per_logit, "projection": projected}


def _peak_of(entry: dict[str, Any]) -> tuple[float | None, str]:
    if entry.get("status") == "measured":
        return entry["peak"], "measured"
    if "extrapolated_peak" in entry:
        return entry["extrapolated_peak"], "extrapolated"
    return None, entry.get("status", "-")


def goals(analysis: dict[str, Any], cap_gib: float) -> list[str]:
    rows = {r["size"]: r for r in analysis["table"]}
    lines = []
    r = rows.get("8x512")
    if r:
        pf, kf = _peak_of(r["fused"])
        pu, ku = _peak_of(r["unfused"])
        tf = r["fused"].get("seconds")
        tu = r["unfused"].get("seconds", r["unfused"].get("extrapolated_seconds"))
        if pf is not None and pu is not None:
            ratio = pf / pu
            met = "met" if ratio <= 0.5 else "not met"
            lines.append(
                f"- 8 x 512, peak above the model <= 0.5x today's: fused {_gib(pf)} GiB ({kf}) vs unfused {_gib(pu)} "
                f"GiB ({ku}) = **{ratio:.3f}x: {met}**."
            )
        if tf is not None and tu is not None:
            ratio = tf / tu
            met = "met" if ratio <= 1.1 else "not met"
            tu_kind = "measured" if "seconds" in r["unfused"] else "extrapolated from the smaller sizes"
            lines.append(
                f"- 8 x 512, time <= 1.1x today's: fused {tf:.1f} s vs unfused {tu:.1f} s ({tu_kind}) = "
                f"**{ratio:.2f}x: {met}**."
            )
    r = rows.get("8x2048")
    if r:
        pf, kf = _peak_of(r["fused"])
        pu, ku = _peak_of(r["unfused"])
        if pf is not None and pu is not None:
            fits_today = pu <= 24 * GB
            met = "met" if (pf <= 24 * GB and not fits_today) else ("not met" if pf > 24 * GB else "n/a")
            lines.append(
                f"- 8 x 2048, a step that today does not fit in 24 GB fits: unfused {pu / GB:.1f} GB ({ku}; status "
                f"`{r['unfused']['status']}` under the {cap_gib:g} GiB cap) vs fused {pf / GB:.2f} GB ({kf}) = "
                f"**{met}**."
            )
    return lines


def write_report(results: dict[str, Any], path: Path) -> None:
    """Write ``path`` (.md) and the plot (.png) from the JSON results."""
    analysis = analyse(results)
    s = results.get("settings", {})
    lines = common.report_head(
        "Fused linear + loss: peak memory and time of one unlearning step", results.get("commands", []), results
    )
    lines += [
        f"Model: Gemma-3-shaped, random weights (`Gemma3TextConfig`): vocabulary {s.get('vocab')}, tied embedding, "
        f"{s.get('layers')} layer(s), hidden {s.get('hidden')}, {s.get('dtype')} on `{s.get('device')}`, "
        f"{s.get('threads')} thread(s). Step: IHL on the forget batch + NLL on the retain batch (each B x T tokens, "
        "first quarter of every row a masked prompt), LoRA r=8 on the seven projections, one AdamW step. "
        "`unfused` is today's full-logits path (`fused_loss=False`), `fused` the default.",
        "",
        f"Peak above the model: VmHWM - VmRSS at the step's start (CPU; each case in a fresh process, address space "
        f"capped at {s.get('cap_gib')} GiB with RLIMIT_AS) or `max_memory_allocated` - `memory_allocated` (CUDA). "
        f"{s.get('steps')} timed step(s) ({s.get('long_steps')} above 8,192 tokens) after a warm-up step on 1 x 32 "
        "tokens; peak = max, time = mean **CPU time** of the step (user + system of the process; the machine is "
        "shared, so wall times vary with the load; they are in the JSON).",
        "",
        "## Measured",
        "",
        "| B x T | tokens | fused peak (GiB) | fused CPU s/step | unfused peak (GiB) | unfused CPU s/step | peak ratio | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in analysis["table"]:
        f, u = row["fused"], row["unfused"]

        def cell(e: dict[str, Any], key: str) -> str:
            if e["status"] == "measured":
                return _gib(e["peak"]) if key == "peak" else f"{e['seconds']:.1f}"
            ext = e.get(f"extrapolated_{'peak' if key == 'peak' else 'seconds'}")
            label = e["status"] + (f" ({e['limit']})" if e.get("limit") else "")
            if ext is None:
                return label
            shown = _gib(ext) if key == "peak" else f"{ext:.0f}"
            return f"{label}; extrapolated {shown}"

        both = f["status"] == "measured" and u["status"] == "measured"
        pr = f"{f['peak'] / u['peak']:.3f}" if both and u["peak"] else "-"
        tr = f"{f['seconds'] / u['seconds']:.2f}" if both else "-"
        lines.append(
            f"| {row['size']} | {row['tokens']} | {cell(f, 'peak')} | {cell(f, 's')} | {cell(u, 'peak')} | "
            f"{cell(u, 's')} | {pr} | {tr} |"
        )
    lines += [
        "",
        "Linear fits `peak = a + b * tokens` through the measured sizes (used for the extrapolated cells):",
        "",
    ]
    for name, fit in analysis["fits"].items():
        if fit["memory"]:
            a, b = fit["memory"]
            lines.append(
                f"- {name}: a = {a / common.MIB:.0f} MiB, b = {b / 1024:.1f} KiB per token"
                f" ({b / VOCAB:.2f} bytes per token x vocab element) from {fit['points']} sizes."
            )
    lines += ["", "## Against the goal", "", *goals(analysis, s.get("cap_gib", 0)), ""]
    if analysis["projection"]:
        lines += [
            "## Projection for real models (formula, not measured)",
            "",
            "Peak GPU memory of one step = weights + LoRA state + activations + the path's logits terms. Assumptions:",
            "",
            *[f"- {a}" for a in ASSUMPTIONS],
            "",
            f"Unfused bytes per [token x vocab] element used: {analysis['unfused_bytes_per_logit']:.2f} (measured slope).",
            "",
            "| model | B x T | weights (GB) | without logits (GB) | fused peak (GB) | unfused peak (GB) | fits 80 GB (fused / unfused) | fits 24 GB (fused / unfused) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in analysis["projection"]:

            def ok(x: float, cap: float) -> str:
                return "yes" if x <= cap else "no"

            lines.append(
                f"| {p['model']} | {p['size']} | {p['weights'] / GB:.1f} | {p['base'] / GB:.1f} | {p['fused'] / GB:.1f} | "
                f"{p['unfused'] / GB:.1f} | {ok(p['fused'], 80e9)} / {ok(p['unfused'], 80e9)} | "
                f"{ok(p['fused'], 24e9)} / {ok(p['unfused'], 24e9)} |"
            )
        lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(analysis, results, path.with_suffix(".png"))


def plot(analysis: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, color in (("fused", "tab:blue"), ("unfused", "tab:red")):
        xs, ys, ex, ey = [], [], [], []
        for row in analysis["table"]:
            e = row[name]
            if e["status"] == "measured":
                xs.append(row["tokens"])
                ys.append(e["peak"] / common.GIB)
            elif "extrapolated_peak" in e:
                ex.append(row["tokens"])
                ey.append(e["extrapolated_peak"] / common.GIB)
        ax.plot(xs, ys, "o-", color=color, label=f"{name} (measured)")
        if ex:
            ax.plot(
                [xs[-1], *ex] if xs else ex,
                [ys[-1], *ey] if ys else ey,
                "x--",
                color=color,
                label=f"{name} (extrapolated)",
            )
    cap = results.get("settings", {}).get("cap_gib")
    if cap:
        ax.axhline(cap, color="gray", ls=":", label=f"RLIMIT_AS cap {cap:g} GiB")
    ax.axhline(24e9 / common.GIB, color="black", ls="--", lw=0.8, label="24 GB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per half-batch (B x T)")
    ax.set_ylabel("peak above the model (GiB)")
    ax.set_title(f"IHL + NLL step, vocab {results.get('settings', {}).get('vocab')}")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--fresh", action="store_true", help="ignore (and overwrite) the finished cases")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md/.png from the JSON")
    common.add_child_arguments(parser)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="BATCHxSEQ sizes, e.g. 8x512")
    parser.add_argument("--paths", nargs="+", default=["fused", "unfused"], choices=["fused", "unfused"])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--long-steps", type=int, default=1, help="timed steps for sizes above 8192 tokens")
    parser.add_argument("--chunk", type=int, default=None, help="loss_chunk_size (None: automatic)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=14.0, help="RLIMIT_AS of every CPU case (GiB)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    args = parser.parse_args(argv)
    if common.run_as_child(args, measure):
        return 0
    for size in args.sizes:
        parse_size(size)
    if args.device == "cpu" and not 0 < args.cap_gib <= 14:
        parser.error(f"--cap-gib must be in (0, 14] on this shared machine, got {args.cap_gib}")
    if args.steps < 1 or args.long_steps < 1:
        parser.error("--steps and --long-steps must be >= 1")
    results = {"runs": {}} if args.fresh else common.load_results(args.results)
    settings = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "dtype": "float32" if args.device == "cpu" else "bfloat16",
        "device": args.device,
        "threads": args.threads,
        "cap_gib": args.cap_gib if args.device == "cpu" else None,
        "steps": args.steps,
        "long_steps": args.long_steps,
        "chunk": args.chunk,
    }
    if not args.report_only:
        common.check_settings(
            results, settings, ("vocab", "hidden", "layers", "dtype", "device", "chunk"), args.results
        )
        results["settings"] = settings
        results["machine"] = common.machine_info()
        common.record_command(results, common.command_line(__file__, argv))
        env = common.child_env(args.threads)
        for size in args.sizes:
            batch, seq = parse_size(size)
            for path in args.paths:
                key = case_key(size, path == "fused")
                if key in results["runs"] and not args.fresh:
                    common.say(f"{key}: done already")
                    continue
                spec = {
                    **{k: settings[k] for k in ("vocab", "hidden", "layers", "dtype", "device", "threads", "cap_gib")},
                    "size": size,
                    "seq": seq,
                    "fused": path == "fused",
                    "chunk": args.chunk,
                    "steps": args.steps if batch * seq <= 8192 else args.long_steps,
                }
                common.say(f"{key}: running")
                run = common.run_child(__file__, spec, args.timeout, env=env)
                if "error" in run and "fits" not in run:
                    err = run["error"]
                    if any(s in err.lower() for s in ("memory", "bad_alloc", "killed")) or run.get("returncode") in (
                        -9,
                        -6,
                        134,
                        137,
                    ):
                        run = {
                            "fits": False,
                            "limit": f"RLIMIT_AS {args.cap_gib} GiB (process died)",
                            "error": err[-500:],
                        }
                    else:
                        results.setdefault("failures", {})[key] = run
                        common.save_results(args.results, results)
                        common.say(f"{key}: FAILED\n{err[-1500:]}")
                        continue
                results["runs"][key] = run
                common.save_results(args.results, results)
                s = summary(run)
                common.say(f"{key}: {s if s else 'does not fit'}")
    if not results["runs"]:
        raise SystemExit(f"no results in {args.results}; run without --report-only first")
    write_report(results, args.results)
    common.say(f"report: {args.results.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
