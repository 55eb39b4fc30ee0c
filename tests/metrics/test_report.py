"""Tests for `peft_unlearn.metrics.report`: the plain-text results table the CLI prints."""

from __future__ import annotations

import math

from peft_unlearn.metrics import format_results_table


def test_format_results_table():
    table = format_results_table(
        {"forget": {"ma": 0.5, "el10": 0.25, "nll": 1.0, "ppl": math.e, "num_examples": 4}, "retain": {"ma": 1 / 3}}
    )
    lines = table.splitlines()
    assert lines[0].split() == ["set", "n", "ma", "el10", "nll", "ppl"]
    assert lines[1].split() == ["forget", "4", "0.5000", "0.2500", "1.0000", "2.7183"]
    assert lines[2].split() == ["retain", "0.3333", "-", "-", "-"]


def test_format_results_table_large_and_non_finite_values():
    lines = format_results_table({"forget": {"ppl": 123456.0, "el10": math.nan}}).splitlines()
    assert lines[1].split() == ["forget", "1.235e+05", "nan"]
    # the columns are aligned: every line is as wide as the header once trailing spaces go
    assert len(lines[0]) == len(lines[1])
