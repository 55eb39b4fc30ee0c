"""FILA on bitsandbytes 4-bit (nf4) and 8-bit bases, on CPU (bitsandbytes >= 0.49 runs them there).

The Fisher statistics come from the hook-based estimate (output gradient x input activation), which needs no
gradient of the integer weights; the SVD runs on the dequantized weight.
"""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback  # noqa: E402

import peft_unlearn  # noqa: E402, F401
from peft_unlearn.fila import FisherStatistics, initialize_fila_weights, pending_data_driven_adapters  # noqa: E402
from peft_unlearn.fila.state import dense_weight, iter_lora_layers  # noqa: E402
from peft_unlearn.testing import TINY_CORPUS, random_lm_batches, tiny_causal_lm  # noqa: E402
from peft_unlearn.trainer import UnlearningTrainer  # noqa: E402
from tests.helpers import quick_cpu_config, run_python  # noqa: E402

VOCAB = 320
MODES = ["nf4", "int8"]


def _quantization(mode: str) -> BitsAndBytesConfig:
    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=64, seed=0).save_pretrained(path)
    return path


def _load(base_dir, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=_quantization(mode), dtype=torch.float32
        )


def _random_fisher(peft_model, seed=0) -> FisherStatistics:
    gen = torch.Generator().manual_seed(seed)
    importance = {
        name: torch.rand(
            layer.lora_B["default"].weight.shape[0], layer.lora_A["default"].weight.shape[1], generator=gen
        )
        for name, layer in iter_lora_layers(peft_model, "default")
    }
    return FisherStatistics(importance, f_count=1)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _logits_before_training(model, ids):
    """Logits in train mode (no dropout in these models). On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a
    4-bit weight for a faster kernel at the first eval-mode, no-grad forward, and afterwards no gradient flows
    through that layer's input any more (plain QLoRA is affected as well); train-mode forwards never repack."""
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", MODES)
def test_dequantized_weight_is_the_layer_weight(base_dir, mode):
    """The SVD runs on the dequantized weight: it is the quantized original, read without changing the layer."""
    original = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=64, seed=0).model.layers[0].mlp.up_proj.weight
    layer = _load(base_dir, mode).model.layers[0].mlp.up_proj
    assert type(layer.weight).__name__ == ("Params4bit" if mode == "nf4" else "Int8Params")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = layer(x)
        dense = dense_weight(layer)
        after = layer(x)
    assert dense.shape == original.shape and dense.is_floating_point()
    dense = dense.float()
    assert torch.equal(before, after)  # reading the weight did not disturb the layer
    # nf4 keeps ~4 bits per weight (blockwise absmax), int8 ~8 bits per row: relative errors ~10% / ~1%
    relative = ((dense - original).norm() / original.norm()).item()
    assert relative < (0.15 if mode == "nf4" else 0.02), relative
    # the layer computes with this weight: 4-bit inference on an AVX512-BF16 CPU uses a bf16 kernel on a repacked
    # weight (dense_weight undoes the repacking), 8-bit also quantizes its input; both ~1%
    tolerance = 0.03 * before.abs().max().item()
    assert (torch.nn.functional.linear(x, dense) - before).abs().max().item() <= tolerance


PLAIN_PEFT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_dir, adapter_dir, ids_path, out_dir, mode = sys.argv[1:6]
    if mode == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    ids = torch.load(ids_path)
    warnings.simplefilter("ignore")
    for name, kwargs in (("quantized", {"quantization_config": quant}), ("original", {})):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, f"{out_dir}/{name}.pt")
    assert "peft_unlearn" not in sys.modules, "the plain-PEFT check must not import peft_unlearn"
    print("PLAIN_PEFT_OK")
    """
)


@pytest.mark.parametrize("mode", MODES)
def test_fila_on_quantized_base_trains_and_exports(tmp_path, base_dir, tokenizer, mode):
    """Outputs at init equal the quantized base's to 1e-5 (seen ~1e-7): the base output is computed exactly as
    without the adapter, and the offset cancels ``s * B A`` up to the fp32 rounding of ``(base + s*B*A) - s*B0*A0``.
    """
    ids = random_lm_batches(1, seed=5, vocab_size=VOCAB)[0]["input_ids"]
    quantized = _load(base_dir, mode)
    reference = _logits_before_training(quantized, ids)
    model = get_peft_model(
        quantized,
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights="fila"),
    )
    assert pending_data_driven_adapters(model) == ["default"]

    class StepZero(TrainerCallback):  # the trainer's auto-init (Fisher pass + SVD) ran before step 0
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.pending = pending_data_driven_adapters(model)
            self.logits = _logits_before_training(model, ids)

    # FILA init and a few IHL steps through UnlearningTrainer
    args = quick_cpu_config(tmp_path / "out", max_steps=3, forget_loss="inverted_hinge", retain_loss="nll")
    forget = [{"text": t} for t in TINY_CORPUS[:2]]
    retain = [{"text": t} for t in TINY_CORPUS[2:4]]
    probe = StepZero()
    trainer = UnlearningTrainer(
        model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer, callbacks=[probe]
    )
    trainer.train()
    assert probe.pending == [] and trainer.fila_stats["default"]["num_layers"] == 14
    assert (probe.logits - reference).abs().max().item() <= 1e-5
    model.train()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=0, rtol=0)  # base untouched
    trained = _logits(model, ids)
    assert (trained - reference).abs().max().item() > 1e-3

    # the portable adapter loads with plain peft on the same quantized base and on the unquantized original
    adapter_dir = tmp_path / "portable"
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 8
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_PEFT)
    run_python(
        [script, base_dir, adapter_dir, tmp_path / "ids.pt", tmp_path, mode], cwd=tmp_path, expect="PLAIN_PEFT_OK"
    )
    assert (torch.load(tmp_path / "quantized.pt") - trained).abs().max().item() <= 1e-4
    on_original = torch.load(tmp_path / "original.pt")
    original = _logits(AutoModelForCausalLM.from_pretrained(base_dir), ids)
    quantization_gap = (original - reference).abs().max().item()
    assert torch.isfinite(on_original).all()
    # on the unquantized base the trained model differs from the quantized one by about the quantization error
    assert (on_original - trained).abs().max().item() <= 3 * quantization_gap + 1e-4


@pytest.mark.parametrize("mode", ["nf4"])
def test_merge_and_unload_on_quantized_base(base_dir, mode):
    """Merging into a 4-bit weight re-quantizes it (PEFT's behaviour), so the merged model is close, not equal."""
    ids = random_lm_batches(1, seed=6, vocab_size=VOCAB)[0]["input_ids"]
    model = get_peft_model(_load(base_dir, mode), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="fila"))
    initialize_fila_weights(model, fisher=_random_fisher(model), show_progress=False)
    before = _logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    assert (_logits(merged, ids) - before).abs().max().item() <= 0.05 * before.abs().max().item()


