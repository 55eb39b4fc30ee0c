"""Tests for peft_unlearn.plotting (matplotlib figures, optional dependency)."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("matplotlib")

from peft_unlearn.plotting import plot_method_comparison, plot_tradeoff  # noqa: E402

HISTORY = [
    {"loss": 1.0, "step": 1},
    {"eval_forget_ma": 0.9, "eval_retain_ma": 0.8, "step": 2},
    {"loss": 0.7, "step": 3},
    {"eval_forget_ma": 0.5, "step": 4},
    {"eval_retain_ma": 0.7, "step": 4},
    {"eval_forget_ma": 0.2, "eval_retain_ma": 0.6, "step": 6},
]


def test_plot_tradeoff_steps_from_log_history(tmp_path):
    path = tmp_path / "sub" / "tradeoff.png"
    fig = plot_tradeoff(HISTORY, path=path, title="IHL")
    assert path.exists() and path.stat().st_size > 0
    lines = fig.axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[2, 4, 6], [2, 4, 6]]
    assert list(lines[0].get_ydata()) == [0.9, 0.5, 0.2]
    assert list(lines[1].get_ydata()) == [0.8, 0.7, 0.6]
    assert fig.axes[0].get_title() == "IHL"


def test_plot_tradeoff_scatter_joins_on_step(tmp_path):
    history = [
        {"forget_ma": 0.9, "retain_ma": 0.8, "step": 0},
        {"forget_ma": 0.4, "step": 5},  # no retain value at step 5: skipped
        {"forget_ma": 0.1, "retain_ma": 0.5, "step": 10},
    ]
    path = tmp_path / "scatter.pdf"
    fig = plot_tradeoff(history, kind="scatter", path=path)
    assert path.exists()
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [0.9, 0.1]
    assert list(line.get_ydata()) == [0.8, 0.5]


def test_plot_tradeoff_errors():
    with pytest.raises(ValueError, match="forget_el10"):
        plot_tradeoff(HISTORY, forget_key="forget_el10")
    with pytest.raises(ValueError, match="kind"):
        plot_tradeoff(HISTORY, kind="bars")
    with pytest.raises(TypeError, match="history"):
        plot_tradeoff({"forget_ma": 1.0})
    with pytest.raises(ValueError, match="same step"):
        plot_tradeoff([{"forget_ma": 1.0, "step": 1}, {"retain_ma": 1.0, "step": 2}], kind="scatter")


def test_plot_method_comparison_bars_and_error_bars(tmp_path):
    results = {
        "GA": {"forget_ma": (0.3, 0.05), "retain_ma": (0.5, 0.1)},
        "IHL": {"forget_ma": 0.1, "retain_ma": 0.7},
        "IHL+FILA": {"forget_ma": (0.05, 0.01)},  # retain_ma missing: a gap
    }
    path = tmp_path / "methods.png"
    fig = plot_method_comparison(results, ["forget_ma", "retain_ma"], path=path, title="TDEC")
    assert path.exists() and path.stat().st_size > 0
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 6
    assert heights[:5] == pytest.approx([0.3, 0.5, 0.1, 0.7, 0.05])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["forget_ma", "retain_ma"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["GA", "IHL", "IHL+FILA"]
    # default metric list: first-seen order
    fig = plot_method_comparison(results)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["forget_ma", "retain_ma"]


def test_plot_method_comparison_errors():
    with pytest.raises(ValueError, match="non-empty"):
        plot_method_comparison({})
    with pytest.raises(ValueError, match="appear in no method"):
        plot_method_comparison({"GA": {"forget_ma": 0.1}}, ["ppl"])
    with pytest.raises(ValueError, match="mean, std"):
        plot_method_comparison({"GA": {"forget_ma": (0.1, 0.2, 0.3)}})


def test_missing_matplotlib_gives_install_hint(monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install peft-unlearn\[plot\]"):
        plot_tradeoff(HISTORY)


def _relearning_report(after):
    from peft_unlearn.metrics import RobustnessReport, RobustnessRow

    rows = [
        RobustnessRow("relearning", f"steps={k}", "forget_unseen", "ma", 0.2, 0.9, value, 0.9)
        for k, value in zip((0, 1, 5), after)
    ]
    rows.append(RobustnessRow("relearning", "related steps=5", "forget", "ma", 0.2, 0.9, 0.8, 0.9))
    return RobustnessReport(rows, settings={})


def test_relearning_curves_and_plot(tmp_path):
    from peft_unlearn.plotting import plot_relearning, relearning_curves

    curves = relearning_curves(_relearning_report([0.2, 0.3, 0.5]))
    assert curves == {"steps": [0, 1, 5], "unlearned": [0.2, 0.3, 0.5], "base": [0.9, 0.9, 0.9]}
    path = tmp_path / "relearn.png"
    fig = plot_relearning({"a": [_relearning_report([0.2, 0.3, 0.5]), _relearning_report([0.2, 0.5, 0.7])]}, path=path)
    (line,) = [c for c in fig.axes[0].containers]  # one errorbar container: the mean over the two reports
    assert list(line.lines[0].get_ydata()) == pytest.approx([0.2, 0.4, 0.6])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no relearning result"):
        relearning_curves(_relearning_report([0.2, 0.3, 0.5]), set_name="forget_relearned")
