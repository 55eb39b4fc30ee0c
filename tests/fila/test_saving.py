"""Saving FILA adapters: portable plain LoRA (checked by stock PEFT in a subprocess), raw + resume, push_to_hub."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peft_unlearn  # noqa: F401
from peft_unlearn.fila import (
    export_portable_adapter,
    has_data_driven_adapter,
    initialize_fila_weights,
    pending_data_driven_adapters,
    restore_fila_residual,
    restore_fila_state,
    save_fila_state,
)
from peft_unlearn.fila.saving import INIT_DIR, load_fila_state
from peft_unlearn.testing import random_lm_batches, tiny_causal_lm
from tests.helpers import run_python

VOCAB = 320


def _batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return random_lm_batches(n, seed=seed, vocab_size=VOCAB)


def _train(peft_model, batches, steps: int = 3) -> None:
    """A few SGD steps on A and B so that the adapter differs from its init."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(params, lr=0.5)
    peft_model.train()
    for step in range(steps):
        loss = -peft_model(**batches[step % len(batches)]).loss  # gradient ascent, like unlearning
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def _make(tmp_path: Path, arch: str, name: str, **lora_kwargs):
    """Save the original base, build + initialise + train a FILA adapter; return (model, base_dir, ids, logits)."""
    base = tiny_causal_lm(arch, vocab_size=VOCAB, seed=3)
    base_dir = tmp_path / f"base_{name}"
    base.save_pretrained(base_dir)
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(
        r=lora_kwargs.pop("r", 4),
        lora_alpha=lora_kwargs.pop("lora_alpha", 8),
        target_modules=targets,
        init_lora_weights="fila",
        **lora_kwargs,
    )
    peft_model = get_peft_model(base, config)
    initialize_fila_weights(peft_model, _batches(2, 1), _batches(2, 2), show_progress=False)
    _train(peft_model, _batches(3, 4))
    ids = _batches(1, 5)[0]["input_ids"]
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    return peft_model, base_dir, ids, logits


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


