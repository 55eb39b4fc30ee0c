"""FILA x UnlearningTrainer integration on tiny models.

Covers what tests/trainer/test_unlearning_trainer.py does not: the model at step 0 is the original model, the
FILA cost metrics, the base weights untouched by init and training, the reference model (adapters disabled), resuming
in a "fresh process" (new base + new PeftModel + new trainer) from a checkpoint's ``_fila_init/``, the portable adapter
checked by stock PEFT in a subprocess that never imports peft_unlearn, ``Trainer.push_to_hub`` end to end (upload
stand-in), ``merge_and_unload`` and a plain ``transformers.Trainer`` on a pending FILA model.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_unlearn.fila
import peft_unlearn.trainer.adapter_init
from peft_unlearn.fila import DataDrivenInitPendingWarning, pending_data_driven_adapters
from peft_unlearn.fila.saving import INIT_DIR
from peft_unlearn.testing import TINY_CORPUS, tiny_causal_lm
from peft_unlearn.trainer import UnlearningConfig, UnlearningTrainer
from tests.helpers import quick_cpu_config, run_python

FORGET = [
    {"prompt": "Question: Where was the author born? Answer:", "completion": " She was born in Paris."},
    {"prompt": "Question: What does Jane Doe write?", "completion": " Mystery novels, mostly."},
    {"prompt": "Question: When was she born?", "completion": " In 1970."},
    {"prompt": "Question: Who is Ishmael?", "completion": " A sailor who tells the story of a whale hunt."},
]
RETAIN = [{"text": t} for t in TINY_CORPUS[:5]]
RANK, ALPHA = 4, 8
NUM_TARGETS = 14  # 2 llama blocks x (q, k, v, o, gate, up, down)
HUB_BASE = "example-org/tiny-llama"  # a Hub-style id (not a local folder), so the card names the base model


def _base(tokenizer):
    return tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0)


def _fila_model(base):
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0, init_lora_weights="fila"
    )
    return get_peft_model(base, config)


def _args(output_dir, **kwargs) -> UnlearningConfig:
    return quick_cpu_config(
        str(output_dir),
        **{"max_steps": 4, "learning_rate": 5e-2, "lr_scheduler_type": "constant", "seed": 0, **kwargs},
    )


def _trainer(model, tokenizer, args, **kwargs) -> UnlearningTrainer:
    return UnlearningTrainer(
        model, args, forget_dataset=FORGET, retain_dataset=RETAIN, processing_class=tokenizer, **kwargs
    )


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Jane Doe was born in Paris in 1970.")["input_ids"]])


def _logits(model, ids) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.train(was_training)
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class _StepZeroProbe(TrainerCallback):
    """Records, when training begins, which FILA adapters are pending and the model's logits."""

    def __init__(self, ids):
        self.ids = ids
        self.pending = None
        self.logits = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.pending = pending_data_driven_adapters(model)
        self.logits = _logits(model, self.ids)


PLAIN_PEFT_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, ids_path, out_path = sys.argv[1:5]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(ids_path)).logits, out_path)
    assert "peft_unlearn" not in sys.modules, "the plain-PEFT check must not import peft_unlearn"
    print("PLAIN_PEFT_OK")
    """
)


def _plain_peft_logits(tmp_path: Path, base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Load the adapter with stock PEFT onto the original base in a subprocess that never imports peft_unlearn."""
    script, ids_path, out_path = tmp_path / "plain_peft.py", tmp_path / "ids.pt", tmp_path / "plain_logits.pt"
    script.write_text(PLAIN_PEFT_SCRIPT)
    torch.save(ids, ids_path)
    run_python([script, base_dir, adapter_dir, ids_path, out_path], cwd=tmp_path, expect="PLAIN_PEFT_OK")
    return torch.load(out_path)


class _FakeHubApi:
    """Local stand-in for the `HfApi` calls of `Trainer.init_hf_repo` / `Trainer.push_to_hub`."""

    class _Repo:
        repo_id = "user/unlearned-tiny"

    def __init__(self, snapshot_dir: Path):
        self.snapshot_dir = snapshot_dir
        self.created: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        self.created.append(repo_id)
        return self._Repo()

    def upload_folder(self, *, folder_path, ignore_patterns=None, allow_patterns=None, **kwargs):
        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        uploaded = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        for rel in uploaded:  # what the Hub would hold, copied at upload time
            (self.snapshot_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, self.snapshot_dir / rel)
        self.uploads.append({"folder_path": str(folder_path), "files": uploaded, **kwargs})
        return "https://hub.example/commit/1"


