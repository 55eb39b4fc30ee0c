"""`evaluate_robustness`: every attack's numbers against a brute-force recomputation, a recovering attack reported
as such, the user's model left unchanged, bad inputs refused before any work."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_unlearn.metrics import RobustnessReport, evaluate_robustness, register_attack
from peft_unlearn.metrics.robustness import ROBUSTNESS_ATTACKS
from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer

VOCAB = 320
LENGTH = 20
FAST = {"el_n": 2, "el_prefix_stride": 4, "max_length": 32}


def _passages(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, VOCAB, (LENGTH - 1,), generator=gen).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def memorized():
    """A tiny LM that memorized 6 passages, and a LoRA that made it forget the first 4 (gradient ascent)."""
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=64)
    passages = _passages(6, seed=1)
    ids = torch.tensor(passages)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    forget, heldout = passages[:4], passages[4:]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    optimizer = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=3e-3)
    forget_ids = torch.tensor(forget)
    for _ in range(60):
        if _ma(peft, forget) < 0.2:
            break
        peft.train()
        optimizer.zero_grad()
        (-peft(input_ids=forget_ids, labels=forget_ids).loss).backward()
        optimizer.step()
    peft.eval()
    with peft.disable_adapter():
        assert _ma(peft, forget) > 0.9 and _ma(peft, heldout) > 0.9
    assert _ma(peft, forget) < 0.3
    return peft, forget, heldout


# ----------------------------------------------------------------------------------------------
# brute-force references (one sequence at a time, float64)
# ----------------------------------------------------------------------------------------------
def _logits(model, seq):
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq])).logits[0].double()


def _ma_one(model, seq, first=1):
    pred = _logits(model, seq).argmax(-1)
    hits = [int(pred[t - 1]) == seq[t] for t in range(max(1, first), len(seq))]
    return sum(hits) / len(hits)


def _ma(model, seqs, first=1):
    was = model.training
    model.eval()
    out = sum(_ma_one(model, s, first) for s in seqs) / len(seqs)
    model.train(was)
    return out


def _greedy(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(_logits(model, seq)[-1].argmax()))
    return seq[len(prompt) :]


def _overlap(cont, ref, n):
    ref_grams = [tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)]
    hits = sum(tuple(cont[i : i + n]) in set(ref_grams) for i in range(len(cont) - n + 1))
    return hits / len(ref_grams)


def _el(model, seqs, n, stride, first=1):
    model.eval()
    per = []
    for seq in seqs:
        ts = range(first, len(seq) - n + 1, stride)
        per.append(sum(_overlap(_greedy(model, seq[:t], len(seq) - t), seq[t:], n) for t in ts) / len(ts))
    return sum(per) / len(per)


def _row(report, **match):
    (row,) = report.select(**match)
    return row


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------
def test_before_and_export_match_brute_force(memorized, tokenizer):
    """Before: the user's model with and without its adapters; export: identical forgetting after both reloads."""
    model, forget, heldout = memorized
    report = evaluate_robustness(model, tokenizer, forget, heldout=heldout, attacks=["export"], **FAST)
    with model.disable_adapter():
        base_ma, base_el = _ma(model, forget), _el(model, forget, 2, 4)
    for variant in ("merged reload", "portable adapter"):
        ma = _row(report, attack="export", variant=variant, set="forget", metric="ma")
        assert ma.unlearned_before == pytest.approx(_ma(model, forget), abs=1e-9)
        assert ma.base_before == pytest.approx(base_ma, abs=1e-9)
        assert ma.unlearned_after == pytest.approx(ma.unlearned_before, abs=1e-6)
        el = _row(report, attack="export", variant=variant, set="forget", metric="el2")
        assert el.unlearned_before == pytest.approx(_el(model, forget, 2, 4), abs=1e-9)
        assert el.base_before == pytest.approx(base_el, abs=1e-9)
        held = _row(report, attack="export", variant=variant, set="heldout", metric="ma")
        assert held.unlearned_after == pytest.approx(_ma(model, heldout), abs=1e-9)
    assert not report.recovered()["export/merged reload"]


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_quantization_matches_brute_force(memorized, tokenizer, tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    model, forget, heldout = memorized
    report = evaluate_robustness(
        model,
        tokenizer,
        forget,
        heldout=heldout,
        attacks=["quantization"],
        quantization_modes=(mode,),
        work_dir=tmp_path,
        # LLM.int8 picks its fp16 outlier columns from the whole batch, so an int8 forward depends on the batch it
        # is in; one sequence per pass makes the library's computation the brute force's (which runs one by one)
        batch_size=1 if mode == "int8" else 8,
        **FAST,
    )
    if mode == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=torch.float32)
    for which, field in (("unlearned", "unlearned_after"), ("base", "base_after")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / which, quantization_config=quant).eval()
            ma, el = _ma(loaded, forget), _el(loaded, forget, 2, 4)
            held = _ma(loaded, heldout)
        assert getattr(_row(report, variant=mode, set="forget", metric="ma"), field) == pytest.approx(ma, abs=1e-9)
        assert getattr(_row(report, variant=mode, set="forget", metric="el2"), field) == pytest.approx(el, abs=1e-9)
        assert getattr(_row(report, variant=mode, set="heldout", metric="ma"), field) == pytest.approx(held, abs=1e-9)
    row = _row(report, variant=mode, set="forget", metric="ma")
    expected = (row.unlearned_after - row.unlearned_before) / (row.base_before - row.unlearned_before)
    assert row.gap_recovery == pytest.approx(expected)
    expected = (row.unlearned_after - row.unlearned_before) / (row.base_after - row.unlearned_before)
    assert row.reference_recovery == pytest.approx(expected)


