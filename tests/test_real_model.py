"""Real-model checks on Gemma-3 270M (CPU, fp32): FILA keeps the outputs, IHL forgets, the adapter is portable.

One short pipeline shared by the tests (module fixture): two memorized passages from ``examples/data`` truncated
to 32 tokens, a FILA LoRA (r=8 on ``q_proj``/``v_proj`` of every layer, one Fisher batch) initialised by
``UnlearningTrainer.train()``, a few IHL steps, then ``save_model``. The checks:

* FILA init (captured when training begins) leaves the logits unchanged (max |diff| <= 1e-3) while the adapter
  and the base weights did change (so the check can fail);
* the IHL steps lower the memorization accuracy of the passages by a wide margin;
* the saved adapter is a plain LoRA (``init_lora_weights: true``, rank 2r) and stock PEFT, in a subprocess that
  never imports ``peft_unlearn``, reproduces the trained model's logits on the ORIGINAL base (<= 1e-3).

The model is materialised once per machine into the default cache (``$PEFT_UNLEARN_CACHE`` or
``~/.cache/peft_unlearn``; about 80 s the first time). These tests run by default (marker ``slow``); deselect
them with ``pytest -m "not slow"``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import run_python

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
MAX_LENGTH = 32
RANK = 8
STEPS = 4
LR = 1e-3
TOL = 1e-3


def _texts(name: str, k: int) -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()][:k]


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The materialised Gemma-3 270M (built once into the default cache, which honours $PEFT_UNLEARN_CACHE)."""
    from peft_unlearn.models import materialize_gemma3_270m

    return materialize_gemma3_270m()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float().clone()
    finally:
        model.train(was_training)


@pytest.fixture(scope="module")
def pipeline(gemma3_path, tmp_path_factory) -> dict:
    """Load, wrap with a FILA LoRA, train a few IHL steps, save; record what the tests compare."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    import peft_unlearn  # noqa: F401  (registers init_lora_weights="fila")
    from peft_unlearn import UnlearningConfig, UnlearningTrainer
    from peft_unlearn.metrics import memorization_accuracy
    from peft_unlearn.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(gemma3_path), dtype=torch.float32)
    forget = [tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in _texts("forget.jsonl", 2)]
    retain = [tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in _texts("retain.jsonl", 2)]
    assert all(len(x) == MAX_LENGTH for x in forget), "the forget passages are longer than MAX_LENGTH tokens"
    ids = torch.tensor(forget)
    out: dict = {"ids": ids, "base_logits": _logits(model, ids)}
    out["ma_before"] = memorization_accuracy(model, ids).tolist()
    first_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()

    class CaptureInit(TrainerCallback):
        """Record the model right after the FILA initialisation (train() runs it before on_train_begin)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layer = model.get_base_model().model.layers[0].self_attn.q_proj
            out["init_logits"] = _logits(model, ids)
            out["init_lora_B_norm"] = layer.lora_B["default"].weight.norm().item()
            out["init_base_change"] = (layer.base_layer.weight - first_q).abs().max().item()
            return control

    args = UnlearningConfig(
        output_dir=str(tmp_path_factory.mktemp("real_model_run")),
        forget_loss="inverted_hinge",
        retain_loss=None,  # the retain passages only feed FILA's Fisher estimate
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        per_device_train_batch_size=len(forget),
        max_steps=STEPS,
        max_length=MAX_LENGTH,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        fila_batch_size=len(forget),
        fila_max_batches=1,
    )
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        forget_dataset=Dataset.from_dict({"input_ids": forget}),
        retain_dataset=Dataset.from_dict({"input_ids": retain}),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=RANK,
            lora_alpha=2 * RANK,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights="fila",
        ),
        callbacks=[CaptureInit()],
    )
    trainer.train()
    out["steps"] = trainer.state.global_step
    out["ma_after"] = memorization_accuracy(trainer.model, ids).tolist()
    out["trained_logits"] = _logits(trainer.model, ids)
    out["adapter_dir"] = Path(tmp_path_factory.mktemp("real_model_adapter"))
    trainer.save_model(str(out["adapter_dir"]))
    return out


def test_fila_init_keeps_outputs(pipeline):
    assert "init_logits" in pipeline, "on_train_begin never ran"
    # FILA really moved weights into the adapter (a skipped init would pass the output check trivially) ...
    assert pipeline["init_lora_B_norm"] > 1e-3
    assert pipeline["init_base_change"] == 0.0  # the base weight is never modified
    # ... and the model computes the same function: W + s * B0 A0 - s * B0 A0 = W.
    diff = (pipeline["init_logits"] - pipeline["base_logits"]).abs().max().item()
    assert diff <= TOL, f"FILA init changed the logits by up to {diff:.3g}"


def test_ihl_steps_lower_memorization(pipeline):
    assert pipeline["steps"] == STEPS
    before, after = pipeline["ma_before"], pipeline["ma_after"]
    assert min(before) > 0.7, f"the passages are not memorized by the base model: MA {before}"
    for b, a in zip(before, after):
        assert a < b - 0.2, f"{STEPS} IHL steps did not lower MA enough: {before} -> {after}"


_RELOAD = textwrap.dedent(
    """
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path, adapter_dir, ids_path, out_path = sys.argv[1:5]
    torch.set_num_threads(2)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_path), use_cache=False).logits.float()
    assert not any(name.split(".")[0] == "peft_unlearn" for name in sys.modules), "peft_unlearn was imported"
    torch.save(logits, out_path)
    """
)


def test_portable_adapter_reloads_with_plain_peft(pipeline, gemma3_path, tmp_path):
    adapter_dir = pipeline["adapter_dir"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert config["r"] == 2 * RANK
    assert not (adapter_dir / "_fila_init").exists()

    torch.save(pipeline["ids"], tmp_path / "ids.pt")
    run_python(["-c", _RELOAD, gemma3_path, adapter_dir, tmp_path / "ids.pt", tmp_path / "o.pt"], timeout=600)
    reloaded = torch.load(tmp_path / "o.pt")
    trained = pipeline["trained_logits"]
    # the comparison means something: training moved the logits well beyond the tolerance
    assert (trained - pipeline["base_logits"]).abs().max().item() > 100 * TOL
    diff = (reloaded - trained).abs().max().item()
    assert diff <= TOL, f"plain PEFT on the original base differs from the trained model by up to {diff:.3g}"