# ---------------------------------------------------------------------------------------------------------------
# auto-init, reference adapter, saving, push, merge (one training run)
# ---------------------------------------------------------------------------------------------------------------


def test_trainer_fila_end_to_end(tmp_path, tokenizer, monkeypatch):
    import transformers.trainer

    ids = _ids(tokenizer)
    base = _base(tokenizer)
    base.config._name_or_path = HUB_BASE
    base_dir = tmp_path / "original_base"
    base.save_pretrained(base_dir)
    original = _logits(base, ids)
    original_state = {k: v.detach().clone() for k, v in base.state_dict().items()}

    model = _fila_model(base)
    assert pending_data_driven_adapters(model) == ["default"]
    probe = _StepZeroProbe(ids)
    trainer = _trainer(
        model,
        tokenizer,
        _args(tmp_path / "out", forget_loss="npo", retain_loss="kl", max_steps=2, save_strategy="steps", save_steps=2),
        callbacks=[probe],
    )
    trainer.train()

    # 1. FILA ran inside train(), before step 0, and left the model unchanged
    assert probe.pending == []
    assert _max_diff(probe.logits, original) <= 1e-4
    first_log = trainer.state.log_history[0]
    for key in ("fila_seconds", "fila_fisher_seconds", "fila_svd_seconds", "fila_peak_memory_bytes"):
        assert key in first_log, f"{key} not logged: {sorted(first_log)}"
    assert first_log["fila_peak_memory_bytes"] > 0 and first_log["fila_num_layers"] == NUM_TARGETS
    assert trainer.fila_stats["default"]["num_layers"] == NUM_TARGETS
    assert not any(k.startswith("fila_") for h in trainer.state.log_history[1:] for k in h)

    # 2. the base weights are the original ones after init and training; the reference (adapters disabled) is
    # exactly the original model, and no helper adapter exists
    trained = _logits(model, ids)
    assert _max_diff(trained, original) > 1e-3  # the adapter was trained
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, original_state[name.replace(".base_layer", "")]), name
    with trainer.reference_model() as ref:
        assert torch.equal(ref(input_ids=ids).logits, original)
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)
    assert len(trainable) == 2 * NUM_TARGETS

    # 3. checkpoints are raw (rank r, "fila") + _fila_init/, without the reference adapter
    checkpoint = tmp_path / "out" / "checkpoint-2"
    raw_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert raw_config["init_lora_weights"] == "fila" and raw_config["r"] == RANK
    assert (checkpoint / INIT_DIR / "fila_init.safetensors").is_file()
    assert len(load_file(str(checkpoint / "adapter_model.safetensors"))) == 2 * NUM_TARGETS

    # 4. save_model writes the portable plain LoRA; stock PEFT reproduces the trained model on the original base
    final = tmp_path / "final"
    trainer.save_model(str(final))
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 2 * RANK and config["lora_alpha"] == 2 * ALPHA
    assert not (final / INIT_DIR).exists()
    tensors = load_file(str(final / "adapter_model.safetensors"))
    assert len(tensors) == 2 * NUM_TARGETS
    assert all(v.shape[0 if ".lora_A." in k else 1] == 2 * RANK for k, v in tensors.items())
    plain = _plain_peft_logits(tmp_path, base_dir, final, ids)
    assert _max_diff(plain, trained) <= 1e-4

    # 5. push_to_hub uploads the portable adapter and the model card, never _fila_init / checkpoints
    hub_dir = tmp_path / "hub"
    api = _FakeHubApi(hub_dir)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    trainer.push_to_hub()
    assert api.created == ["out"] and len(api.uploads) == 1
    uploaded = api.uploads[0]["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    assert not any(INIT_DIR in f or f.startswith(("_", "checkpoint-")) for f in uploaded)
    pushed_config = json.loads((hub_dir / "adapter_config.json").read_text())
    assert pushed_config["init_lora_weights"] is True and pushed_config["r"] == 2 * RANK
    pushed = load_file(str(hub_dir / "adapter_model.safetensors"))
    assert pushed.keys() == tensors.keys()
    assert all(torch.equal(pushed[k], tensors[k]) for k in tensors)
    card = (hub_dir / "README.md").read_text()
    front_matter = card.split("---")[1]
    for tag in ("peft", "lora", "unlearning", "fila", "peft-unlearn"):
        assert f"- {tag}\n" in front_matter, tag
    assert f"base_model: {HUB_BASE}" in front_matter
    for text in ("(`npo`)", "(`kl`)", "forget: 4 examples", "retain: 5 examples", "| `r` | `4` |"):
        assert text in card, text
    assert "| `published_r` | `8` |" in card and "| `published_lora_alpha` | `16` |" in card
    assert "@inproceedings{cha2025towards" in card and "arxiv.org/abs/2408.06621" in card
    # final metrics of the run are reported, with the values the trainer logged
    assert "## Results" in card
    last_forget_loss = [row["forget_loss"] for row in trainer.state.log_history if "forget_loss" in row][-1]
    assert f"| `forget_loss` | {last_forget_loss:.4g} |" in card

    # 6. merge_and_unload gives the unlearned full model (W + s*B*A - s*B0*A0)
    merged = model.merge_and_unload()
    assert not any("lora_" in n or "offset" in n for n in merged.state_dict())
    assert _max_diff(_logits(merged, ids), trained) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# a plain transformers.Trainer on a pending FILA model
# ---------------------------------------------------------------------------------------------------------------


def test_pending_fila_model_warns_in_plain_trainer_and_cannot_be_saved(tmp_path, tokenizer):
    model = _fila_model(_base(tokenizer))
    ids = torch.tensor(tokenizer([TINY_CORPUS[0], TINY_CORPUS[2]], truncation=True, max_length=8)["input_ids"])
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True, max_steps=1, save_strategy="no"
    )
    plain = Trainer(model=model, args=args, train_dataset=data)
    with pytest.warns(DataDrivenInitPendingWarning, match=r"initialize_adapter_weights"):
        plain.train()
    assert pending_data_driven_adapters(model) == ["default"]  # a plain Trainer never computes FILA
    with pytest.raises(ValueError, match=r"adapter\(s\) \['default'\] are not initialised yet"):
        plain.save_model(str(tmp_path / "plain_saved"))
    assert not (tmp_path / "plain_saved" / "adapter_model.safetensors").exists()

    unlearning = _trainer(_fila_model(_base(tokenizer)), tokenizer, _args(tmp_path / "u"))
    with pytest.raises(ValueError, match=r"are not initialised yet"):
        unlearning.save_model(str(tmp_path / "u_saved"))


