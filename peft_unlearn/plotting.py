"""Optional matplotlib figures: forget/retain trade-off curves, method comparisons and relearning curves.

matplotlib is an optional dependency (``pip install peft-unlearn[plot]``) imported only when a function is
called. Figures are built with the object-oriented API on an Agg canvas (no pyplot, no global backend change,
works headless); each function returns the ``matplotlib.figure.Figure`` and optionally saves it.

Examples:
    >>> from peft_unlearn.plotting import plot_tradeoff
    >>> history = [{"step": 0, "forget_ma": 0.9, "retain_ma": 0.8}, {"step": 10, "forget_ma": 0.3, "retain_ma": 0.7}]
    >>> fig = plot_tradeoff(history)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_method_comparison", "plot_relearning", "plot_tradeoff", "relearning_curves"]


def _new_figure(figsize: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "peft_unlearn.plotting needs matplotlib, which is not installed. Install it with "
            "`pip install peft-unlearn[plot]` (or `pip install matplotlib`)."
        ) from err
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike | None, dpi: int) -> None:
    if path is not None:
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")


def _series(history: Sequence[Mapping[str, Any]], key: str, step_key: str) -> tuple[str, list[float], list[float]]:
    """(key actually used, steps, values) for ``key`` or ``eval_{key}``; the last value per step wins."""
    for candidate in (key, f"eval_{key}"):
        points: dict[float, float] = {}
        for i, entry in enumerate(history):
            if candidate in entry and entry[candidate] is not None:
                step = entry.get(step_key, i)
                points[float(step)] = float(entry[candidate])
        if points:
            steps = sorted(points)
            return candidate, steps, [points[s] for s in steps]
    available = sorted({k for entry in history for k in entry})
    raise ValueError(f"No entry of `history` has the key {key!r} (or 'eval_{key}'). Available keys: {available}.")


def plot_tradeoff(
    history: Sequence[Mapping[str, Any]],
    forget_key: str = "forget_ma",
    retain_key: str = "retain_ma",
    *,
    kind: str = "steps",
    step_key: str = "step",
    title: str | None = None,
    path: str | os.PathLike | None = None,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 120,
) -> Figure:
    """Plot the forget metric against the retain metric over training.

    Args:
        history: A list of dicts, e.g. ``trainer.state.log_history``. Keys are looked up as given, then with
            an ``eval_`` prefix (so ``forget_ma`` finds ``eval_forget_ma`` from ``trainer.evaluate``). Entries
            without the key are ignored; the x value is ``entry[step_key]`` (the list index if missing).
        forget_key: Metric on the forget set (lower = more forgotten).
        retain_key: Metric on the retain set (higher = better kept).
        kind: ``"steps"``: both metrics against the step; ``"scatter"``: forget (x) vs retain (y) at the steps
            where both were logged, joined in step order and annotated with the step.
        step_key: Key holding the step (``"step"`` in Trainer logs).
        title: Optional title.
        path: Save the figure there (format from the extension) when given.
        figsize: Figure size in inches.
        dpi: Resolution when saving.

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> hist = [{"step": 0, "eval_forget_ma": 0.9, "eval_retain_ma": 0.8}]
        >>> plot_tradeoff(hist, path="tradeoff.png")  # doctest: +SKIP
    """
    if kind not in ("steps", "scatter"):
        raise ValueError(f"`kind` must be 'steps' or 'scatter', got {kind!r}.")
    if isinstance(history, Mapping) or not isinstance(history, Sequence):
        raise TypeError(f"`history` must be a list of dicts (e.g. trainer.state.log_history), got {type(history)}.")
    f_name, f_steps, f_vals = _series(history, forget_key, step_key)
    r_name, r_steps, r_vals = _series(history, retain_key, step_key)
    fig = _new_figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    if kind == "steps":
        ax.plot(f_steps, f_vals, marker="o", label=f_name, color="tab:red")
        ax.plot(r_steps, r_vals, marker="s", label=r_name, color="tab:blue")
        ax.set_xlabel(step_key)
        ax.set_ylabel("value")
        ax.legend()
    else:
        retain_at = dict(zip(r_steps, r_vals))
        pairs = [(s, v, retain_at[s]) for s, v in zip(f_steps, f_vals) if s in retain_at]
        if not pairs:
            raise ValueError(
                f"{f_name!r} and {r_name!r} were never logged at the same step; use kind='steps' or log both "
                "in the same evaluation."
            )
        xs, ys = [p[1] for p in pairs], [p[2] for p in pairs]
        ax.plot(xs, ys, linestyle="-", marker="o", color="tab:purple")
        for s, x, y in pairs:
            ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{f_name} (lower = more forgotten)")
        ax.set_ylabel(f"{r_name} (higher = better retained)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    _save(fig, path, dpi)
    return fig


def _mean_std(value: Any, method: str, metric: str) -> tuple[float, float]:
    if value is None:
        return math.nan, 0.0
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"results[{method!r}][{metric!r}] must be a number or a (mean, std) pair, got {value!r}.")
        return float(value[0]), float(value[1])
    return float(value), 0.0


def plot_method_comparison(
    results: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ylabel: str = "value",
    path: str | os.PathLike | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 120,
) -> Figure:
    """Grouped bar chart: one group per metric, one bar per method, error bars for ``(mean, std)`` values.

    Args:
        results: ``{method: {metric: value or (mean, std)}}``. A metric missing for a method leaves a gap.
        metrics: Metrics to show, in order (default: every metric found, in first-seen order).
        title: Optional title.
        ylabel: y-axis label.
        path: Save the figure there when given.
        figsize: Figure size (default grows with the number of metrics).
        dpi: Resolution when saving.

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> res = {"GA": {"forget_ma": (0.2, 0.05)}, "IHL": {"forget_ma": 0.1}}
        >>> plot_method_comparison(res, ["forget_ma"], path="methods.png")  # doctest: +SKIP
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("`results` must be a non-empty dict {method: {metric: value or (mean, std)}}.")
    if metrics is None:
        metrics = list(dict.fromkeys(m for per_method in results.values() for m in per_method))
    metrics = list(metrics)
    if not metrics:
        raise ValueError("No metric to plot: `metrics` is empty and `results` has no metric names.")
    known = {m for per_method in results.values() for m in per_method}
    missing = [m for m in metrics if m not in known]
    if missing:
        raise ValueError(f"Metrics {missing} appear in no method of `results` (known metrics: {sorted(known)}).")
    methods = list(results)
    fig = _new_figure(figsize or (max(4.0, 1.2 * len(metrics) * max(1, len(methods)) / 2 + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        stats = [_mean_std(results[method].get(metric), method, metric) for metric in metrics]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(metrics))]
        ax.bar(
            xs,
            [s[0] for s in stats],
            width=width,
            yerr=[s[1] for s in stats],
            capsize=3,
            label=method,
        )
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    _save(fig, path, dpi)
    return fig


def relearning_curves(report: Any, set_name: str = "forget_unseen", metric: str = "ma") -> dict[str, list[float]]:
    """The relearning attack of a `RobustnessReport` as curves: steps and the unlearned / base values.

    Args:
        report: A [`RobustnessReport`][peft_unlearn.metrics.RobustnessReport] with the ``relearning`` attack.
        set_name: ``forget_unseen`` (the part never relearned) or ``forget_relearned``.
        metric: ``ma`` or ``el{n}``.

    Returns:
        ``{"steps": [0, 1, ...], "unlearned": [...], "base": [...]}`` (step 0: before relearning).

    Raises:
        ValueError: When the report has no relearning rows for ``set_name`` / ``metric``.
    """
    rows = [
        r
        for r in report.select(attack="relearning", set=set_name, metric=metric)
        if r.variant.startswith("steps=")  # not the related-text run
    ]
    if not rows:
        raise ValueError(
            f"The report has no relearning result for set {set_name!r}, metric {metric!r}; run evaluate_robustness "
            "with the 'relearning' attack."
        )
    rows.sort(key=lambda r: int(r.variant.split("=", 1)[1]))
    return {
        "steps": [int(r.variant.split("=", 1)[1]) for r in rows],
        "unlearned": [r.unlearned_after for r in rows],
        "base": [r.base_after if r.base_after is not None else math.nan for r in rows],
    }


def plot_relearning(
    reports: Any,
    *,
    set_name: str = "forget_unseen",
    metric: str = "ma",
    title: str | None = None,
    path: str | os.PathLike | None = None,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 120,
) -> Figure:
    """Forget MA vs relearning steps, for the unlearned model(s) and the base model under the same attack.

    Args:
        reports: One [`RobustnessReport`][peft_unlearn.metrics.RobustnessReport], or ``{label: report or
            [reports]}``; several reports under one label (seeds) are averaged, with their spread as error bars.
        set_name: ``forget_unseen`` (never relearned, the default) or ``forget_relearned``.
        metric: ``ma`` or ``el{n}``.
        title: Optional title.
        path: Save the figure there when given.
        figsize: Figure size.
        dpi: Resolution when saving.

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> plot_relearning({"IHL + LoRA": report}, path="relearning.png")  # doctest: +SKIP
    """
    groups = reports if isinstance(reports, Mapping) else {"unlearned": reports}
    if not groups:
        raise ValueError("`reports` is empty; pass a RobustnessReport or {label: report or [reports]}.")
    fig = _new_figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    base_curve = None
    for label, value in groups.items():
        curves = [relearning_curves(r, set_name, metric) for r in (value if isinstance(value, Sequence) else [value])]
        steps = curves[0]["steps"]
        columns = list(zip(*(c["unlearned"] for c in curves)))
        means = [sum(col) / len(col) for col in columns]
        spread = [math.sqrt(sum((v - m) ** 2 for v in col) / max(1, len(col) - 1)) for col, m in zip(columns, means)]
        xs = [max(s, 0.5) for s in steps]  # log axis: step 0 drawn at 0.5
        ax.errorbar(xs, means, yerr=spread, marker="o", capsize=3, label=f"{label} ({len(curves)} run(s))")
        base_curve = base_curve or (xs, curves[0]["base"])
    if base_curve is not None:
        ax.plot(*base_curve, "k--", marker="s", label="base model, same attack")
    ax.set_xscale("log")
    ax.set_xlabel("relearning steps (fresh LoRA, plain NLL; step 0 at 0.5)")
    ax.set_ylabel(f"{metric} on {set_name}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path, dpi)
    return fig
