"""Robustness of unlearning: does the forgetting survive quantization, relearning, export and other prompts?

Known failure modes of LLM unlearning, each run here as an *attack* on a copy of the unlearned model and, as the
reference, the same attack on the base model (the adapters disabled):

- ``"quantization"``: the merged model reloaded with bitsandbytes nf4, fp4 (the bitsandbytes default 4-bit type)
  and int8. Zhang et al. (ICLR 2025, arXiv 2410.16454) found that 4-bit quantization restores much of what
  gradient-based unlearning removed. Quantization alone lowers MA on the base as well, so the figures to read are
  the change against the unquantized unlearned model and against the quantized base.
- ``"relearning"``: a fresh LoRA trained with plain NLL for a schedule of steps (measured cumulatively in one run,
  fixed seed) on one part of the forget set, measured on the part never relearned (Hu et al., arXiv 2406.13356;
  Lucki et al., arXiv 2409.18025); with ``related=`` also on that text, measured on the whole forget set.
- ``"export"``: ``merge_and_unload`` + ``save_pretrained`` reloaded with plain transformers, and the portable
  adapter (``save_pretrained``) reloaded with plain PEFT onto the original base; forgetting must be identical.
- ``"prompt"``: extraction from other prompts than the trained ones (Doshi et al., arXiv 2406.13356 and
  follow-ups): the passage started at a later offset, only the tokens after a prefix of fixed length scored
  (EL from that one prefix), and the passage after a few-shot prefix of other passages.

Every attack reports forget MA and EL_n (and MA of ``heldout`` / ``retain`` where given) in
[`RobustnessRow`][peft_unlearn.metrics.robustness.RobustnessRow]s. An attack *recovers* the forgotten text when it
undoes more than ``recovery_threshold`` (default a quarter) of the gap between the unlearned and the base forget MA.

Attacks are pluggable: [`register_attack`][peft_unlearn.metrics.robustness.register_attack] adds a function
``(AttackContext) -> list[RobustnessRow]`` under a name.

Examples:
    >>> from peft import LoraConfig, get_peft_model
    >>> from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer
    >>> model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    >>> report = evaluate_robustness(model, tiny_tokenizer(), [[1, 5, 6, 7, 8, 9, 10, 11]] * 2, attacks=["prompt"],
    ...                              el_n=2, prefix_offsets=(2,), prefix_lengths=(3,), few_shot=0)
    >>> sorted({row.variant for row in report.rows})
    ['offset=2', 'prefix=3']
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils import IGNORE_INDEX, has_peft_adapters, model_device
from .forward import _normalize_data
from .memorization import evaluate_memorization
from .report import format_results_table

__all__ = [
    "DEFAULT_ATTACKS",
    "ROBUSTNESS_ATTACKS",
    "AttackContext",
    "RobustnessReport",
    "RobustnessRow",
    "evaluate_robustness",
    "register_attack",
    "relearn_split",
]

QUANTIZATION_MODES = ("nf4", "fp4", "int8")
DEFAULT_ATTACKS = ("quantization", "relearning", "export", "prompt")
"""The attacks `evaluate_robustness` runs by default, in this order."""

Items = list[dict[str, list[int] | None]]


# --------------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    if not (math.isfinite(num) and math.isfinite(den)) or abs(den) < 1e-12:
        return float("nan")
    return num / den


@dataclass(frozen=True)
class RobustnessRow:
    """One metric of one set under one attack, for the unlearned model and the base model.

    Attributes:
        attack: The attack name, e.g. ``"quantization"``.
        variant: Its setting, e.g. ``"nf4"``, ``"steps=15"`` or ``"offset=16"``.
        set: The data scored: ``forget``, ``forget_unseen`` (the forget part never relearned),
            ``forget_relearned``, ``heldout`` or ``retain``.
        metric: ``ma`` or ``el{n}``.
        unlearned_before: The unlearned model without the attack.
        base_before: The base model (adapters disabled) without the attack.
        unlearned_after: The unlearned model after the attack.
        base_after: The base model after the same attack (None where the attack does not apply to it, e.g. export).
    """

    attack: str
    variant: str
    set: str
    metric: str
    unlearned_before: float
    base_before: float
    unlearned_after: float
    base_after: float | None = None

    @property
    def gap_recovery(self) -> float:
        """``(after - before) / (base_before - before)`` of the unlearned model: the fraction of the forgetting gap
        the attack undid (0: nothing came back, 1: back at the base; NaN without a gap)."""
        return _ratio(self.unlearned_after - self.unlearned_before, self.base_before - self.unlearned_before)

    @property
    def reference_recovery(self) -> float:
        """``(after - before) / (base_after - before)``: the same against the base under the same attack, e.g. the
        quantized base, which quantization alone moves as well (NaN without ``base_after``)."""
        if self.base_after is None:
            return float("nan")
        return _ratio(self.unlearned_after - self.unlearned_before, self.base_after - self.unlearned_before)

    @property
    def delta(self) -> float:
        """``unlearned_after - unlearned_before``."""
        return self.unlearned_after - self.unlearned_before


@dataclass
class RobustnessReport:
    """What `evaluate_robustness` measured.

    Attributes:
        rows: Every measured metric (see `RobustnessRow`).
        settings: The settings it ran with (attacks, schedules, EL, seed, data sizes and a fingerprint of the data).
        recovery_threshold: An attack *recovers* the text when the forget MA's `gap_recovery` exceeds this.
        notes: Remarks printed under the tables (e.g. that quantization lowers MA on the base too).
    """

    rows: list[RobustnessRow]
    settings: dict[str, Any]
    recovery_threshold: float = 0.25
    notes: list[str] = field(default_factory=list)

    def select(
        self, attack: str | None = None, variant: str | None = None, set: str | None = None, metric: str | None = None
    ) -> list[RobustnessRow]:
        """The rows matching every given field.

        Args:
            attack: Attack name.
            variant: Variant name.
            set: Set name.
            metric: Metric name.

        Returns:
            The matching rows, in measurement order.
        """
        wanted = {"attack": attack, "variant": variant, "set": set, "metric": metric}
        return [r for r in self.rows if all(v is None or getattr(r, k) == v for k, v in wanted.items())]

    def forget_rows(self) -> list[RobustnessRow]:
        """The forget-MA row of every (attack, variant): ``forget_unseen`` for relearning, ``forget`` otherwise."""
        out = []
        for row in self.rows:
            if row.metric == "ma" and row.set in ("forget", "forget_unseen"):
                out.append(row)
        return out

    def recovered(self) -> dict[str, bool]:
        """``{"attack/variant": True}`` where the attack undid more than `recovery_threshold` of the forget-MA gap."""
        return {f"{r.attack}/{r.variant}": bool(r.gap_recovery > self.recovery_threshold) for r in self.forget_rows()}

    def held(self) -> bool:
        """True when no attack recovered the forgotten text (see `recovered`)."""
        return not any(self.recovered().values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, threshold, notes, the rows (with their recoveries) and `recovered`."""
        rows = []
        for r in self.rows:
            entry = dataclasses.asdict(r)
            entry.update(gap_recovery=r.gap_recovery, reference_recovery=r.reference_recovery)
            rows.append({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in entry.items()})
        return {
            "settings": self.settings,
            "recovery_threshold": self.recovery_threshold,
            "notes": list(self.notes),
            "rows": rows,
            "recovered": self.recovered(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RobustnessReport:
        """The report `to_dict` wrote (e.g. read back from JSON, to pass as ``reference=``).

        Args:
            data: A `to_dict` result.

        Returns:
            The `RobustnessReport` (JSON nulls become NaN).
        """
        names = [f.name for f in dataclasses.fields(RobustnessRow)]
        nan = float("nan")
        rows = []
        for entry in data["rows"]:
            values = {k: entry[k] for k in names}
            for k in ("unlearned_before", "base_before", "unlearned_after"):
                values[k] = nan if values[k] is None else float(values[k])
            rows.append(RobustnessRow(**values))
        return cls(rows, dict(data["settings"]), float(data["recovery_threshold"]), list(data.get("notes", [])))

    def flat(self) -> dict[str, dict[str, float]]:
        """``{"attack/variant/set": {"metric": after, "metric_base": base_after, ...}}`` for
        [`format_results_table`][peft_unlearn.metrics.format_results_table] and
        [`write_results_json`][peft_unlearn.metrics.write_results_json]."""
        out: dict[str, dict[str, float]] = {}
        for r in self.rows:
            entry = out.setdefault(f"{r.attack}/{r.variant}/{r.set}", {})
            entry[r.metric] = r.unlearned_after
            if r.base_after is not None:
                entry[f"{r.metric}_base"] = r.base_after
        return out

    def to_text(self) -> str:
        """An aligned text table of `flat` (what the CLI prints)."""
        return format_results_table(self.flat())

    def to_markdown(self) -> str:
        """One markdown table per attack: before -> after for the unlearned and the base model, and the recoveries.

        Returns:
            Markdown text (tables, the verdict per attack and the notes).
        """
        lines: list[str] = []
        for attack in dict.fromkeys(r.attack for r in self.rows):
            lines += [
                f"### {attack}",
                "",
                "| variant | set | metric | unlearned before | unlearned after | Δ | base before | base after "
                "| gap recovered | vs attacked base |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in self.select(attack=attack):
                lines.append(
                    f"| {r.variant} | {r.set} | {r.metric} | {_fmt(r.unlearned_before)} | {_fmt(r.unlearned_after)} "
                    f"| {_fmt(r.delta, signed=True)} | {_fmt(r.base_before)} | {_fmt(r.base_after)} "
                    f"| {_fmt(r.gap_recovery, pct=True)} | {_fmt(r.reference_recovery, pct=True)} |"
                )
            lines.append("")
        verdict = self.recovered()
        if verdict:
            lines += [f"Forget MA recovered (more than {self.recovery_threshold:.0%} of the gap to the base) by:", ""]
            bad = [k for k, v in verdict.items() if v]
            lines.append(", ".join(f"`{k}`" for k in bad) if bad else "none: the forgetting held under every attack.")
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def _fmt(value: float | None, signed: bool = False, pct: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if pct:
        return f"{value:.0%}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


# --------------------------------------------------------------------------------------------------------------
# the context an attack runs in
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttackContext:
    """Everything an attack needs: the saved models, the data, the scores before any attack and the settings.

    Attributes:
        unlearned_dir: ``save_pretrained`` folder of the merged unlearned model (with the tokenizer).
        base_dir: The same for the base model (the adapters disabled / unloaded).
        model: The user's model (read only, e.g. to save its portable adapter; never modified).
        tokenizer: The tokenizer.
        sets: ``{name: items}`` of ``{"input_ids": [...], "labels": [...] | None}`` (``forget`` always).
        related: Items of the user's related text for relearning, or None.
        before: ``{"unlearned" | "base": {set: {metric: value}}}`` without any attack.
        options: The keyword settings of `evaluate_robustness` (schedules, EL, seed, ...).
        work_dir: A scratch folder of the run.
        reference: A previous report whose base-model numbers are reused (no base measurement), or None.
    """

    unlearned_dir: Path
    base_dir: Path
    model: Any
    tokenizer: Any
    sets: dict[str, Items]
    related: Items | None
    before: dict[str, dict[str, dict[str, float]]]
    options: dict[str, Any]
    work_dir: Path
    reference: RobustnessReport | None = None

    @property
    def el_key(self) -> str:
        return f"el{self.options['el_n']}"

    def score(self, model: Any, sets: Mapping[str, Items], *, el_prefix_stride: int | None = None) -> dict:
        """``{set: {"ma": ..., "el{n}": ...}}``: MA of every set, EL_n of the forget sets (names ``forget*``)."""
        out = {}
        for name, items in sets.items():
            with_el = name.startswith("forget")
            with _quiet():
                scores = evaluate_memorization(
                    model,
                    items,
                    batch_size=self.options["batch_size"],
                    el_n=(self.options["el_n"],),
                    el_prefix_stride=el_prefix_stride or self.options["el_prefix_stride"],
                    pad_token_id=_pad_id(self.tokenizer),
                    compute_el=with_el,
                )
            out[name] = {"ma": scores["ma"], **({self.el_key: scores[self.el_key]} if with_el else {})}
        return out

    def load(self, which: str, quantization: str | None = None) -> Any:
        """A fresh copy of the ``"unlearned"`` or ``"base"`` model from its folder, optionally bitsandbytes-quantized
        (``"nf4"``, ``"fp4"`` or ``"int8"``), in eval mode on the device of the user's model."""
        from transformers import AutoModelForCausalLM

        folder = self.unlearned_dir if which == "unlearned" else self.base_dir
        dtype = self.options["dtype"]
        kwargs: dict[str, Any] = {"dtype": dtype}
        if quantization is not None:
            kwargs["quantization_config"] = _bnb_config(quantization, dtype)
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        if quantization is None:
            model.to(self.options["device"])
        return model.eval()

    def rows(
        self,
        attack: str,
        variant: str,
        after: Mapping[str, Mapping[str, float]],
        base_after: Mapping[str, Mapping[str, float]] | None,
        before: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    ) -> list[RobustnessRow]:
        """Rows of every (set, metric) in ``after``, against ``before`` (default: the unattacked scores)."""
        before = before or self.before
        out = []
        for name, metrics in after.items():
            for metric, value in metrics.items():
                b_after = None if base_after is None else base_after[name][metric]
                out.append(
                    RobustnessRow(
                        attack=attack,
                        variant=variant,
                        set=name,
                        metric=metric,
                        unlearned_before=before["unlearned"][name][metric],
                        base_before=before["base"][name][metric],
                        unlearned_after=value,
                        base_after=b_after,
                    )
                )
        return out

    def base_scores(self, attack: str, variant: str, compute: Callable[[], dict]) -> dict:
        """The base model's scores under an attack: looked up in `reference` when given, else ``compute()``."""
        if self.reference is None:
            return compute()
        found = self.reference.select(attack=attack, variant=variant)
        if not found:
            raise ValueError(
                f"`reference` has no base-model result for attack {attack!r}, variant {variant!r}; it must come from "
                "evaluate_robustness with the same attacks and settings."
            )
        out: dict[str, dict[str, float]] = {}
        for row in found:
            if row.base_after is not None:
                out.setdefault(row.set, {})[row.metric] = row.base_after
        return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No loading progress bars and no warnings (bitsandbytes warns on every 8-bit matmul) inside the block."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        bnb_logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _bnb_config(mode: str, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=dtype)


def _free(*models: Any) -> None:
    for m in models:
        del m
    import gc

    gc.collect()


# --------------------------------------------------------------------------------------------------------------
# the attack registry
# --------------------------------------------------------------------------------------------------------------

Attack = Callable[[AttackContext], list[RobustnessRow]]
ROBUSTNESS_ATTACKS: dict[str, Attack] = {}
"""``{name: attack}``: every attack `evaluate_robustness` can run (see `register_attack`)."""


def register_attack(name: str, attack: Attack | None = None) -> Any:
    """Register ``attack`` under ``name`` (usable as a decorator: ``@register_attack("mine")``).

    Args:
        name: The name passed in ``attacks=``.
        attack: A function ``(AttackContext) -> list[RobustnessRow]`` that must not modify ``context.model``;
            `AttackContext.load` gives fresh copies of the unlearned and base models.

    Returns:
        ``attack`` (or the decorator).

    Raises:
        ValueError: When ``name`` is taken.
    """

    def add(fn: Attack) -> Attack:
        if name in ROBUSTNESS_ATTACKS:
            raise ValueError(f"A robustness attack named {name!r} is already registered; pick another name.")
        ROBUSTNESS_ATTACKS[name] = fn
        return fn

    return add if attack is None else add(attack)


@register_attack("quantization")
def quantization_attack(ctx: AttackContext) -> list[RobustnessRow]:
    """Reload the merged unlearned model and the base with bitsandbytes in each of ``quantization_modes``."""
    rows = []
    for mode in ctx.options["quantization_modes"]:
        model = ctx.load("unlearned", mode)
        after = ctx.score(model, ctx.sets)
        _free(model)

        def base_run(mode: str = mode) -> dict:
            base = ctx.load("base", mode)
            scores = ctx.score(base, ctx.sets)
            _free(base)
            return scores

        rows += ctx.rows("quantization", mode, after, ctx.base_scores("quantization", mode, base_run))
    return rows


def _relearn(
    model: Any, train: Items, ctx: AttackContext, measure: Callable[[Any], dict], steps: Sequence[int]
) -> dict[int, dict]:
    """Train a fresh LoRA with plain NLL on ``train`` (cycled in order, fixed seed); ``measure`` after each step
    of the schedule (cumulatively, one run). Returns ``{step: measure(model)}``."""
    from peft import LoraConfig, get_peft_model

    from ..losses import nll_loss
    from .forward import forward_logits, pad_batch

    opts = ctx.options
    torch.manual_seed(opts["seed"])
    rank = opts["relearn_rank"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts["relearn_learning_rate"], weight_decay=0.0)
    device = model_device(peft_model)
    size = opts["relearn_batch_size"]
    out: dict[int, dict] = {}
    peft_model.train()
    for step in range(1, max(steps) + 1):
        start = ((step - 1) * size) % len(train)
        chunk = [train[(start + i) % len(train)] for i in range(min(size, len(train)))]
        ids, mask, labels = pad_batch(chunk, _pad_id(ctx.tokenizer))
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None else labels
        logits = forward_logits(peft_model, ids.to(device), mask.to(device)).logits
        loss = nll_loss(logits, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in steps:
            out[step] = measure(peft_model)
            peft_model.train()
    return out


def _split_forget(ctx: AttackContext) -> tuple[Items, Items]:
    """The relearned part and the never-relearned part of the forget set (a seeded permutation)."""
    forget = ctx.sets["forget"]
    chosen = set(relearn_split(len(forget), ctx.options["relearn_fraction"], ctx.options["seed"]))
    return [f for i, f in enumerate(forget) if i in chosen], [f for i, f in enumerate(forget) if i not in chosen]


def relearn_split(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of the forget passages the relearning attack trains on: ``round(fraction * n)`` of them (at least
    one, at most ``n - 1``) from a permutation seeded with ``seed``, in increasing order.

    Examples:
        >>> relearn_split(4, 0.5, seed=0)
        [0, 1]
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(n - 1, max(1, round(fraction * n)))
    return sorted(order[:k])


@register_attack("relearning")
def relearning_attack(ctx: AttackContext) -> list[RobustnessRow]:
    """Fine-tune a fresh LoRA on part of the forget set (and on ``related`` text) and measure the rest."""
    steps = ctx.options["relearn_steps"]
    relearned, unseen = _split_forget(ctx)
    sets = {"forget_unseen": unseen, "forget_relearned": relearned}
    runs = [("", relearned, sets)]
    if ctx.related:
        runs.append(("related ", ctx.related, {"forget": ctx.sets["forget"]}))
    rows = []
    for label, train, measured in runs:
        before = {
            "unlearned": ctx.score(ctx.model, measured),
            "base": ctx.base_scores(
                "relearning", f"{label}steps=0", lambda m=measured: ctx.score(ctx.load("base"), m)
            ),
        }
        after = _relearn(ctx.load("unlearned"), train, ctx, lambda m, s=measured: ctx.score(m, s), steps)

        def base_run(train: Items = train, measured: dict = measured) -> dict[int, dict]:
            return _relearn(ctx.load("base"), train, ctx, lambda m: ctx.score(m, measured), steps)

        base_after: dict[int, dict] = {}
        if ctx.reference is None:
            base_after = base_run()
        rows += ctx.rows("relearning", f"{label}steps=0", before["unlearned"], before["base"], before)
        for step in steps:
            b = base_after.get(step) or ctx.base_scores("relearning", f"{label}steps={step}", dict)
            rows += ctx.rows("relearning", f"{label}steps={step}", after[step], b, before)
    return rows


@register_attack("export")
def export_attack(ctx: AttackContext) -> list[RobustnessRow]:
    """Reload the merged model with plain transformers, and the portable adapter with plain PEFT on the base."""
    rows = ctx.rows("export", "merged reload", ctx.score(ctx.load("unlearned"), ctx.sets), None)
    if has_peft_adapters(ctx.model) and hasattr(ctx.model, "save_pretrained"):
        from peft import PeftModel

        adapter_dir = ctx.work_dir / "portable_adapter"
        ctx.model.save_pretrained(adapter_dir)
        with _quiet():
            reloaded = PeftModel.from_pretrained(ctx.load("base"), adapter_dir).eval()
        rows += ctx.rows("export", "portable adapter", ctx.score(reloaded, ctx.sets), None)
        _free(reloaded)
    return rows


def _shifted(items: Items, offset: int, bos: int | None) -> Items:
    """Every passage started ``offset`` tokens later (its BOS kept in front)."""
    out = []
    for item in items:
        ids, labels = list(item["input_ids"]), item["labels"]
        head = 1 if bos is not None and ids and ids[0] == bos else 0
        new_ids = ids[:head] + ids[head + offset :]
        new_labels = None if labels is None else labels[:head] + labels[head + offset :]
        out.append({"input_ids": new_ids, "labels": new_labels})
    return out


def _after_prefix(items: Items, length: int) -> Items:
    """Only the tokens after the first ``length`` tokens scored (labels -100 before)."""
    out = []
    for item in items:
        ids = list(item["input_ids"])
        labels = list(item["labels"]) if item["labels"] is not None else list(ids)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * min(length, len(ids)) + labels[length:]})
    return out


def _few_shot(items: Items, shots: Items, k: int, bos: int | None) -> Items | None:
    """Each passage after ``k`` other passages of ``shots`` (cycling), only the passage scored (None: no others)."""
    out = []
    for i, item in enumerate(items):
        others = [s for s in shots if s["input_ids"] != item["input_ids"]]
        if not others:
            return None
        prefix = [t for j in range(k) for t in others[(i + j) % len(others)]["input_ids"] if t != bos]
        ids = list(item["input_ids"])
        head = 1 if bos is not None and ids and ids[0] == bos else 0
        labels = list(item["labels"]) if item["labels"] is not None else list(ids)
        new_labels = [IGNORE_INDEX] * (head + len(prefix)) + labels[head:]
        out.append({"input_ids": ids[:head] + prefix + ids[head:], "labels": new_labels})
    return out


@register_attack("prompt")
def prompt_attack(ctx: AttackContext) -> list[RobustnessRow]:
    """Score the forget set from shifted starts, after fixed prefix lengths and after a few-shot prefix."""
    bos = getattr(ctx.tokenizer, "bos_token_id", None)
    forget = ctx.sets["forget"]
    variants: list[tuple[str, Items, int | None]] = []
    for offset in ctx.options["prefix_offsets"]:
        variants.append((f"offset={offset}", _shifted(forget, offset, bos), None))
    for length in ctx.options["prefix_lengths"]:  # EL from that one prefix: a stride past every passage
        variants.append((f"prefix={length}", _after_prefix(forget, length), 10**9))
    k = ctx.options["few_shot"]
    if k > 0:
        shots = ctx.sets.get("heldout") or ctx.sets.get("retain") or forget
        prefixed = _few_shot(forget, shots, k, bos)
        if prefixed is not None:
            variants.append((f"few-shot={k}", prefixed, None))
    unlearned, base = ctx.load("unlearned"), None
    rows = []
    for name, items, stride in variants:

        def base_run(items: Items = items, stride: int | None = stride) -> dict:
            nonlocal base
            base = base if base is not None else ctx.load("base")
            return ctx.score(base, {"forget": items}, el_prefix_stride=stride)

        after = ctx.score(unlearned, {"forget": items}, el_prefix_stride=stride)
        rows += ctx.rows("prompt", name, after, ctx.base_scores("prompt", name, base_run))
    return rows


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------


def _items(name: str, data: Any, tokenizer: Any, max_length: int) -> Items:
    if isinstance(data, (str, bytes)):
        raise TypeError(f"`{name}` must be a list of texts or token-id sequences, got a single string; wrap it in [].")
    try:
        if len(data) == 0:
            raise ValueError(f"`{name}` is empty; pass at least one passage.")
    except TypeError:
        pass
    rows = list(data) if not isinstance(data, Mapping) else data
    if isinstance(rows, list) and rows and all(isinstance(r, str) for r in rows):
        rows = [{"input_ids": tokenizer(t, truncation=True, max_length=max_length)["input_ids"]} for t in rows]
    items = _normalize_data(rows)
    if not items:
        raise ValueError(f"`{name}` is empty; pass at least one passage.")
    short = [i for i, it in enumerate(items) if len(it["input_ids"]) < 2]
    if short:
        raise ValueError(f"`{name}[{short[0]}]` has fewer than 2 tokens; every passage needs at least 2.")
    return [{"input_ids": it["input_ids"][:max_length], "labels": _cut(it["labels"], max_length)} for it in items]


def _cut(labels: list[int] | None, n: int) -> list[int] | None:
    return None if labels is None else labels[:n]


def _fingerprint(sets: Mapping[str, Items], related: Items | None) -> str:
    blob = json.dumps({k: [it["input_ids"] for it in v] for k, v in {**sets, "related": related or []}.items()})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_steps(steps: Any) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in steps)
    except (TypeError, ValueError):
        values = ()
    if not values or any(s < 1 for s in values) or list(values) != sorted(set(values)):
        raise ValueError(
            f"`relearn_steps` must be increasing positive step counts such as (1, 5, 15, 50), got {steps!r}."
        )
    return values


def _check_attacks(attacks: Any) -> tuple[str, ...]:
    names = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    unknown = [a for a in names if a not in ROBUSTNESS_ATTACKS]
    if not names or unknown:
        raise ValueError(
            f"`attacks` must name registered attacks ({', '.join(ROBUSTNESS_ATTACKS)}), got {attacks!r}; "
            "add your own with register_attack()."
        )
    return names


@contextlib.contextmanager
def _scratch(work_dir: str | Path | None) -> Iterator[Path]:
    if work_dir is not None:
        path = Path(work_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="peft_unlearn_robustness_") as tmp:
        yield Path(tmp)


def _save_models(model: Any, base_model: Any, tokenizer: Any, work: Path) -> tuple[Path, Path]:
    """Write the merged unlearned model and the base to ``work`` (from deep copies: ``model`` is untouched)."""
    unlearned_dir, base_dir = work / "unlearned", work / "base"
    with _quiet():
        if has_peft_adapters(model):
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(unlearned_dir)
            _free(merged)
            if base_model is None:
                base = copy.deepcopy(model).unload()
                base.save_pretrained(base_dir)
                _free(base)
        else:
            model.save_pretrained(unlearned_dir)
        if base_model is not None:
            base_model.save_pretrained(base_dir)
    for folder in (unlearned_dir, base_dir):
        tokenizer.save_pretrained(folder)
    return unlearned_dir, base_dir


def evaluate_robustness(
    model: Any,
    tokenizer: Any,
    forget: Any,
    retain: Any = None,
    heldout: Any = None,
    attacks: str | Sequence[str] = DEFAULT_ATTACKS,
    *,
    base_model: Any = None,
    related: Any = None,
    quantization_modes: Sequence[str] = QUANTIZATION_MODES,
    relearn_steps: Sequence[int] = (1, 5, 15, 50),
    relearn_fraction: float = 0.5,
    relearn_learning_rate: float = 1e-3,
    relearn_rank: int = 8,
    relearn_batch_size: int = 4,
    prefix_offsets: Sequence[int] = (8, 16),
    prefix_lengths: Sequence[int] = (8, 16, 32),
    few_shot: int = 2,
    el_n: int = 10,
    el_prefix_stride: int = 8,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    recovery_threshold: float = 0.25,
    reference: RobustnessReport | None = None,
    work_dir: str | Path | None = None,
) -> RobustnessReport:
    """Run robustness attacks on copies of an unlearned model and of its base, and report what came back.

    The unlearned model is merged and saved, the base (``model`` with its adapters unloaded, or ``base_model``) is
    saved, and every attack works on fresh copies loaded from there: ``model`` is never modified. Each attack
    reports forget MA and EL_n (and MA of ``heldout`` and ``retain`` where given) before and after it, for the
    unlearned model and for the base under the same attack.

    Args:
        model: The unlearned model: a ``PeftModel`` (LoRA, FILA or VILA adapters; the base is the model with them
            disabled) or a plain model together with ``base_model``.
        tokenizer: Its tokenizer (saved next to the copies; pads batches; tokenizes texts).
        forget: The forgotten passages: texts, token-id lists, dicts with ``input_ids`` (+ ``labels``) or a
            tokenized ``datasets.Dataset``.
        retain: Optional passages that must be kept (MA reported; few-shot source when there is no ``heldout``).
        heldout: Optional memorized passages that were never trained on (MA reported; few-shot source).
        attacks: Names from ``ROBUSTNESS_ATTACKS`` (default ``quantization``, ``relearning``, ``export``,
            ``prompt``).
        base_model: The model before unlearning, required when ``model`` has no PEFT adapters.
        related: Optional related text to relearn from (the "public articles" attack); measured on all of ``forget``.
        quantization_modes: bitsandbytes formats among ``nf4``, ``fp4`` and ``int8``.
        relearn_steps: Increasing step counts at which the relearning LoRA is measured (one cumulative run).
        relearn_fraction: Fraction of ``forget`` relearned (at least one passage, at least one never relearned).
        relearn_learning_rate: AdamW learning rate of the relearning LoRA.
        relearn_rank: Its rank (``lora_alpha = 2 * rank``, all linear layers).
        relearn_batch_size: Passages per relearning step.
        prefix_offsets: Prompt attack: start every passage this many tokens later.
        prefix_lengths: Prompt attack: score only the tokens after a prefix of this length (EL from that prefix).
        few_shot: Prompt attack: put this many other passages in front (0 disables it).
        el_n: n of EL_n.
        el_prefix_stride: Score EL_n on every k-th prefix.
        batch_size: Sequences per forward pass.
        max_length: Truncate every passage to this many tokens.
        seed: Seed of the forget split and the relearning run.
        recovery_threshold: An attack recovers the forgotten text when it undoes more than this fraction of the
            forget-MA gap between the unlearned model and the base.
        reference: A report from an earlier call with the same base, data and settings: its base-model numbers are
            reused and the base is not attacked again (halves the cost when several unlearned models share a base).
        work_dir: Folder for the saved copies (default: a temporary folder, removed afterwards).

    Returns:
        A `RobustnessReport` (``to_markdown()``, ``to_dict()``, ``recovered()``, ``held()``).

    Raises:
        ValueError: An unknown attack, empty data, bad schedules or fractions, no base model, a ``reference`` with
            other settings.
        ImportError: ``quantization`` without bitsandbytes.
    """
    names = _check_attacks(attacks)
    if tokenizer is None:
        raise ValueError("`tokenizer` is None; pass the model's tokenizer (it is saved next to the model copies).")
    if not has_peft_adapters(model) and base_model is None:
        raise ValueError(
            "`model` has no PEFT adapters, so there is no base model to compare with; pass `base_model=` (the "
            "model before unlearning)."
        )
    steps = _check_steps(relearn_steps)
    if not 0.0 < float(relearn_fraction) < 1.0:
        raise ValueError(f"`relearn_fraction` must be in (0, 1), got {relearn_fraction!r}.")
    if not 0.0 < float(recovery_threshold) <= 1.0:
        raise ValueError(f"`recovery_threshold` must be in (0, 1], got {recovery_threshold!r}.")
    for arg, values, lowest in (("prefix_offsets", prefix_offsets, 1), ("prefix_lengths", prefix_lengths, 1)):
        if any(int(v) < lowest for v in values):
            raise ValueError(f"`{arg}` must hold positive token counts, got {tuple(values)!r}.")
    for arg, value, lowest in (
        ("few_shot", few_shot, 0),
        ("el_n", el_n, 1),
        ("el_prefix_stride", el_prefix_stride, 1),
        ("batch_size", batch_size, 1),
        ("relearn_rank", relearn_rank, 1),
        ("relearn_batch_size", relearn_batch_size, 1),
        ("max_length", max_length, 2),
    ):
        if not isinstance(value, int) or value < lowest:
            raise ValueError(f"`{arg}` must be an int >= {lowest}, got {value!r}.")
    bad_modes = [m for m in quantization_modes if m not in QUANTIZATION_MODES]
    if bad_modes or ("quantization" in names and not quantization_modes):
        raise ValueError(
            f"`quantization_modes` must be among {QUANTIZATION_MODES}, got {tuple(quantization_modes)!r}."
        )
    if "quantization" in names:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(
                "The quantization attack needs bitsandbytes (>= 0.49 runs on CPU): pip install bitsandbytes"
            )

    sets = {"forget": _items("forget", forget, tokenizer, max_length)}
    for name, data in (("heldout", heldout), ("retain", retain)):
        if data is not None:
            sets[name] = _items(name, data, tokenizer, max_length)
    related_items = _items("related", related, tokenizer, max_length) if related is not None else None
    if "relearning" in names and len(sets["forget"]) < 2:
        raise ValueError("The relearning attack needs at least 2 forget passages (one part relearned, one measured).")

    param = next(iter(model.parameters()))
    options = {
        "quantization_modes": tuple(quantization_modes),
        "relearn_steps": steps,
        "relearn_fraction": float(relearn_fraction),
        "relearn_learning_rate": float(relearn_learning_rate),
        "relearn_rank": relearn_rank,
        "relearn_batch_size": relearn_batch_size,
        "prefix_offsets": tuple(int(v) for v in prefix_offsets),
        "prefix_lengths": tuple(int(v) for v in prefix_lengths),
        "few_shot": few_shot,
        "el_n": el_n,
        "el_prefix_stride": el_prefix_stride,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
    }
    settings = {
        "attacks": list(names),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "num_examples": {k: len(v) for k, v in sets.items()},
        "relearn_split": relearn_split(len(sets["forget"]), relearn_fraction, seed) if len(sets["forget"]) > 1 else [],
        "data_fingerprint": _fingerprint(sets, related_items),
    }
    if reference is not None:
        differ = [k for k in settings if k != "attacks" and reference.settings.get(k) != settings[k]]
        missing = [a for a in names if a not in reference.settings.get("attacks", [])]
        if differ or missing:
            raise ValueError(
                f"`reference` was measured with other settings ({', '.join(differ + missing)}); its base-model numbers "
                "only apply to the same data, attacks and settings."
            )
    options.update(dtype=param.dtype, device=model_device(model))

    with _scratch(work_dir) as work:
        unlearned_dir, base_dir = _save_models(model, base_model, tokenizer, work)
        ctx = AttackContext(
            unlearned_dir, base_dir, model, tokenizer, sets, related_items, {}, options, work, reference
        )
        # before any attack: the user's model itself (adapters on, then off), so that export compares against it
        ctx.before = {"unlearned": ctx.score(model, sets)}
        if reference is not None:
            ctx.before["base"] = _reference_before(reference, sets)
        elif base_model is not None:
            ctx.before["base"] = ctx.score(base_model, sets)
        else:
            with model.disable_adapter():
                ctx.before["base"] = ctx.score(model, sets)
        rows: list[RobustnessRow] = []
        for name in names:
            rows += ROBUSTNESS_ATTACKS[name](ctx)
    notes = []
    if "quantization" in names:
        notes.append(
            "Quantization alone lowers MA on the base model as well: read the change against the unquantized "
            "unlearned model (Δ) and against the quantized base (`vs attacked base`)."
        )
    if "relearning" in names:
        notes.append(
            "Relearning: a fresh LoRA trained with plain NLL on `forget_relearned`; `forget_unseen` was never "
            "trained on, so what comes back there was hidden, not removed."
        )
    if "export" in names:
        notes.append("Export: forgetting must be identical after reloading; Δ is the change.")
    report = RobustnessReport(rows, settings, float(recovery_threshold), notes)
    return report


def _reference_before(reference: RobustnessReport, sets: Mapping[str, Items]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for row in reference.rows:
        if row.set in sets:
            out.setdefault(row.set, {})[row.metric] = row.base_before
    return out
