"""The helpers the benchmark scripts share (``benchmarks/common.py``): results files, child runs, commands."""

import importlib
import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as for `python benchmarks/<name>.py`
    return importlib.import_module("common")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["init_frontier", "gemma3_unlearning"])
def test_resumable_benchmarks_save_through_the_shared_module(common, name):
    script = _script(name)
    assert script.common is common  # so their results files get the locked merge tested below
    assert "common.save_results(" in (BENCHMARKS / f"{name}.py").read_text()


def test_save_results_keeps_runs_written_by_another_runner(common, tmp_path):
    path = tmp_path / "frontier.json"
    runner_a = {"runs": {}, "failures": {}, "commands": ["python a"]}
    runner_b = {"runs": {}, "failures": {}, "commands": ["python b"]}
    common.save_results(path, runner_a)
    common.save_results(path, runner_b)

    runner_a["runs"]["lora|lr0.001|s0"] = {"result": {"steps": 4}}
    runner_a["failures"]["vila|lr0.001|s0"] = {"count": 1, "error": "boom"}
    common.save_results(path, runner_a)
    runner_b["runs"]["fila|lr0.001|s1"] = {"result": {"steps": 5}}
    runner_b["runs"]["vila|lr0.001|s0"] = {"result": {"steps": 1}}  # a retry elsewhere succeeded
    common.save_results(path, runner_b)

    on_disk = json.loads(path.read_text())
    assert set(on_disk["runs"]) == {"lora|lr0.001|s0", "fila|lr0.001|s1", "vila|lr0.001|s0"}
    assert on_disk["failures"] == {}
    assert on_disk["commands"] == ["python a", "python b"]
    assert runner_b["runs"] == on_disk["runs"]  # the in-memory copy is updated to the merged state
    assert not list(tmp_path.glob("*.tmp"))


def test_save_results_without_failures_adds_none_and_a_redone_run_replaces_the_old(common, tmp_path):
    path = tmp_path / "gemma3.json"
    common.save_results(path, {"runs": {"a": {"result": {"error": "oom"}}}, "commands": ["python x"]})
    mine = {"runs": {"a": {"result": {"steps": 3}}}, "commands": ["python x", "python y"], "baseline": {"ma": 1}}
    common.save_results(path, mine)

    on_disk = json.loads(path.read_text())
    assert "failures" not in on_disk
    assert on_disk["runs"] == {"a": {"result": {"steps": 3}}}
    assert on_disk["commands"] == ["python x", "python y"]
    assert on_disk["baseline"] == {"ma": 1}


def _child_script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bench.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import argparse, sys, time
            sys.path.insert(0, {str(BENCHMARKS)!r})
            from common import add_child_arguments, run_as_child

            def measure(spec):
            {textwrap.indent(textwrap.dedent(body), "    ")}

            parser = argparse.ArgumentParser()
            add_child_arguments(parser)
            run_as_child(parser.parse_args(), measure)
            """
        )
    )
    return path


def test_run_child_returns_the_result_with_its_wall_time(common, tmp_path):
    script = _child_script(tmp_path, "return {'twice': 2 * spec['x'], 'has_dir': bool(spec['output_dir'])}")
    result = common.run_child(script, {"x": 21}, timeout=60, env=common.child_env(1), wall_key="child_s")
    assert result["twice"] == 42 and result["has_dir"]
    assert result["child_s"] > 0


def test_run_child_reports_a_failing_or_hanging_child_without_raising(common, tmp_path):
    failing = common.run_child(_child_script(tmp_path, "raise ValueError('bad spec')"), {}, timeout=60)
    assert "ValueError: bad spec" in failing["error"] and failing["returncode"] == 1
    hanging = common.run_child(_child_script(tmp_path, "time.sleep(30)"), {}, timeout=1)
    assert hanging["error"] == "timeout after 1 s"


def test_command_line_is_relative_to_the_checkout_and_shell_quoted(common):
    script = BENCHMARKS / "fila_memory.py"
    line = common.command_line(script, ["--note", "load 7-9 (shared)"], OMP_NUM_THREADS="1")
    assert line == "OMP_NUM_THREADS=1 python benchmarks/fila_memory.py --note 'load 7-9 (shared)'"
    assert common.command_line(script, []) == "python benchmarks/fila_memory.py"


def test_fmt_is_mean_and_sample_std(common):
    assert common.mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(2.6457513))
    assert common.fmt([1.0, 2.0, 6.0], 1) == "3.0 ± 2.6"
    assert common.fmt([], 1) == "–"


def test_frontier_equal_speed_groups_sound_runs_by_their_step(common):
    frontier = _script("init_frontier")

    def run(init, lr, seed, steps, forgotten, held, ppl):
        spec = {"init": init, "lr": lr, "seed": seed, "max_steps": 10}
        metrics = {"mheldout": {"ma": held}, "neverseen": {"ppl": ppl}}
        return {"spec": spec, "result": {"steps": steps, "forgotten": forgotten, "metrics": metrics}}

    runs = [
        run("lora", 1e-3, 0, 4, True, 0.40, 60.0),
        run("lora", 3e-3, 0, 4, True, 0.30, 65.0),  # another rate, same speed: averaged
        run("lora", 1e-4, 0, 10, False, 0.70, 60.0),  # not forgotten: left out
        run("fila-paper", 1e-3, 0, 1, True, 0.10, 1000.0),  # destroyed (PPL > 1.1 x 60): left out
        run("fila-stable", 1e-3, 0, 2, True, 0.35, 66.0),
    ]
    results = {
        "settings": {"max_steps": 10},
        "baseline": {"neverseen": {"ppl": 60.0}},
        "runs": {str(i): r for i, r in enumerate(runs)},
    }
    table = frontier.equal_speed(results)
    assert table.keys() == {2, 4}
    assert table[4] == {"lora": [0.40, 0.30]} and table[2] == {"fila-stable": [0.35]}


def test_frontier_results_file_per_loss_and_device():
    frontier = _script("init_frontier")
    assert frontier.default_results_path() == frontier.DEFAULT_RESULTS
    assert frontier.default_results_path("gradient_ascent").name == "init_frontier_gradient_ascent.json"
    assert frontier.default_results_path(device="cuda:0").name == "init_frontier_cuda0.json"
    assert frontier.default_results_path("npo", "cuda").name == "init_frontier_npo_cuda.json"
    # titles name the loss of the file; files written before the setting existed are IHL
    assert frontier._loss_label({"settings": {"loss": "gradient ascent + retain NLL (weights 1)"}}) == (
        "gradient ascent + retain NLL"
    )
    assert frontier._loss_label({}) == "IHL + retain NLL"
