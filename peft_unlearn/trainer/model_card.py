"""Model card (README.md) text for adapters trained with [`UnlearningTrainer`][peft_unlearn.UnlearningTrainer].

Examples:
    >>> card = build_model_card(base_model="google/gemma-3-270m", forget_loss="inverted_hinge", retain_loss="nll")
    >>> card.startswith("---") and "peft-unlearn" in card
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..fila.registry import FILA_INIT_NAME, get_init
from ..losses import get_loss

__all__ = ["PAPER_CITATION", "build_model_card", "robustness_section"]

PAPER_CITATION = """@inproceedings{cha2025towards,
  title     = {Towards Robust and Parameter-Efficient Knowledge Unlearning for {LLMs}},
  author    = {Cha, Sungmin and Cho, Sungjun and Hwang, Dasol and Lee, Moontae},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2408.06621}
}"""


def _describe(role: str, name: str) -> str:
    try:
        return get_loss(role, name).description
    except ValueError:
        return name


def _yaml_list(key: str, values: Sequence[str]) -> list[str]:
    if not values:
        return []
    return [f"{key}:"] + [f"- {v}" for v in values]


def _table(rows: Mapping[str, Any]) -> list[str]:
    lines = ["| Parameter | Value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in rows.items() if v is not None]
    return lines


def _pct(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) else "–"


def robustness_section(report: Mapping[str, Any]) -> list[str]:
    """Markdown lines of a model card's "Robustness of the forgetting" section from a ``RobustnessReport.to_dict()``.

    One row per attack and variant with the forget MA (the never-relearned part for relearning) of the unlearned
    model before and after it, the base model's under the same attack, the fraction of the forgetting gap that
    came back and whether the forgetting held (at most the report's ``recovery_threshold`` came back).

    Args:
        report: The ``to_dict()`` of a `RobustnessReport`.

    Returns:
        The lines (a heading, a sentence, a table and the report's notes).

    Examples:
        >>> row = {"attack": "quantization", "variant": "nf4", "set": "forget", "metric": "ma", "unlearned_before": 0.2,
        ...        "base_before": 0.9, "unlearned_after": 0.3, "base_after": 0.7, "gap_recovery": 0.14}
        >>> lines = robustness_section({"rows": [row], "recovery_threshold": 0.25, "notes": []})
        >>> lines[-1]
        '| quantization | nf4 | 0.200 | 0.300 | 0.700 | 14% | yes |'
    """
    threshold = float(report.get("recovery_threshold", 0.25))
    lines = [
        "## Robustness of the forgetting",
        "",
        "Attacks run on copies of this model with `peft_unlearn.metrics.evaluate_robustness`, next to the same attack "
        f"on the base model. *Held*: at most {threshold:.0%} of the forget-MA gap between this model and the base came "
        "back.",
        "",
        "| attack | variant | forget MA | after attack | base after attack | gap recovered | held |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report.get("rows", []):
        if row["metric"] != "ma" or row["set"] not in ("forget", "forget_unseen") or row["variant"].endswith("=0"):
            continue
        recovery = row.get("gap_recovery")
        held = "–" if recovery is None else ("yes" if recovery <= threshold else "**no**")
        base_after = row.get("base_after")
        lines.append(
            f"| {row['attack']} | {row['variant']} | {row['unlearned_before']:.3f} | {row['unlearned_after']:.3f} "
            f"| {'–' if base_after is None else f'{base_after:.3f}'} | {_pct(recovery)} | {held} |"
        )
    notes = list(report.get("notes", []))
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def build_model_card(
    *,
    base_model: str | None = None,
    model_name: str | None = None,
    hub_model_id: str | None = None,
    forget_loss: str = "inverted_hinge",
    retain_loss: str | None = "nll",
    forget_weight: float = 1.0,
    retain_weight: float = 1.0,
    beta: float | None = None,
    datasets: Mapping[str, int] | None = None,
    dataset_name: str | Sequence[str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    adapter: Mapping[str, Any] | None = None,
    fila: bool = False,
    init: str | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Sequence[str] = (),
    library_name: str | None = "peft",
    robustness: Mapping[str, Any] | None = None,
) -> str:
    """Render a model card (YAML front matter + markdown) for an unlearned model or adapter.

    Args:
        base_model: Hub id of the base model (omitted from the metadata when None or a local path).
        model_name: Name shown as the title.
        hub_model_id: Hub repository of the card, used in the usage snippet.
        forget_loss: Forget loss name.
        retain_loss: Retain loss name or None.
        forget_weight: Weight of the forget loss.
        retain_weight: Weight of the retain loss.
        beta: NPO/SimNPO beta, if used.
        datasets: Dataset role -> number of examples (e.g. ``{"forget": 40, "retain": 400}``).
        dataset_name: Hub dataset id(s) for the metadata.
        hyperparameters: Training hyper-parameters to list.
        adapter: PEFT adapter settings to list (rank, alpha, target modules...).
        fila: Deprecated spelling of ``init="fila"``.
        init: The adapter's data-driven init (a name of `peft_unlearn.fila.registry`, e.g. ``"vila"``), or None:
            adds its tag and a line saying how the adapter was initialised.
        metrics: Final metrics to report (e.g. ``{"train_loss": 2.1, "eval_forget_ma": 0.12}``); omitted when empty.
        tags: Extra tags; ``peft-unlearn``, ``unlearning`` (and ``peft``, ``lora``, the init's name) are added.
        library_name: Metadata ``library_name`` (``"peft"`` for adapters, ``"transformers"`` otherwise).
        robustness: A ``RobustnessReport.to_dict()`` (e.g. from `RobustnessCallback`): adds a "Robustness of the
            forgetting" section with what was tried and what held.

    Returns:
        The card text.

    Examples:
        >>> "inverted" in build_model_card(forget_loss="inverted_hinge").lower()
        True
    """
    all_tags = list(dict.fromkeys([*tags, "unlearning", "peft-unlearn"]))
    if library_name == "peft":
        all_tags = list(dict.fromkeys(["peft", "lora", *all_tags]))
    entry = get_init(init) if init is not None else get_init(FILA_INIT_NAME) if fila else None
    if entry is not None:
        all_tags.append(entry.name)
    meta = ["---"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    if library_name:
        meta.append(f"library_name: {library_name}")
    if dataset_name:
        names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name)
        meta += _yaml_list("datasets", names)
    meta += _yaml_list("tags", all_tags)
    meta.append("---")

    title = model_name or hub_model_id or "Unlearned model"
    forget_desc = _describe("forget", forget_loss)
    retain_desc = _describe("retain", retain_loss) if retain_loss else "none"
    body = [
        f"# {title}",
        "",
        (
            f"This {'adapter' if library_name == 'peft' else 'model'} was produced by knowledge unlearning"
            + (f" of [{base_model}](https://huggingface.co/{base_model})" if base_model else "")
            + " with [peft_unlearn](https://arxiv.org/abs/2408.06621)'s `UnlearningTrainer`."
        ),
        "",
        "## Objective",
        "",
        f"- Forget loss: {forget_desc} (`{forget_loss}`), weight {forget_weight}",
        f"- Retain loss: {retain_desc}" + (f" (`{retain_loss}`), weight {retain_weight}" if retain_loss else ""),
    ]
    if beta is not None:
        body.append(f"- beta: {beta}")
    if entry is not None:
        body.append(
            f"- LoRA initialisation: {entry.name.upper()} ({entry.summary}, {entry.paper}; from the forget/retain "
            "data); the published adapter is the equivalent plain LoRA on the original base model"
        )
    if datasets:
        body += ["", "## Data", ""] + [f"- {role}: {n} examples" for role, n in datasets.items()]
    if metrics:
        body += ["", "## Results", "", "| Metric | Value |", "|---|---|"]
        body += [f"| `{k}` | {v:.4g} |" for k, v in metrics.items() if v is not None]
    if robustness:
        body += ["", *robustness_section(robustness)]
    if adapter:
        body += ["", "## Adapter", "", *_table(adapter)]
    if hyperparameters:
        body += ["", "## Training hyper-parameters", "", *_table(hyperparameters)]
    if library_name == "peft":
        repo = hub_model_id or "path/to/this/adapter"
        body += [
            "",
            "## Usage",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")',
            "```",
        ]
    body += ["", "## Citation", "", "```bibtex", PAPER_CITATION, "```", ""]
    return "\n".join(meta + body)
