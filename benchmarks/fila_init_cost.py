"""Cost of the FILA initialisation versus one unlearning epoch on Gemma-3 270M (CPU).

Measures, each in a fresh subprocess (so every peak is its own):

* ``fila``: the FILA initialisation exactly as ``UnlearningTrainer.train()`` runs it before training
  (Fisher pass over the forget set, each forget batch paired with one retain batch, then one weighted
  SVD per LoRA layer), through the trainer's own FILA hook;
* ``epoch``: one unlearning epoch (IHL + retain NLL, one optimizer step per forget batch) with a plainly
  initialised LoRA adapter, via ``UnlearningTrainer.train()``.

Time is wall clock and process CPU time (all threads); memory is the process RSS high-water mark
(``VmHWM``). Two peaks are recorded: the whole fresh process (loading included) and the phase alone
(``VmHWM`` reset through ``/proc/self/clear_refs`` right before the phase). The RSS right after loading
the model and right before the phase are recorded too, so the peak increments can be compared.

``--profile`` adds an anatomy of the Fisher pass (forward / backward / accumulation split, operator
classes from the profiler, train vs eval mode, 1 thread vs ``--threads``, a LoRA training step on the same
batches, fused accumulation, a memory comparison of the current ``torch.autograd.grad`` accumulation with
a streaming alternative) and of the SVD phase (per-layer vs a batched per-shape prototype).
``--control-threads 1`` repeats every measurement with one thread (much less sensitive to a shared,
oversubscribed machine).

Results go to ``--results`` (JSON) after every run, and the markdown table and the plot are rewritten
from it. Runs that are already in the file with the same settings are skipped (``--fresh`` redoes them).

Usage::

    PEFT_UNLEARN_CACHE=/work/cache python benchmarks/fila_init_cost.py --repeats 2 --control-threads 1 \
        --profile --profile-repeats 1
    python benchmarks/fila_init_cost.py --profile-only                      # redo only the anatomy
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "fila_init_cost.json"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHASES = ("fila", "epoch")
TARGETS = {"time": 1.5, "memory": 1.3}
GIB = 2**30
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# process memory helpers
# ----------------------------------------------------------------------------------------------
_MEM_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def _mem() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of ``/proc/self/status`` in bytes (missing fields: 0)."""
    values = dict.fromkeys(_MEM_FIELDS, 0)
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in values:
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); returns False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


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
def _read_texts(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    rows = [{"text": json.loads(line)["text"]} for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def _setup(spec: dict[str, Any], init: bool | str, output_dir: str) -> dict[str, Any]:
    """Load the model, wrap it with LoRA and build the trainer; returns the objects and the RSS checkpoints."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    import peft_unlearn  # noqa: F401  (registers init_lora_weights="fila")
    from peft_unlearn import UnlearningConfig, UnlearningTrainer
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
    args = UnlearningConfig(
        output_dir=output_dir,
        forget_loss="inverted_hinge",
        retain_loss="nll",
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_length=spec["max_length"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=spec["seed"],
        use_cpu=True,
        disable_tqdm=True,
        fila_batch_size=spec["fila_batch_size"],
    )
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        forget_dataset=Dataset.from_list(_read_texts(DATA / "forget.jsonl", spec["n_forget"])),
        retain_dataset=Dataset.from_list(_read_texts(DATA / "retain.jsonl")),
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
    from transformers import TrainerCallback

    import peft_unlearn.fila.init as fila_init

    phase = spec["phase"]
    with tempfile.TemporaryDirectory() as tmp:
        env = _setup(spec, "fila" if phase == "fila" else True, tmp)
        trainer = env.pop("trainer")
        env.pop("model")
        env.pop("tokenizer")
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

        fisher_mark: dict[str, Any] = {}
        original_estimate = fila_init.estimate_fisher

        def timed_estimate(*args: Any, **kwargs: Any) -> Any:
            """Instrumentation only: records the peak of the Fisher pass and resets it before the SVD phase."""
            result = original_estimate(*args, **kwargs)
            fisher_mark.update({f"{k}_after_fisher_bytes": v for k, v in _mem().items()})
            fisher_mark["reset_ok"] = _reset_peak()
            return result

        reset_ok = _reset_peak()
        with PeakSampler() as sampler:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if phase == "fila":
                fila_init.estimate_fisher = timed_estimate
                try:
                    # the exact hook UnlearningTrainer.train() calls before training starts
                    stats = trainer._maybe_initialize_fila()
                finally:
                    fila_init.estimate_fisher = original_estimate
                if not stats or "default" not in stats:
                    raise RuntimeError("The FILA initialisation did not run (no pending FILA adapter).")
                # peak_memory_bytes (ru_maxrss) is not kept: the instrumentation resets the peak after the Fisher pass
                out["fila_stats"] = {
                    k: v
                    for k, v in stats["default"].items()
                    if isinstance(v, (int, float, str)) and k != "peak_memory_bytes"
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
# child process: profile of the Fisher pass and of the SVD phase
# ----------------------------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batched_lowrank_svd(matrices, rank: int, niter: int, seed: int):
    """Prototype: ``torch.svd_lowrank``'s algorithm on a stack ``[L, m, n]`` of same-shape layers.

    Uses one Gaussian test matrix for the stack, which is what FILA's per-layer reseeding gives every
    layer of a shape today. Returns ``S [L, r]`` and ``V [L, n, r]``.
    """
    import torch

    tall = matrices.shape[-2] >= matrices.shape[-1]
    a = matrices if tall else matrices.mT
    generator = torch.Generator().manual_seed(seed)
    test = torch.randn(a.shape[-1], rank, generator=generator, dtype=a.dtype)
    q = torch.linalg.qr(a @ test).Q
    for _ in range(niter):
        q = torch.linalg.qr(a.mT @ q).Q
        q = torch.linalg.qr(a @ q).Q
    u, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return s, (vh.mT if tall else q @ u)


_MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")
OP_CLASSES = (
    "vocab-sized ops (LM head matmuls, logits, loss)",
    "weight-gradient matmuls (contract over tokens)",
    "activation matmuls (forward and input gradients)",
    "weight-sized elementwise (squared-gradient accumulation)",
    "other (norms, activations, attention, autograd glue)",
)


def _compact_ops(ops: list[list[Any]], min_ms: float = 5.0) -> list[list[Any]]:
    """Keep the operator rows with at least ``min_ms`` self time; the rest becomes one ``(other ops)`` row."""
    kept = [row for row in ops if row[2] >= min_ms]
    rest = sum(row[2] for row in ops if row[2] < min_ms)
    return kept + ([[f"(other ops < {min_ms:g} ms)", [], rest]] if rest else [])


def _classify_ops(
    ops: list[list[Any]], vocab: int, tokens: int, weight_shapes: list[list[int]] | list[tuple[int, ...]]
) -> dict[str, float]:
    """Split profiler self-CPU time (ms) into operator classes from the operators' input shapes.

    Args:
        ops: ``[name, input_shapes, self_ms]`` rows (``key_averages(group_by_input_shape=True)``).
        vocab: Vocabulary size (any input with this dimension is a vocab-sized op).
        tokens: Tokens in the batch (``B * T``): a 2-D matmul contracting over them is a weight gradient.
        weight_shapes: Shapes of the target weights (2-D non-matmul ops on them are the accumulation).

    Returns:
        ``class -> ms`` over :data:`OP_CLASSES`.
    """
    shapes_set = {tuple(shape) for shape in weight_shapes}
    classes = dict.fromkeys(OP_CLASSES, 0.0)
    for name, shapes, self_ms in ops:
        shapes = [list(shape) for shape in shapes if shape]
        if any(vocab in shape for shape in shapes):
            cls = OP_CLASSES[0]
        elif name in _MM_OPS and len(shapes) >= 2 and len(shapes[0]) == 2 and len(shapes[1]) == 2:
            cls = OP_CLASSES[1] if shapes[0][1] == tokens else OP_CLASSES[2]
        elif shapes and all(tuple(shape) in shapes_set for shape in shapes):
            cls = OP_CLASSES[3]
        else:
            cls = OP_CLASSES[4]
        classes[cls] += self_ms
    return classes


def run_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """Anatomy of one Fisher batch step and of the per-layer SVD (see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from peft_unlearn.fila.config import FilaConfig
    from peft_unlearn.fila.fisher import resolve_fisher_targets
    from peft_unlearn.fila.init import _truncated_svd, fila_init_layer
    from peft_unlearn.losses import inverted_hinge_loss, nll_loss
    from peft_unlearn.trainer import CausalLMCollator, TokenizedDataset, tokenize_dataset

    threads = spec["threads"]
    out: dict[str, Any] = {"threads": threads, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    with tempfile.TemporaryDirectory() as tmp:
        env = _setup(spec, "fila", tmp)
    model, tokenizer = env["model"], env["tokenizer"]
    out["rss_loaded_bytes"] = env["rss_loaded_bytes"]
    reps = spec["profile_repeats"]
    collate = CausalLMCollator(tokenizer.pad_token_id)

    def batch_of(name: str, limit: int | None) -> dict[str, Any]:
        examples = tokenize_dataset(
            _read_texts(DATA / f"{name}.jsonl", limit)[: spec["fila_batch_size"]],
            tokenizer,
            max_length=spec["max_length"],
            name=name,
        )
        return collate([TokenizedDataset(examples)[i] for i in range(len(examples))])

    batch = batch_of("forget", spec["n_forget"])
    retain_batch = batch_of("retain", None)
    base = model.get_base_model()
    vocab = base.config.vocab_size
    out["batch_shape"] = list(batch["input_ids"].shape)

    targets = resolve_fisher_targets(model)
    names = list(targets)
    weights = [targets[n].weight for n in names]
    target_numel = sum(w.numel() for w in weights)
    weight_shapes = {tuple(w.shape) for w in weights}
    out["num_target_layers"] = len(names)
    out["target_numel"] = target_numel
    out["model_numel"] = sum(p.numel() for p in base.parameters())
    b, t = batch["input_ids"].shape
    out["memory_anatomy_mib"] = {
        "model_weights": out["model_numel"] * 4 / MIB,
        "fisher_accumulators_forget_plus_retain_fp32": 2 * target_numel * 4 / MIB,
        "all_target_gradients_at_once_fp32": target_numel * 4 / MIB,
        "logits_one_batch_fp32": b * t * vocab * 4 / MIB,
    }
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]

    def set_trainable(fisher: bool) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in weights if fisher else lora_params:
            p.requires_grad_(True)

    acc = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in zip(names, weights)}
    n_tokens = int((batch["labels"] != -100).sum())

    def forward():
        return model(**batch).loss

    def fisher_step() -> dict[str, float]:
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        grads = torch.autograd.grad(loss, weights)
        t2 = time.perf_counter()
        for name, grad in zip(names, grads):
            acc[name].add_(grad.square().mul_(n_tokens))
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "accumulate": t3 - t2}

    def median_split(fn, n: int) -> dict[str, float]:
        splits = [fn() for _ in range(n)]
        return {k: statistics.median(s[k] for s in splits) for k in splits[0]}

    # ---- one LoRA training step on the same batches (IHL on forget + NLL on retain), adapters enabled ----
    def train_step() -> dict[str, float]:
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss = inverted_hinge_loss(logits, batch["labels"])
        del logits
        r_logits = model(
            input_ids=retain_batch["input_ids"], attention_mask=retain_batch["attention_mask"], use_cache=False
        ).logits
        loss = loss + nll_loss(r_logits, retain_batch["labels"])
        del r_logits
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        for p in lora_params:
            p.grad = None
        return {"forward": t1 - t0, "backward": t2 - t1}

    set_trainable(fisher=False)
    model.train()
    with torch.enable_grad():
        train_step()  # warm-up (pages the weights in)
        out["train_step_forget_plus_retain_seconds"] = median_split(train_step, reps)
        torch.set_num_threads(1)
        out["train_step_forget_plus_retain_seconds_1_thread"] = median_split(train_step, reps)
        torch.set_num_threads(threads)

    set_trainable(fisher=True)
    with model.disable_adapter(), torch.enable_grad():
        model.eval()
        fisher_step()  # warm-up
        out["fisher_step_seconds_eval_mode"] = median_split(fisher_step, reps)
        with torch.no_grad():
            out["forward_no_grad_seconds"] = _median_time(forward, reps)

            def body():
                base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

            out["decoder_body_forward_no_grad_seconds"] = _median_time(body, reps)
        model.train()
        out["fisher_step_seconds_train_mode"] = median_split(fisher_step, reps)
        model.eval()
        torch.set_num_threads(1)
        out["fisher_step_seconds_eval_mode_1_thread"] = median_split(fisher_step, reps)
        torch.set_num_threads(threads)

        # operator-level split of one Fisher step (classified by input shapes, see _classify_ops)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fisher_step()
        out["profile_ops"] = _compact_ops(
            [
                [event.key, [list(shape) for shape in event.input_shapes], float(event.self_cpu_time_total) / 1e3]
                for event in prof.key_averages(group_by_input_shape=True)
            ]
        )
        out["profile_context"] = {"vocab": vocab, "tokens": b * t, "weight_shapes": sorted(weight_shapes)}
        out["profile_classes_self_cpu_ms"] = _classify_ops(out["profile_ops"], **out["profile_context"])

        # accumulation: current square/mul/add vs one fused addcmul_
        sample_grads = list(torch.autograd.grad(forward(), weights))

        def current_acc():
            for name, grad in zip(names, sample_grads):
                acc[name].add_(grad.square().mul_(n_tokens))

        def fused_acc():
            for name, grad in zip(names, sample_grads):
                acc[name].addcmul_(grad, grad, value=n_tokens)

        out["accumulate_seconds"] = {
            "current_square_mul_add": _median_time(current_acc, reps),
            "fused_addcmul": _median_time(fused_acc, reps),
        }
        sample_grads.clear()

        # memory: streaming accumulation in post-accumulate-grad hooks vs the current all-at-once autograd.grad
        ref = {n: torch.zeros_like(a) for n, a in acc.items()}
        stream = {n: torch.zeros_like(a) for n, a in acc.items()}

        def current_step():
            grads = torch.autograd.grad(forward(), weights)
            for name, grad in zip(names, grads):
                ref[name].add_(grad.square().mul_(n_tokens))

        def streaming_step():
            handles = []
            for name, weight in zip(names, weights):

                def hook(param, name=name):
                    stream[name].addcmul_(param.grad, param.grad, value=n_tokens)
                    param.grad = None

                handles.append(weight.register_post_accumulate_grad_hook(hook))
            try:
                forward().backward(inputs=weights)
            finally:
                for handle in handles:
                    handle.remove()

        memory: dict[str, Any] = {}
        for label, fn in (("streaming_hooks", streaming_step), ("current_autograd_grad", current_step)):
            gc.collect()
            rss0 = _mem()["VmRSS"]
            _reset_peak()
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
            memory[label] = {"increment_mib": (_mem()["VmHWM"] - rss0) / MIB, "seconds": seconds}
        memory["streaming_equals_current"] = bool(
            all(torch.allclose(ref[n], stream[n], rtol=1e-5, atol=0) for n in names)
        )
        out["fisher_step_memory"] = memory
        ref.clear()
        stream.clear()
    acc.clear()
    for p in model.parameters():
        p.requires_grad_(False)

    # ---- SVD phase: every target layer's fila_init_layer (real weights, random importance) ----
    cfg = FilaConfig()
    scaling = spec["alpha"] / spec["rank"]
    layer_weights = {n: targets[n].weight.detach() for n in names}
    importance = {n: torch.rand_like(w) + 0.1 for n, w in layer_weights.items()}

    def all_layers() -> None:
        for n in names:
            fila_init_layer(layer_weights[n], importance[n], spec["rank"], scaling, config=cfg)

    def all_svds() -> None:
        for n in names:
            w = layer_weights[n]
            _truncated_svd(importance[n].sum(1).sqrt()[:, None] * w, spec["rank"], cfg)

    groups: dict[tuple[int, ...], list[str]] = {}
    for n in names:
        groups.setdefault(tuple(layer_weights[n].shape), []).append(n)

    def batched_svds() -> list[Any]:
        results = []
        for members in groups.values():
            stack = torch.stack([importance[n].sum(1).sqrt()[:, None] * layer_weights[n] for n in members])
            results.append(_batched_lowrank_svd(stack, spec["rank"], cfg.niter, cfg.seed))
        return results

    svd: dict[str, Any] = {}
    for label, n_threads in (("threads", threads), ("1_thread", 1)):
        torch.set_num_threads(n_threads)
        svd[f"fila_init_layer_all_layers_s_{label}"] = _median_time(all_layers, reps)
        svd[f"truncated_svd_only_all_layers_s_{label}"] = _median_time(all_svds, reps)
        svd[f"batched_randomized_svd_prototype_s_{label}"] = _median_time(batched_svds, reps)
    torch.set_num_threads(threads)
    # accuracy of the per-layer and batched randomized SVDs vs the exact top-r singular values (2 layers)
    shape, members = next((k, v) for k, v in groups.items() if k[0] != k[1])
    s_batched = batched_svds()[list(groups).index(shape)][0]
    errors: dict[str, float] = {"per_layer": 0.0, "batched": 0.0}
    for i, n in enumerate(members[:2]):
        matrix = importance[n].sum(1).sqrt()[:, None] * layer_weights[n]
        exact = torch.linalg.svdvals(matrix)[: spec["rank"]]
        loop = _truncated_svd(matrix, spec["rank"], cfg)[1]
        errors["per_layer"] = max(errors["per_layer"], float(((loop - exact).abs() / exact).max()))
        errors["batched"] = max(errors["batched"], float(((s_batched[i] - exact).abs() / exact).max()))
    svd["max_rel_error_top_r_singular_values"] = errors
    svd["accuracy_checked_on"] = f"{members[:2]} {list(shape)}"
    svd["groups"] = {str(list(k)): len(v) for k, v in groups.items()}
    svd["num_layers"] = len(names)
    out["svd"] = svd
    out["peak_rss_bytes"] = _mem()["VmHWM"]
    return out


# ----------------------------------------------------------------------------------------------
# parent process: orchestration and report
# ----------------------------------------------------------------------------------------------
def child(spec: dict[str, Any], timeout: int, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its result (or ``{"error": ...}``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", str(out)]
        env = {**os.environ, **(extra_env or {})}
        load_before = list(os.getloadavg())
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s", "loadavg_before": load_before}
        if proc.returncode != 0 or not out.exists():
            return {"error": proc.stderr[-3000:], "returncode": proc.returncode, "loadavg_before": load_before}
        result = json.loads(out.read_text())
        result["child_wall_seconds"] = time.time() - t0
        result["loadavg_before"] = load_before
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
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) and not math.isnan(value) else "–"


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
    prof = results.get("profile")
    if prof and "error" not in prof:
        lines += _profile_lines(prof, s)
    elif prof:
        lines += ["", f"Profile failed: `{prof['error'][-500:]}`"]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(summaries, path.with_suffix(".png"), s.get("rank"))


def _profile_lines(prof: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    ev = prof["fisher_step_seconds_eval_mode"]
    tr = prof["fisher_step_seconds_train_mode"]
    one = prof["fisher_step_seconds_eval_mode_1_thread"]
    lora = prof["train_step_forget_plus_retain_seconds"]
    lora_one = prof.get("train_step_forget_plus_retain_seconds_1_thread", {})
    if "profile_ops" in prof:
        classes = _classify_ops(prof["profile_ops"], **prof["profile_context"])
        top = sorted(prof["profile_ops"], key=lambda row: -row[2])[:8]
        top_ops = [(f"{name} {shapes}", ms) for name, shapes, ms in top]
    else:  # results of an older version of this script
        classes = prof["profile_classes_self_cpu_ms"]
        top_ops = sorted(prof["profile_top_ops_ms"].items(), key=lambda kv: -kv[1])[:8]
    total_ms = sum(classes.values()) or float("nan")
    mem = prof["fisher_step_memory"]
    acc = prof["accumulate_seconds"]
    svd = prof["svd"]
    th = prof["threads"]
    nan = float("nan")
    lines = [
        "",
        "## Fisher pass and SVD anatomy (`--profile`, medians of the profile repeats)",
        "",
        f"Batch shape {prof['batch_shape']} (the first forget batch; the retain batch has a similar length); "
        f"{prof['num_target_layers']} target layers, {prof['target_numel'] / 1e6:.1f} M target weights of "
        f"{prof['model_numel'] / 1e6:.1f} M parameters. A Fisher step is what `estimate_fisher` does per forget (or "
        "retain) batch: forward with labels, `torch.autograd.grad` w.r.t. every target weight, `acc += n * g**2`; "
        "the Fisher pass runs one per forget batch and one per retain batch. A LoRA step is one training step of "
        "the epoch measurement (IHL on the forget batch + NLL on a retain batch, backward), without the optimizer.",
        "",
        f"| part | Fisher step, eval mode (default), {th} thr. s | Fisher step, train mode, {th} thr. s "
        f"| Fisher step, 1 thr. s | LoRA step (forget + retain), {th} thr. s | LoRA step (forget + retain), 1 thr. s |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("forward", "backward", "accumulate"):
        lines.append(
            f"| {k} | {ev[k]:.2f} | {tr[k]:.2f} | {one[k]:.2f} | {lora.get(k, nan):.2f} | {lora_one.get(k, nan):.2f} |"
        )
    lines += [
        f"| total | {sum(ev.values()):.2f} | {sum(tr.values()):.2f} | {sum(one.values()):.2f} "
        f"| {sum(lora.values()):.2f} | {sum(lora_one.values()) if lora_one else nan:.2f} |",
        f"| x2 (forget + retain batch) | {2 * sum(ev.values()):.2f} | {2 * sum(tr.values()):.2f} "
        f"| {2 * sum(one.values()):.2f} | | |",
        "",
        f"Forward without grad: {prof['forward_no_grad_seconds']:.2f} s, of which the decoder body (no LM head, "
        f"no loss) {prof['decoder_body_forward_no_grad_seconds']:.2f} s.",
        "",
        f"Profiler, one Fisher step ({th} threads), self CPU time by operator class (from the input shapes):",
        "",
        "| class | ms | share |",
        "|---|---|---|",
        *(f"| {k} | {v:.0f} | {100 * v / total_ms:.0f} % |" for k, v in classes.items()),
        "",
        "Top operators: " + "; ".join(f"`{k[:70]}` {v:.0f} ms" for k, v in top_ops),
        "",
        "Memory anatomy (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in prof["memory_anatomy_mib"].items()),
        "",
        f"Accumulation of one batch's squared gradients into the fp32 accumulators: current "
        f"`acc.add_(g.square().mul_(n))` {acc['current_square_mul_add']:.2f} s, fused `acc.addcmul_(g, g, value=n)` "
        f"{acc['fused_addcmul']:.2f} s.",
        "",
        "One Fisher step, RSS peak increment over the RSS before the step (accumulators already allocated; "
        f"profile child run with MALLOC_MMAP_THRESHOLD_={prof.get('malloc_mmap_threshold')} so freed tensors "
        f"return to the OS): current `torch.autograd.grad` over all targets "
        f"{mem['current_autograd_grad']['increment_mib']:.0f} MiB ({mem['current_autograd_grad']['seconds']:.1f} s); "
        f"streaming `addcmul_` in post-accumulate-grad hooks {mem['streaming_hooks']['increment_mib']:.0f} MiB "
        f"({mem['streaming_hooks']['seconds']:.1f} s); identical statistics: {mem['streaming_equals_current']}.",
        "",
        f"SVD phase over all {svd['num_layers']} layers (real weights, random importance; shapes {svd['groups']}):",
        "",
        f"| variant | {th} threads s | 1 thread s |",
        "|---|---|---|",
        f"| `fila_init_layer` per layer (current: weighting + SVD + factors + residual) "
        f"| {svd['fila_init_layer_all_layers_s_threads']:.1f} | {svd['fila_init_layer_all_layers_s_1_thread']:.1f} |",
        f"| `_truncated_svd` per layer (current SVD only) | {svd['truncated_svd_only_all_layers_s_threads']:.1f} "
        f"| {svd['truncated_svd_only_all_layers_s_1_thread']:.1f} |",
        f"| batched randomized SVD per shape group (prototype) "
        f"| {svd['batched_randomized_svd_prototype_s_threads']:.1f} "
        f"| {svd['batched_randomized_svd_prototype_s_1_thread']:.1f} |",
        "",
        f"Max relative error of the top-{settings.get('rank')} singular values vs exact SVD "
        f"({svd['accuracy_checked_on']}): per-layer {svd['max_rel_error_top_r_singular_values']['per_layer']:.2e}, "
        f"batched {svd['max_rel_error_top_r_singular_values']['batched']:.2e}.",
        "",
    ]
    return lines


def _plot(summaries: dict[int, dict[str, Any]], png: Path, rank: Any = "?") -> None:
    """Bar plot: time (Fisher + SVD vs epoch) and peak RSS (loaded + increment), one group per thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = [(t, s["medians"]) for t, s in summaries.items() if {"fila", "epoch"} <= set(s.get("medians", {}))]
    if not groups:
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
        ax_t.hlines(
            TARGETS["time"] * e["wall_seconds"],
            i - width,
            i + width,
            colors="k",
            linestyles="--",
            label=f"target {TARGETS['time']}x epoch" if first else None,
        )
        ax_t.text(x_f, f["wall_seconds"] * 1.02, f"{f['wall_seconds'] / e['wall_seconds']:.2f}x", ha="center")
        for x, m, color in ((x_f, f, "tab:orange"), (x_e, e, "tab:blue")):
            loaded = m["rss_loaded_bytes"] / GIB
            ax_m.bar(x, loaded, width, color="tab:gray", label="RSS after loading" if first and m is f else None)
            ax_m.bar(x, m["phase_increment_bytes"] / GIB, width, bottom=loaded, color=color)
        ax_m.hlines(
            TARGETS["memory"] * e["phase_peak_rss_bytes"] / GIB,
            i - width,
            i + width,
            colors="k",
            linestyles="--",
            label=f"target {TARGETS['memory']}x training peak" if first else None,
        )
        ax_m.text(
            x_f,
            f["phase_peak_rss_bytes"] / GIB * 1.02,
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
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="alias, local directory or Hub id")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--targets", nargs="+", default=list(ALL_TARGETS))
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
    p.add_argument("--profile", action="store_true", help="also profile the Fisher pass and the SVDs")
    p.add_argument("--profile-only", action="store_true", help="run only the profile (keeps the stored runs)")
    p.add_argument("--profile-repeats", type=int, default=2)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--fresh", action="store_true", help="discard runs already in --results")
    p.add_argument("--timeout", type=int, default=3600, help="per-run timeout in seconds")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--notes-file", type=Path, help="markdown stored with the results and shown in the report")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        result = run_profile(spec) if spec["phase"] == "profile" else run_phase(spec)
        Path(args.child_out).write_text(json.dumps(result))
        return

    if args.rank < 1 or args.batch_size < 1 or args.max_length < 2 or args.repeats < 1:
        p.error("--rank, --batch-size and --repeats must be >= 1 and --max-length >= 2")
    unknown = sorted(set(args.targets) - set(ALL_TARGETS))
    if unknown:
        p.error(f"--targets {unknown} unknown; choose from {list(ALL_TARGETS)}")

    results: dict[str, Any] = {"runs": {}}
    if args.results.exists() and not args.fresh:
        results = json.loads(args.results.read_text())
    for run in results.get("runs", {}).values():  # drop a value distorted by the peak reset (older files)
        run["result"].get("fila_stats", {}).pop("peak_memory_bytes", None)
    if isinstance(results.get("profile", {}).get("profile_ops"), list):
        results["profile"]["profile_ops"] = _compact_ops(results["profile"]["profile_ops"])
    if args.notes_file is not None:
        results["notes"] = args.notes_file.read_text()
    if args.report_only:
        report(results, args.results)
        _save(args.results, results)
        return

    import torch
    import transformers

    import peft_unlearn

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
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft_unlearn": peft_unlearn.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "note": args.note,
    }
    # a --profile-only call keeps the command and machine record of the measurement runs
    prefix = "profile_" if args.profile_only else ""
    results[prefix + "command"] = command
    results[prefix + "machine"] = machine
    # interleave the phases so slow periods of the shared machine hit both
    thread_counts = [args.threads] + [t for t in args.control_threads if t != args.threads]
    plan = [(phase, rep, t) for rep in range(args.repeats) for t in thread_counts for phase in args.phases]
    for phase, rep, n_threads in [] if args.profile_only else plan:
        key = f"{phase}#{rep}" if n_threads == args.threads else f"{phase}#{rep}@{n_threads}threads"
        if key in results["runs"] and "error" not in results["runs"][key]["result"]:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {key} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
        result = child({**settings, "phase": phase, "threads": n_threads}, args.timeout)
        results["runs"][key] = {"phase": phase, "repeat": rep, "threads": n_threads, "result": result}
        _save(args.results, results)
        report(results, args.results)
        _save(args.results, results)
        msg = result.get("error", "")[-800:] or (
            f"wall {result['wall_seconds']:.1f} s, cpu {result['cpu_seconds']:.1f} s, "
            f"phase peak {result['phase_peak_rss_bytes'] / GIB:.2f} GiB, loaded {result['rss_loaded_bytes'] / GIB:.2f} GiB"
        )
        print(f"    {msg}", flush=True)
    if args.profile_only or args.profile and ("profile" not in results or "error" in results["profile"] or args.fresh):
        print(f"[{time.strftime('%H:%M:%S')}] profile ...", flush=True)
        results["profile"] = child(
            {**settings, "phase": "profile", "profile_repeats": args.profile_repeats},
            args.timeout,
            extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"},
        )
        if "error" in results["profile"]:
            print(results["profile"]["error"][-1500:], flush=True)
    machine["loadavg_at_end"] = list(os.getloadavg())
    report(results, args.results)
    _save(args.results, results)


if __name__ == "__main__":
    main()
