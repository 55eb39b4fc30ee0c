"""Reports of metric results, e.g. what `evaluate_memorization` returns for several sets: an aligned text table
and a strict JSON file.

Examples:
    >>> print(format_results_table({"forget": {"ma": 0.5}}))
    set         ma
    forget  0.5000
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["format_results_table", "write_results_json"]


def format_results_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Format `{set: {metric: value}}` as an aligned text table, one row per set.

    A `num_examples` entry becomes an `n` column after the set name; a missing metric shows as `-`, values of
    1000 or more and non-finite values in `%.4g`, the others with four decimals.

    Args:
        results: Per-set metrics, e.g. `{"forget": {"ma": 0.9, "el10": 0.5, "nll": 0.3, "ppl": 1.35}}`.

    Returns:
        The table: a header line, then one line per set.

    Examples:
        >>> print(format_results_table({"forget": {"ma": 0.5, "nll": 1.0}, "retain": {"ma": 0.75}}))
        set         ma     nll
        forget  0.5000  1.0000
        retain  0.7500       -
    """
    metrics = list(dict.fromkeys(key for scores in results.values() for key in scores if key != "num_examples"))
    show_n = any("num_examples" in scores for scores in results.values())
    rows = [["set", *(["n"] if show_n else []), *metrics]]
    for name, scores in results.items():
        rows.append([name, *([str(scores.get("num_examples", ""))] if show_n else [])])
        rows[-1] += [_format_number(scores.get(key)) for key in metrics]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [[row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])] for row in rows]
    return "\n".join("  ".join(cells).rstrip() for cells in lines)


def _format_number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1000 else f"{value:.4g}"


def write_results_json(
    path: str | os.PathLike[str], results: Mapping[str, Mapping[str, float]], **metadata: Any
) -> Path:
    """Write `{**metadata, "results": results}` to `path` as strict JSON (non-finite values become `null`).

    Args:
        path: The JSON file; `~` is expanded and missing parent folders are created.
        results: Per-set metrics, e.g. `{"forget": {"ma": 0.9, "el10": nan}}`.
        **metadata: Entries written before `results`, e.g. `model="gemma3-270m"` or a `settings` dict.

    Returns:
        The path written.

    Examples:
        >>> import tempfile
        >>> out = write_results_json(Path(tempfile.mkdtemp()) / "r.json", {"forget": {"el10": math.nan}}, model="m")
        >>> json.loads(out.read_text())
        {'model': 'm', 'results': {'forget': {'el10': None}}}
    """
    finite = {name: {k: (v if math.isfinite(v) else None) for k, v in sc.items()} for name, sc in results.items()}
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**metadata, "results": finite}, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out