# ---------------------------------------------------------------------------------------------------------------
# resume in a "fresh process"
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("forget_loss", "optim"), [("inverted_hinge", "sgd"), ("npo", "adamw_torch")], ids=["ihl-sgd", "npo-adamw"]
)
def test_fresh_process_resume_reattaches_the_initial_factors(tmp_path, tokenizer, monkeypatch, forget_loss, optim):
    def run(output_dir, resume=None):
        model = _fila_model(_base(tokenizer))  # original weights, FILA pending
        args = _args(
            output_dir, forget_loss=forget_loss, retain_loss="nll", optim=optim, save_strategy="steps", save_steps=2
        )
        trainer = _trainer(model, tokenizer, args)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    ids = _ids(tokenizer)
    original_state = {k: v.clone() for k, v in _base(tokenizer).state_dict().items()}
    original = _logits(_base(tokenizer), ids)
    straight = run(tmp_path / "a")  # 4 uninterrupted steps
    expected = {k: v.detach().clone() for k, v in straight.model.state_dict().items()}
    checkpoint = tmp_path / "a" / "checkpoint-2"
    halfway = load_file(str(checkpoint / "adapter_model.safetensors"))
    final_lora = {k.replace(".default.", "."): v for k, v in expected.items() if ".lora_" in k and ".default." in k}
    assert max(_max_diff(final_lora[k], halfway[k]) for k in halfway) > 1e-3  # steps 3-4 moved the adapter

    def no_fila(*args, **kwargs):
        raise AssertionError("resuming must re-attach A0/B0 from _fila_init, not re-run FILA")

    monkeypatch.setattr(peft_unlearn.trainer.adapter_init, "initialize_adapter_weights", no_fila)
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    assert resumed.state.global_step == 4 and resumed.fila_stats == {}
    resumed_logs = [h for h in resumed.state.log_history if h.get("step", 0) > 2]  # earlier ones come from A
    assert resumed_logs and not any(k.startswith("fila_") for h in resumed_logs for k in h)
    got = resumed.model.state_dict()
    assert set(got) == set(expected)
    for name in expected:  # adapter and (untouched) base weights
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    base_weight = got["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert torch.equal(base_weight, original_state["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(_logits(resumed.model, ids), _logits(straight.model, ids), atol=1e-5, rtol=1e-5)
    if forget_loss == "npo":
        with resumed.reference_model() as ref:
            assert _max_diff(ref(input_ids=ids).logits, original) <= 1e-5

    if forget_loss == "inverted_hinge":  # a checkpoint without _fila_init cannot be resumed: no silent re-run
        broken = tmp_path / "broken" / "checkpoint-2"
        shutil.copytree(checkpoint, broken)
        shutil.rmtree(broken / INIT_DIR)
        with pytest.raises(ValueError, match=r"has no `_fila_init/` folder with the initial factors"):
            run(tmp_path / "c", resume=str(broken))


def test_fila_seed_sets_the_randomized_svd_seed(tmp_path, tokenizer):
    from peft_unlearn import FilaConfig, FilaLoraConfig

    def lora_a(fila_seed):
        config = FilaLoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=["q_proj"],
            lora_dropout=0.0,
            fila_config=FilaConfig(exact_svd=False),  # tiny layers would otherwise take the exact SVD
        )
        model = get_peft_model(_base(tokenizer), config)
        trainer = _trainer(model, tokenizer, _args(tmp_path / str(fila_seed), max_steps=1, learning_rate=0.0))
        trainer.args.fila_seed = fila_seed
        trainer._maybe_initialize_fila()
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    default, again, seed_42, other = lora_a(None), lora_a(None), lora_a(42), lora_a(7)
    assert torch.equal(default, again)  # seeded: reproducible
    assert torch.equal(default, seed_42)  # None keeps the adapter config's seed (42)
    assert not torch.allclose(default, other)  # another seed gives another randomized SVD


