"""The frontier benchmark's results file can be shared by several runners without losing runs."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _frontier_module():
    spec = importlib.util.spec_from_file_location("init_frontier", ROOT / "benchmarks" / "init_frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_save_results_keeps_runs_written_by_another_runner(tmp_path):
    frontier = _frontier_module()
    path = tmp_path / "frontier.json"
    runner_a = {"runs": {}, "failures": {}, "commands": ["python a"]}
    runner_b = {"runs": {}, "failures": {}, "commands": ["python b"]}
    frontier.save_results(path, runner_a)
    frontier.save_results(path, runner_b)

    runner_a["runs"]["lora|lr0.001|s0"] = {"result": {"steps": 4}}
    runner_a["failures"]["vila|lr0.001|s0"] = {"count": 1, "error": "boom"}
    frontier.save_results(path, runner_a)
    runner_b["runs"]["fila|lr0.001|s1"] = {"result": {"steps": 5}}
    runner_b["runs"]["vila|lr0.001|s0"] = {"result": {"steps": 1}}  # a retry elsewhere succeeded
    frontier.save_results(path, runner_b)

    on_disk = json.loads(path.read_text())
    assert set(on_disk["runs"]) == {"lora|lr0.001|s0", "fila|lr0.001|s1", "vila|lr0.001|s0"}
    assert on_disk["failures"] == {}
    assert on_disk["commands"] == ["python a", "python b"]
    assert runner_b["runs"] == on_disk["runs"]  # the in-memory copy is updated to the merged state
    assert not list(tmp_path.glob("*.tmp"))
