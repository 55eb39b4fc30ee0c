"""The README quick start, the offline TOFU example and (on the CPU) the multi-GPU example run end to end."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README quick start has no python block"
    return match.group(1)


def test_readme_quickstart_runs_and_saves_a_plain_lora(tmp_path, monkeypatch):
    """The README's drop-in runs as written, with the Hub loaders answered by a tiny offline Gemma-3."""
    import transformers

    from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    loaded: list[str] = []

    def fake_model(name, *args, **kwargs):
        loaded.append(name)
        return tiny_causal_lm("gemma3", vocab_size=len(tokenizer))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, *a, **k: tokenizer)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_quickstart(), "README.md", "exec"), namespace)
    assert loaded == ["google/gemma-3-270m"]
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 10
    assert trainer.args.learning_rate == 1e-3  # the default the README promises
    assert (trainer.args.forget_loss, trainer.args.retain_loss) == ("inverted_hinge", "nll")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # the recommended default-init LoRA
    logs = [row for row in trainer.state.log_history if "forget_loss" in row]
    assert logs, "forget_loss was not logged"
    # training changed the adapter: PEFT's default init starts every lora_B at zero
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)


def test_tofu_example_offline(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import tofu_unlearning
    finally:
        sys.path.pop(0)
    summary = tofu_unlearning.main(
        [
            "--tiny",
            "--finetune-epochs",
            "1",
            "--finetune-lr",
            "1e-3",
            "--num_train_epochs",
            "2",
            "--learning_rate",
            "1e-2",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "1",
            "--eval-max-items",
            "4",
            "--max-new-tokens",
            "8",
            "--max_length",
            "160",
            "--output_dir",
            str(tmp_path),
        ]
    )
    after = summary["after"]
    for key in ("forget_quality", "model_utility", "forget_truth_ratio", "retain_prob", "world_facts_rougeL"):
        assert key in after and math.isfinite(after[key]), key
        assert 0.0 <= after[key] <= 1.0, (key, after[key])
    # unlearning changed the model: the forget-set answer probability moved
    assert after["forget_prob"] != pytest.approx(summary["before"]["forget_prob"], rel=1e-6)
    assert (tmp_path / "tofu_results.json").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True


def _jsonl(name: str) -> list[dict]:
    path = ROOT / "examples" / "data" / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_demo_data_splits_memorized_passages_into_forget_and_heldout():
    forget, kept = _jsonl("forget.jsonl"), _jsonl("memorized_heldout.jsonl")
    never, retain = _jsonl("heldout.jsonl"), _jsonl("retain.jsonl")
    assert (len(forget), len(kept), len(never), len(retain)) == (8, 8, 16, 32)
    for row in forget + kept + never + retain:
        assert {"text", "title", "source", "license"} <= set(row), row.get("title")
    texts = [row["text"] for row in forget + kept + never + retain]
    assert len(set(texts)) == len(texts), "the sets must be disjoint"
    # both memorized sets come from the measured candidates, ranked by MA: forget = ranks 1-8, heldout = 9-16
    report = json.loads((ROOT / "examples" / "data" / "memorization_report.json").read_text())
    assert [row["title"] for row in forget] == [row["title"] for row in report["passages"]["forget"]]
    assert [row["title"] for row in kept] == [row["title"] for row in report["passages"]["memorized_heldout"]]
    mas = [row["ma"] for row in report["passages"]["forget"] + report["passages"]["memorized_heldout"]]
    assert mas == sorted(mas, reverse=True)
    candidates = {row["text"] for row in _jsonl("candidates.jsonl")}
    assert all(row["text"] in candidates for row in forget + kept)


def test_demo_arguments_match_the_forget_file():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import demo_gemma3
    finally:
        sys.path.pop(0)
    assert demo_gemma3.parse_args([]).n_forget == 8
    with pytest.raises(SystemExit):
        demo_gemma3.parse_args(["--n-forget", "9"])


def test_multi_gpu_example_runs_on_cpu_and_saves_a_plain_lora(tmp_path):
    """`examples/multi_gpu/unlearn.py` parses `UnlearningConfig` flags, runs FILA + IHL and saves a portable LoRA."""
    from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer

    model_dir, out = tmp_path / "tiny-llama", tmp_path / "out"
    tokenizer = tiny_tokenizer()
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sys.path.insert(0, str(ROOT / "examples" / "multi_gpu"))
    try:
        import unlearn
    finally:
        sys.path.pop(0)
    argv = ["--model", str(model_dir), "--output_dir", str(out), "--rank", "2", "--max_steps", "2"]
    unlearn.main([*argv, "--max_length", "24", "--use_cpu", "--bf16", "false", "--learning_rate", "1e-3"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 4  # FILA saved as a plain rank-2r LoRA
    assert sorted(config["target_modules"]) == sorted(unlearn.TARGETS)