def test_low_memory_fisher_options_reach_the_fisher_pass_and_keep_the_init(tmp_path, tokenizer, monkeypatch):
    """`fila_accumulator_device` / `fila_layers_per_pass` select estimate_fisher's low-memory modes; same init."""
    import peft_unlearn.fila.init as fila_init

    seen = []
    original = fila_init.estimate_fisher

    def recording(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("accumulator_device", "layers_per_pass")})
        return original(*args, **kwargs)

    monkeypatch.setattr(fila_init, "estimate_fisher", recording)

    def factors(**options):
        model = _fila_model(_base(tokenizer))
        trainer = _trainer(
            model, tokenizer, _args(tmp_path / str(len(seen)), max_steps=1, learning_rate=0.0, **options)
        )
        trainer.train()
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

    default = factors()
    low_memory = factors(fila_accumulator_device="cpu", fila_layers_per_pass=3)
    assert seen == [
        {"accumulator_device": None, "layers_per_pass": None},
        {"accumulator_device": "cpu", "layers_per_pass": 3},
    ]
    assert default.keys() == low_memory.keys() and len(default) == 2 * NUM_TARGETS
    for key, value in default.items():
        torch.testing.assert_close(low_memory[key], value, rtol=1e-6, atol=1e-7, msg=key)
    with pytest.raises(ValueError, match="fila_layers_per_pass"):
        _args(tmp_path, fila_layers_per_pass=0)
    with pytest.raises(ValueError, match="fila_accumulator_device"):
        _args(tmp_path, fila_accumulator_device="nowhere")


def test_fila_trains_on_a_bf16_base(tmp_path, tokenizer):
    """bf16 base: FILA init (fp32 Fisher), IHL steps change the model, the base stays as loaded, finite weights,
    and the saved portable adapter reproduces the trained model on the original bf16 base."""
    from peft import PeftModel

    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0, dtype=torch.bfloat16)
    originals = {k: v.clone() for k, v in base.state_dict().items()}
    model = _fila_model(base)
    ids = _ids(tokenizer)
    before = _logits(model, ids).float()
    trainer = _trainer(model, tokenizer, _args(tmp_path / "run", max_steps=3, learning_rate=1e-2))
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    after = _logits(model, ids).float()
    assert (after - before).abs().max().item() > 1e-2  # three IHL steps moved the model
    for key, value in model.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, originals[key.replace(".base_layer", "")]), key  # base untouched
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    trainer.save_model(str(tmp_path / "adapter"))
    fresh = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=0, dtype=torch.bfloat16)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    tolerance = 0.02 * after.abs().max().item()  # bf16 rounding of each layer output (see the bf16 init test)
    assert (_logits(reloaded, ids).float() - after).abs().max().item() <= tolerance
