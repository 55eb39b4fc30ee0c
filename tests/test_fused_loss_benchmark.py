"""The CPU side of ``benchmarks/fused_loss_memory.py`` and its CUDA case in ``benchmarks/gpu_check.py``: sizes, the
linear fit and extrapolation of cases that do not fit, the projection formula and the goal lines (no heavy run)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def flm(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as for `python benchmarks/<name>.py`
    return importlib.import_module("fused_loss_memory")


def test_parse_size(flm):
    assert flm.parse_size("8x512") == (8, 512)
    for bad in ("8", "8x", "ax2", "0x5", "8x1"):
        with pytest.raises(ValueError, match="size"):
            flm.parse_size(bad)


def _run(peak_gib: float, seconds: float) -> dict:
    return {"fits": True, "steps": [{"peak_bytes": peak_gib * 2**30, "seconds": seconds, "loss": 1.0}] * 2}


def test_analysis_extrapolates_what_does_not_fit_and_checks_the_goal(flm):
    # unfused: 4 GiB per 1024 tokens, measured at 1024 and 2048 tokens, beyond the cap at 4096 and 16384
    runs = {
        "8x128/unfused": _run(4.0, 10.0),
        "8x256/unfused": _run(8.0, 20.0),
        "8x512/unfused": {"fits": False, "limit": "RLIMIT_AS 14 GiB", "steps": []},
        "8x2048/unfused": {"fits": False, "limit": "RLIMIT_AS 14 GiB", "steps": []},
        "8x128/fused": _run(0.3, 10.0),
        "8x256/fused": _run(0.4, 20.0),
        "8x512/fused": _run(0.8, 41.0),
        "8x2048/fused": _run(1.8, 160.0),
    }
    analysis = flm.analyse({"runs": runs})
    rows = {r["size"]: r for r in analysis["table"]}
    assert rows["8x512"]["unfused"]["status"] == "does not fit"
    assert rows["8x512"]["unfused"]["extrapolated_peak"] == pytest.approx(16 * 2**30)
    assert rows["8x2048"]["unfused"]["extrapolated_peak"] == pytest.approx(64 * 2**30)
    assert rows["8x512"]["unfused"]["extrapolated_seconds"] == pytest.approx(40.0)
    assert analysis["unfused_bytes_per_logit"] == pytest.approx(4 * 2**30 / 1024 / flm.VOCAB)
    lines = "\n".join(flm.goals(analysis, 14))
    assert "0.050x: met" in lines  # 0.8 / 16
    assert "1.02x: met" in lines  # 41 / 40
    assert "8 x 2048" in lines and "**met**" in lines


def test_projection_formula_by_hand(flm):
    shape = flm.PROJECTED_MODELS["Llama-3-8B"]
    tokens, per_logit = 4096, 12.0
    p = flm.projection(shape, tokens, per_logit)
    d, i, v, layers = 4096, 14336, 128_256, 32
    lora = 8 * layers * ((d + 4096) + 2 * (d + 1024) + (4096 + d) + 2 * (d + i) + (i + d))
    base = 2 * 8.03e9 + 16 * lora + 2 * layers * tokens * d + 2 * tokens * (12 * d + 3 * i)
    assert p["base"] == pytest.approx(base)
    assert p["unfused"] == pytest.approx(base + 12.0 * tokens * v)
    assert p["fused"] == pytest.approx(base + 16 * ((1 << 24) // v) * v + 24 * tokens * d)
    assert p["fused"] < p["unfused"]


def test_cli_refuses_a_cap_above_14_gib(flm, capsys):
    with pytest.raises(SystemExit):
        flm.main(["--cap-gib", "20", "--sizes", "1x8"])
    assert "--cap-gib" in capsys.readouterr().err


def test_gpu_check_has_the_fused_case(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gpu_check = importlib.import_module("gpu_check")
    assert "fused_loss_memory" in gpu_check.CHECKS