def test_relearning_matches_brute_force(memorized, tokenizer, tmp_path):
    """An independent relearning loop (seeded LoRA, AdamW, plain cross-entropy, passages cycled in order)."""
    model, forget, _ = memorized
    lr, steps = 5e-3, (2, 4)
    report = evaluate_robustness(
        model,
        tokenizer,
        forget,
        attacks=["relearning"],
        relearn_steps=steps,
        relearn_learning_rate=lr,
        relearn_batch_size=1,
        relearn_rank=2,
        work_dir=tmp_path,
        **FAST,
    )
    chosen = report.settings["relearn_split"]
    train = [forget[i] for i in chosen]
    unseen = [forget[i] for i in range(len(forget)) if i not in chosen]
    assert len(train) == 2 and len(unseen) == 2
    for which, field in (("unlearned", "unlearned_after"), ("base", "base_after")):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(tmp_path / which)
        lm = get_peft_model(lm, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for step in range(1, max(steps) + 1):
            lm.train()
            ids = torch.tensor([train[(step - 1) % len(train)]])
            logits = lm(input_ids=ids).logits
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in steps:
                got = _row(report, variant=f"steps={step}", set="forget_unseen", metric="ma")
                assert getattr(got, field) == pytest.approx(_ma(lm, unseen), abs=1e-6)
                got = _row(report, variant=f"steps={step}", set="forget_relearned", metric="ma")
                assert getattr(got, field) == pytest.approx(_ma(lm, train), abs=1e-6)
    zero = _row(report, variant="steps=0", set="forget_unseen", metric="ma")
    assert zero.unlearned_after == zero.unlearned_before == pytest.approx(_ma(model, unseen), abs=1e-9)


def test_prompt_variants_match_brute_force(memorized, tokenizer):
    model, forget, heldout = memorized
    report = evaluate_robustness(
        model,
        tokenizer,
        forget,
        heldout=heldout,
        attacks=["prompt"],
        prefix_offsets=(3,),
        prefix_lengths=(6,),
        few_shot=1,
        **FAST,
    )
    shifted = [[s[0], *s[4:]] for s in forget]  # BOS kept, 3 tokens dropped
    row = _row(report, variant="offset=3", metric="ma")
    assert row.unlearned_after == pytest.approx(_ma(model, shifted), abs=1e-9)
    with model.disable_adapter():
        assert row.base_after == pytest.approx(_ma(model, shifted), abs=1e-9)
        base_prefix_el = sum(_overlap(_greedy(model, s[:6], LENGTH - 6), s[6:], 2) for s in forget) / len(forget)
    assert _row(report, variant="offset=3", metric="el2").unlearned_after == pytest.approx(
        _el(model, shifted, 2, 4), abs=1e-9
    )
    # fixed prefix: MA after the prefix, EL of the one continuation from the prefix
    assert _row(report, variant="prefix=6", metric="ma").unlearned_after == pytest.approx(
        _ma(model, forget, first=6), abs=1e-9
    )
    el = sum(_overlap(_greedy(model, s[:6], LENGTH - 6), s[6:], 2) for s in forget) / len(forget)
    assert _row(report, variant="prefix=6", metric="el2").unlearned_after == pytest.approx(el, abs=1e-9)
    assert _row(report, variant="prefix=6", metric="el2").base_after == pytest.approx(base_prefix_el, abs=1e-9)
    # few-shot: one heldout passage (without its BOS) in front, only the passage scored
    prefixed = [[1, *heldout[i % 2][1:], *s[1:]] for i, s in enumerate(forget)]
    start = LENGTH  # the first scored token: the passage's first token after BOS + prefix
    assert _row(report, variant="few-shot=1", metric="ma").unlearned_after == pytest.approx(
        _ma(model, prefixed, first=start), abs=1e-9
    )


# ----------------------------------------------------------------------------------------------
# verdicts, the user's model, the report
# ----------------------------------------------------------------------------------------------
def test_relearning_the_forget_text_is_reported_as_recovered(memorized, tokenizer):
    """Relearning on the whole forget text ("related" = the forget set itself) brings it back: reported."""
    model, forget, _ = memorized
    before = _state(model)
    report = evaluate_robustness(
        model,
        tokenizer,
        forget,
        attacks=["relearning"],
        related=forget,
        relearn_steps=(40,),
        relearn_learning_rate=1e-2,
        **FAST,
    )
    row = _row(report, variant="related steps=40", set="forget", metric="ma")
    assert row.unlearned_after > 0.8 and row.gap_recovery > 0.5
    assert report.recovered()["relearning/related steps=40"] is True
    assert not report.held()
    assert "relearning/related steps=40" in report.to_markdown()
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_model_unchanged_and_report_round_trip(memorized, tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, forget, heldout = memorized
    before, trainable = _state(model), [n for n, p in model.named_parameters() if p.requires_grad]
    model.train()
    report = evaluate_robustness(
        model,
        tokenizer,
        forget,
        heldout=heldout,
        quantization_modes=("nf4",),
        relearn_steps=(1,),
        prefix_offsets=(2,),
        prefix_lengths=(4,),
        few_shot=1,
        **FAST,
    )
    assert model.training
    model.eval()
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainable == [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert {r.attack for r in report.rows} == set(ROBUSTNESS_ATTACKS) - {"test-only"}
    assert all(math.isfinite(r.unlearned_after) for r in report.rows)
    # JSON round trip, and the base numbers of a report reused as the reference
    again = RobustnessReport.from_dict(report.to_dict())
    assert [(r.attack, r.variant, r.set, r.metric) for r in again.rows] == [
        (r.attack, r.variant, r.set, r.metric) for r in report.rows
    ]
    reused = evaluate_robustness(
        model,
        tokenizer,
        forget,
        heldout=heldout,
        attacks=["quantization", "prompt"],
        quantization_modes=("nf4",),
        relearn_steps=(1,),
        prefix_offsets=(2,),
        prefix_lengths=(4,),
        few_shot=1,
        reference=again,
        **FAST,
    )
    for row in reused.rows:
        ref = _row(report, attack=row.attack, variant=row.variant, set=row.set, metric=row.metric)
        assert row.base_before == pytest.approx(ref.base_before, nan_ok=True)
        assert row.base_after == pytest.approx(ref.base_after, nan_ok=True)
        assert row.unlearned_after == pytest.approx(ref.unlearned_after, nan_ok=True)
    text = report.to_markdown()
    assert "### quantization" in text and "quantized base" in text
    assert "quantization/nf4/forget" in report.to_text()


def test_custom_attack_and_plain_model_with_base(memorized, tokenizer):
    model, forget, _ = memorized

    @register_attack("test-only")
    def no_op(ctx):
        return ctx.rows("test-only", "none", ctx.score(ctx.load("unlearned"), {"forget": ctx.sets["forget"]}), None)

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_attack("test-only", no_op)
        merged = copy.deepcopy(model).merge_and_unload()
        base = copy.deepcopy(model).unload()
        report = evaluate_robustness(merged, tokenizer, forget, attacks=["test-only"], base_model=base, **FAST)
        row = _row(report, metric="ma")
        assert row.unlearned_after == pytest.approx(_ma(model, forget), abs=1e-6)
        assert row.base_before == pytest.approx(_ma(base, forget), abs=1e-9)
    finally:
        ROBUSTNESS_ATTACKS.pop("test-only", None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attacks": ["quantisation"]}, "`attacks`"),
        ({"forget": []}, "`forget` is empty"),
        ({"forget": "one text"}, "single string"),
        ({"forget": [[1, 5, 6, 7]], "attacks": ["relearning"]}, "at least 2 forget passages"),
        ({"relearn_steps": (5, 1)}, "`relearn_steps`"),
        ({"relearn_steps": (0, 5)}, "`relearn_steps`"),
        ({"relearn_fraction": 1.0}, "`relearn_fraction`"),
        ({"quantization_modes": ("nf3",)}, "`quantization_modes`"),
        ({"tokenizer": None}, "`tokenizer`"),
        ({"plain": True}, "`base_model="),
        ({"prefix_offsets": (0,)}, "`prefix_offsets`"),
        ({"few_shot": -1}, "`few_shot`"),
        ({"recovery_threshold": 0.0}, "`recovery_threshold`"),
        ({"forget": [[1]]}, "fewer than 2 tokens"),
    ],
)
def test_bad_inputs_fail_before_any_work(memorized, tokenizer, tmp_path, kwargs, match):
    model, forget, _ = memorized
    kwargs = dict(kwargs)
    if kwargs.pop("plain", False):
        model = model.get_base_model()
    call = {"model": model, "tokenizer": tokenizer, "forget": forget, "work_dir": tmp_path / "work", **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        evaluate_robustness(**call)
    assert not (tmp_path / "work").exists()


def test_reference_with_other_settings_is_refused(memorized, tokenizer):
    model, forget, _ = memorized
    report = evaluate_robustness(model, tokenizer, forget, attacks=["export"], **FAST)
    with pytest.raises(ValueError, match="`reference` was measured with other settings"):
        evaluate_robustness(model, tokenizer, forget[:3], attacks=["export"], reference=report, **FAST)


def test_export_of_a_fila_adapter_is_identical(memorized, tokenizer):
    """A FILA adapter (offset ``- s B0 A0``) merges and exports to the portable rank-2r LoRA without any change."""
    from peft_unlearn.fila import FisherStatistics, initialize_fila_weights
    from peft_unlearn.fila.state import iter_lora_layers

    base, forget, heldout = memorized
    with base.disable_adapter():
        plain = copy.deepcopy(base).unload()
    model = get_peft_model(plain, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights="fila"))
    gen = torch.Generator().manual_seed(0)
    importance = {
        name: torch.rand(
            layer.lora_B["default"].weight.shape[0], layer.lora_A["default"].weight.shape[1], generator=gen
        )
        for name, layer in iter_lora_layers(model, "default")
    }
    initialize_fila_weights(model, fisher=FisherStatistics(importance, f_count=1), show_progress=False)
    with torch.no_grad():  # stand-in for training
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    report = evaluate_robustness(model, tokenizer, forget, heldout=heldout, attacks=["export"], **FAST)
    assert any(abs(r.unlearned_before - r.base_before) > 1e-3 for r in report.rows)  # the adapter matters
    for row in report.rows:
        assert abs(row.delta) <= 1e-6, row