PLAIN_PEFT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    cases = json.loads(sys.argv[1])
    for case in cases:
        base = AutoModelForCausalLM.from_pretrained(case["base"])
        if case.get("expect_error"):
            try:
                PeftModel.from_pretrained(base, case["adapter"])
            except ValueError as err:
                open(case["out"], "w").write(str(err))
            else:
                open(case["out"], "w").write("LOADED")
            continue
        model = PeftModel.from_pretrained(base, case["adapter"]).eval()
        ids = torch.load(case["ids"])
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, case["out"])
    assert "peft_unlearn" not in sys.modules, "the plain-PEFT check must not import peft_unlearn"
    print("PLAIN_PEFT_OK")
    """
)


def test_portable_adapter_loads_with_plain_peft_in_subprocess(tmp_path):
    variants = {
        "llama_patterns": ("llama", {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 4}}),
        "gpt2": ("gpt2", {}),
        "llama_rslora": ("llama", {"use_rslora": True}),
    }
    cases, expected = [], {}
    for name, (arch, kwargs) in variants.items():
        peft_model, base_dir, ids, logits = _make(tmp_path, arch, name, **dict(kwargs))
        rank = peft_model.peft_config["default"].r
        alpha = peft_model.peft_config["default"].lora_alpha
        adapter_dir = tmp_path / f"portable_{name}"
        peft_model.save_pretrained(adapter_dir)
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["init_lora_weights"] is True and config["r"] == 2 * rank
        assert "fila_config" not in config and not (adapter_dir / INIT_DIR).exists()
        if kwargs.get("use_rslora"):
            assert config["lora_alpha"] == pytest.approx(alpha * 2**0.5)
        else:
            assert config["lora_alpha"] == 2 * alpha
        if "rank_pattern" in kwargs:
            assert config["rank_pattern"] == {"down_proj": 4} and config["alpha_pattern"] == {"v_proj": 8}
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        a_key = next(k for k in tensors if k.endswith("lora_A.weight"))
        assert tensors[a_key].shape[0] == 2 * peft_model.peft_config["default"].rank_pattern.get(
            a_key.split(".")[-3], rank
        )
        torch.save(ids, tmp_path / f"ids_{name}.pt")
        cases.append(
            {
                "base": str(base_dir),
                "adapter": str(adapter_dir),
                "ids": str(tmp_path / f"ids_{name}.pt"),
                "out": str(tmp_path / f"out_{name}.pt"),
            }
        )
        expected[name] = logits
        if name == "gpt2":  # the raw checkpoint must fail loudly in plain PEFT
            raw_dir = tmp_path / "raw_gpt2"
            peft_model.save_pretrained(raw_dir, fila_portable=False)
            cases.append(
                {
                    "base": str(base_dir),
                    "adapter": str(raw_dir),
                    "expect_error": True,
                    "out": str(tmp_path / "raw_err.txt"),
                }
            )
    script = tmp_path / "plain_peft_check.py"
    script.write_text(PLAIN_PEFT_SCRIPT)
    run_python([script, json.dumps(cases)], cwd=tmp_path, expect="PLAIN_PEFT_OK")
    for name, logits in expected.items():
        plain = torch.load(tmp_path / f"out_{name}.pt")
        assert (plain - logits).abs().max() <= 1e-4, name
    assert "Unknown initialization" in (tmp_path / "raw_err.txt").read_text()


def test_trained_adapter_is_not_the_base_model(tmp_path):
    """Guards the round-trip test: the trained FILA model differs from the original base."""
    peft_model, base_dir, ids, logits = _make(tmp_path, "llama", "guard")
    original = AutoModelForCausalLM.from_pretrained(base_dir)
    assert (_logits(original, ids) - logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merge_and_unload_is_the_trained_model_and_unload_the_original(tmp_path, arch):
    import copy

    peft_model, base_dir, ids, logits = _make(tmp_path, arch, "merge")
    original = AutoModelForCausalLM.from_pretrained(base_dir)
    merged = copy.deepcopy(peft_model).merge_and_unload()  # W + s*B*A - s*B0*A0
    assert (_logits(merged, ids) - logits).abs().max() <= 1e-4
    unloaded = peft_model.unload()
    state = original.state_dict()
    assert unloaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in unloaded.state_dict().items())  # the base was never touched
    assert torch.equal(_logits(unloaded, ids), _logits(original, ids))


def test_raw_save_restore_and_resume(tmp_path):
    peft_model, base_dir, ids, logits = _make(tmp_path, "llama", "raw")
    raw_dir = tmp_path / "raw"
    peft_model.save_pretrained(raw_dir, fila_portable=False)
    config = json.loads((raw_dir / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "fila" and config["r"] == 4
    meta, tensors = load_fila_state(raw_dir)
    assert set(meta["adapters"]) == {"default"}
    layers = meta["adapters"]["default"]["layers"]
    assert meta["format_version"] == 2 and meta["adapters"]["default"]["init_lora_weights"] == "fila"
    assert layers["model.layers.0.self_attn.q_proj"] == {
        "r": 4,
        "scaling": 2.0,
        "shape": [32, 32],
        "lora_dtype": "float32",
    }
    assert tensors["default::model.layers.0.self_attn.q_proj::A0"].shape == (4, 32)

    # trainer-style resume: fresh process, original base, same config, restore, then load the checkpoint
    fresh = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="fila"),
    )
    assert pending_data_driven_adapters(fresh) == ["default"]
    assert restore_fila_state(fresh, raw_dir) == {"restored": len(layers)}
    assert restore_fila_state(fresh, raw_dir) == {"restored": len(layers)}  # idempotent: re-attaching is harmless
    assert pending_data_driven_adapters(fresh) == []
    fresh.load_adapter(raw_dir, "default", is_trainable=True)
    assert (_logits(fresh, ids) - logits).abs().max() <= 1e-5
    original = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    for name, param in fresh.get_base_model().named_parameters():  # the base stays the original
        if "lora_" not in name:
            assert torch.equal(param, original[name.replace(".base_layer", "")])
    # the resumed model publishes the same portable adapter
    peft_model.save_pretrained(tmp_path / "p1")
    fresh.save_pretrained(tmp_path / "p2")
    first = load_file(str(tmp_path / "p1" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "p2" / "adapter_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # alternative: PeftModel.from_pretrained on the raw checkpoint, then restore
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), raw_dir)
    assert pending_data_driven_adapters(loaded) == ["default"]
    with pytest.raises(ValueError, match="not initialised yet"):
        loaded.save_pretrained(tmp_path / "nope")
    with pytest.warns(DeprecationWarning, match="use restore_fila_state"):
        restore_fila_residual(loaded, raw_dir)
    assert (_logits(loaded, ids) - logits).abs().max() <= 1e-5


def test_restore_errors(tmp_path):
    peft_model, base_dir, _, _ = _make(tmp_path, "llama", "err")
    raw_dir = tmp_path / "raw"
    peft_model.save_pretrained(raw_dir, fila_portable=False)

    def fresh(seed=3, **kwargs):
        model = tiny_causal_lm("llama", vocab_size=VOCAB, seed=seed)
        settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **kwargs}
        return get_peft_model(model, LoraConfig(init_lora_weights="fila", **settings))

    with pytest.raises(ValueError, match="rank/scaling"):
        restore_fila_residual(fresh(r=2, lora_alpha=4), raw_dir)
    with pytest.raises(ValueError, match="rank/scaling"):
        restore_fila_residual(fresh(lora_alpha=16), raw_dir)
    with pytest.raises(ValueError, match="targets other layers"):
        restore_fila_residual(fresh(target_modules=["q_proj"]), raw_dir)
    with pytest.raises(ValueError, match="is not stored"):
        restore_fila_residual(fresh(), raw_dir, adapter_names=["other"])
    other_name = get_peft_model(
        tiny_causal_lm("llama", vocab_size=VOCAB, seed=3),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="fila"),
        adapter_name="x",
    )
    with pytest.raises(ValueError, match="has no adapter 'default'"):
        restore_fila_residual(other_name, raw_dir)
    with pytest.raises(FileNotFoundError, match="No FILA initial state"):
        restore_fila_state(fresh(), tmp_path / "missing")


def test_pending_adapters_cannot_be_saved(tmp_path, tiny_llama):
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"))
    assert has_data_driven_adapter(peft_model)
    for call in (
        lambda: peft_model.save_pretrained(tmp_path / "a"),
        lambda: peft_model.save_pretrained(tmp_path / "b", fila_portable=False),
        lambda: export_portable_adapter(peft_model, tmp_path / "c"),
        lambda: save_fila_state(peft_model, tmp_path / "d"),
    ):
        with pytest.raises(ValueError, match="call peft_unlearn.fila.initialize_adapter_weights"):
            call()
    assert not any((tmp_path / d / "adapter_model.safetensors").exists() for d in "abc")


def test_other_adapters_are_saved_as_they_are(tmp_path):
    peft_model, _, _, _ = _make(tmp_path, "llama", "ref")
    peft_model.add_adapter("ref", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "out")  # all adapters: they act on the unmodified base
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((tmp_path / "out" / "ref" / "adapter_config.json").read_text())["r"] == 4
    peft_model.save_pretrained(tmp_path / "both", selected_adapters=["default", "ref"])
    assert json.loads((tmp_path / "both" / "ref" / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((tmp_path / "both" / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(ValueError, match="unknown adapters \\['nope'\\]"):
        peft_model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    with pytest.raises(TypeError, match="fila_portable"):
        peft_model.save_pretrained(tmp_path / "x", fila_portable="yes")
    with pytest.raises(ValueError, match="not a FILA/VILA adapter"):
        export_portable_adapter(peft_model, tmp_path / "y", adapter_name="ref")
    with pytest.raises(ValueError, match="is not an adapter of the model"):
        export_portable_adapter(peft_model, tmp_path / "y", adapter_name="nope")


def test_named_adapter_bin_format_and_state_dict_argument(tmp_path):
    base = tiny_causal_lm("gpt2", vocab_size=VOCAB, seed=3)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], init_lora_weights="fila"), adapter_name="forget"
    )
    initialize_fila_weights(peft_model, _batches(1, 6), adapter_name="forget", show_progress=False)
    _train(peft_model, _batches(2, 7), steps=2)
    ids = _batches(1, 8)[0]["input_ids"]
    logits = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "out", safe_serialization=False, state_dict=peft_model.state_dict())
    assert (tmp_path / "out" / "forget" / "adapter_model.bin").is_file()
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "out" / "forget", adapter_name="forget"
    )
    assert pending_data_driven_adapters(reloaded) == [] and not has_data_driven_adapter(reloaded)
    assert (_logits(reloaded, ids) - logits).abs().max() <= 1e-4


def test_portable_save_removes_stale_init_folder(tmp_path):
    peft_model, _, _, _ = _make(tmp_path, "llama", "stale")
    out = tmp_path / "out"
    peft_model.save_pretrained(out, fila_portable=False)
    assert (out / INIT_DIR).is_dir()
    peft_model.save_pretrained(out)
    assert not (out / INIT_DIR).exists()
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_version_1_state_without_fingerprints_is_read(tmp_path):
    """Checkpoints written by the residual-form version (format 1, with fingerprints) still resume."""
    peft_model, base_dir, ids, logits = _make(tmp_path, "gpt2", "v1")
    raw_dir = tmp_path / "raw"
    peft_model.save_pretrained(raw_dir, fila_portable=False)
    meta_file = raw_dir / INIT_DIR / "fila_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 1
    meta_file.write_text(json.dumps(meta))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), raw_dir)
    restore_fila_state(model, raw_dir)
    assert (_logits(model, ids) - logits).abs().max() <= 1e-5
    meta["format_version"] = 7
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Unsupported FILA state format 7"):
        restore_fila_state(model, raw_dir)


def test_push_to_hub_uploads_the_portable_adapter(tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    peft_model, _, _, _ = _make(tmp_path, "llama", "hub")
    uploaded = tmp_path / "uploaded"

    class FakeRepo:
        repo_id = "user/fila-test"

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return FakeRepo()

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                target = uploaded / op.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(op.path_or_fileobj, target)
            return "commit"

    class FakeCard:
        def save(self, path):
            Path(path).write_text("card")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: FakeCard())
    peft_model.push_to_hub("user/fila-test")
    config = json.loads((uploaded / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    tensors = load_file(str(uploaded / "adapter_model.safetensors"))
    assert all(t.shape[0 if k.endswith("lora_A.weight") else 1] == 8 for k, t in tensors.items())
    assert not any(p.name.startswith("_") for p in uploaded.rglob("*"))