def test_rila_on_4bit_base_auto_init_trains_and_exports(tmp_path, base_dir, tokenizer):
    """RILA on an nf4 base through UnlearningTrainer's auto-init: the output covariance reads the 4-bit layers'
    outputs, A0 = Qᵀ W uses the dequantized weight, the output is unchanged at init, the base is untouched, and the
    portable adapter loads with plain PEFT."""
    from peft_unlearn.fila import RilaConfig, RilaLoraConfig, estimate_output_covariance, rila_init_layer

    # one vector per token: with one per sequence and 2 forget sequences, (1 - beta) C_f - beta C_r has at most 2
    # positive eigenvalues, and the rest of the top 4 would be an arbitrary basis of its zero-eigenvalue space
    settings = RilaConfig(pooling="token")

    ids = random_lm_batches(1, seed=7, vocab_size=VOCAB)[0]["input_ids"]
    quantized = _load(base_dir, "nf4")
    reference = _logits_before_training(quantized, ids)
    model = get_peft_model(
        quantized,
        RilaLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, rila_config=settings),
    )
    assert pending_data_driven_adapters(model) == ["default"]

    class StepZero(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.pending = pending_data_driven_adapters(model)
            self.logits = _logits_before_training(model, ids)
            layer = model.base_model.model.model.layers[1].mlp.up_proj
            self.factors = (
                layer.lora_A["default"].weight.detach().clone(),
                layer.lora_B["default"].weight.detach().clone(),
            )

    args = quick_cpu_config(tmp_path / "out", max_steps=3, forget_loss="inverted_hinge", retain_loss="nll")
    forget = [{"text": t} for t in TINY_CORPUS[:2]]
    retain = [{"text": t} for t in TINY_CORPUS[2:4]]
    probe = StepZero()
    trainer = UnlearningTrainer(
        model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer, callbacks=[probe]
    )
    # the statistics the trainer's init uses, computed here from the same loaders (adapters are disabled inside)
    name = "model.layers.1.mlp.up_proj"
    stats = estimate_output_covariance(
        model, *trainer._fila_loaders(), target_modules=[name], pooling="token", show_progress=False
    )
    trainer.train()
    assert probe.pending == [] and trainer.fila_stats["default"]["num_layers"] == 14
    assert (trainer.fila_stats["default"]["f_count"], trainer.fila_stats["default"]["r_count"]) == (
        stats.f_count,
        stats.r_count,
    )
    dense = dense_weight(model.base_model.model.model.layers[1].mlp.up_proj.get_base_layer()).double()
    lora_a, lora_b = rila_init_layer(
        dense, stats.forget_covariance(name), stats.retain_covariance(name), 4, config=settings
    )
    projector = lora_b.double() @ lora_b.double().T  # Q is defined up to the signs of its columns
    torch.testing.assert_close(probe.factors[1].double() @ probe.factors[1].double().T, projector, atol=1e-4, rtol=0)
    torch.testing.assert_close(probe.factors[1].double().T @ dense, probe.factors[0].double(), atol=1e-4, rtol=1e-4)
    assert (probe.logits - reference).abs().max().item() <= 1e-5
    model.train()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=0, rtol=0)  # base untouched
    trained = _logits(model, ids)
    assert (trained - reference).abs().max().item() > 1e-3

    adapter_dir = tmp_path / "portable"
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 8
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_PEFT)
    run_python(
        [script, base_dir, adapter_dir, tmp_path / "ids.pt", tmp_path, "nf4"], cwd=tmp_path, expect="PLAIN_PEFT_OK"
    )
    assert (torch.load(tmp_path / "quantized.pt") - trained).abs().max().item() <= 1e-4


def test_output_covariance_pass_never_repacks_4bit_weights(base_dir):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at an eval-mode, no-grad forward (no gradient
    flows through it afterwards); the RILA/ROL statistics pass must not trigger that. Simulated on any CPU by
    claiming the instruction set: the pass keeps the 4-bit layers in train mode, so the repack never happens."""
    from peft_unlearn.fila import estimate_output_covariance

    model = get_peft_model(_load(base_dir, "nf4"), LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    model.train()
    estimate_output_covariance(model, random_lm_batches(2, seed=8, vocab_size=VOCAB), show_progress=False)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    assert all(layer.training for layer in layers) and model.training  # modes restored
