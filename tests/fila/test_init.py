"""FILA per-layer math against independent SVDs, and initialize_fila_weights on tiny models."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer

import peft_unlearn  # noqa: F401
from peft_unlearn.fila import (
    FilaConfig,
    FilaLoraConfig,
    estimate_fisher,
    fila_init_layer,
    initialize_fila_weights,
    pending_data_driven_adapters,
    preprocess_fila,
)
from peft_unlearn.testing import random_lm_batches, tiny_causal_lm

VOCAB = 320
TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_fc", "c_proj"], "gemma3": "all-linear"}


def _batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return random_lm_batches(n, seed=seed, vocab_size=VOCAB)


def _layers(model, adapter="default"):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def _reference(weight, importance, rank, eps):
    """Independent float64 weighted rank-r approximation diag(1/(w+eps)) U_r S_r V_r^T of diag(w) W."""
    w = importance.double().sum(1).sqrt()
    u, s, vh = torch.linalg.svd(w[:, None] * weight.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] / (w + eps)[:, None], w


# ----------------------------------------------------------------------------------------------------------------
# fila_init_layer
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_product_matches_exact_weighted_svd(shape):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    importance = torch.rand(shape, generator=gen) ** 2
    rank, scaling = 3, 2.0
    lora_a, lora_b = fila_init_layer(
        weight, importance, rank, scaling, config=FilaConfig(factor_scale="paper", exact_svd=True)
    )
    assert lora_a.shape == (rank, shape[1]) and lora_b.shape == (shape[0], rank)
    expected, w = _reference(weight, importance, rank, eps=1e-5)
    torch.testing.assert_close((scaling * lora_b @ lora_a).double(), expected, atol=1e-5, rtol=1e-5)
    assert (w >= 0).all()
    # A0 = (V sqrt(S/s))^T has orthogonal rows with squared norms S/s
    gram = lora_a @ lora_a.T
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-4, rtol=0)


def test_product_is_the_weighted_best_rank_r_approximation():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(10, 7, generator=gen, dtype=torch.float64)
    importance = torch.rand(10, 7, generator=gen, dtype=torch.float64) * 4 + 0.5
    rank = 2
    lora_a, lora_b = fila_init_layer(
        weight,
        importance,
        rank,
        1.0,
        config=FilaConfig(factor_scale="paper", exact_svd=True, eps=1e-12),
        lora_dtype=torch.float64,
    )
    w = importance.sum(1).sqrt()
    product = lora_b @ lora_a

    def weighted_error(m):
        return torch.linalg.norm(w[:, None] * (weight - m))

    singular = torch.linalg.svdvals(w[:, None] * weight)
    torch.testing.assert_close(weighted_error(product), singular[rank:].pow(2).sum().sqrt())  # Eckart-Young
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    pissa = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert weighted_error(product) < weighted_error(pissa)
    for _ in range(5):
        noisy = (lora_b + 1e-2 * torch.randn(lora_b.shape, generator=gen, dtype=torch.float64)) @ lora_a
        assert weighted_error(product) <= weighted_error(noisy)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_b0_forms_agree_under_exact_svd(shape):
    """Both B0 forms are the float64 weighted rank-r approximation when the SVD is exact."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=gen)
    importance = torch.rand(shape, generator=gen) ** 2
    expected, _ = _reference(weight, importance, 3, eps=1e-5)
    for form in ("projection", "official"):
        config = FilaConfig(factor_scale="paper", exact_svd=True, b0_form=form)
        lora_a, lora_b = fila_init_layer(weight, importance, 3, 2.0, config=config)
        torch.testing.assert_close((2.0 * lora_b @ lora_a).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_b0_forms_under_randomized_svd_match_their_float64_formulas(shape):
    """Under the randomized SVD (``U, S, V`` of ``torch.svd_lowrank`` with the config's seed): ``"official"`` is
    ``diag(1/(w+eps)) U S V^T``, ``"projection"`` is ``diag(w/(w+eps)) W V V^T`` (float64 formulas), the latter is
    at least as close to the weighted optimum. They agree when out < in (``svd_lowrank`` then finds the row space
    first and ``U`` from it, which is the projection) and differ when out > in (no spectral gap: an inexact SVD)."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(shape, generator=gen)
    importance = torch.rand(shape, generator=gen) ** 2 + 0.1
    rank, scaling, eps = 8, 2.0, 1e-5
    w = importance.sum(1).sqrt()
    state = torch.random.get_rng_state()
    torch.manual_seed(42)
    u, s, v = torch.svd_lowrank(w[:, None] * weight, q=rank, niter=2)
    torch.random.set_rng_state(state)
    u, s, v, w64, weight64 = u.double(), s.double(), v.double(), w.double(), weight.double()
    formulas = {
        "official": (u * s) @ v.T / (w64 + eps)[:, None],
        "projection": (w64 / (w64 + eps))[:, None] * weight64 @ v @ v.T,
    }
    products = {}
    for form, expected in formulas.items():
        config = FilaConfig(factor_scale="paper", exact_svd=False, b0_form=form, seed=42, niter=2)
        lora_a, lora_b = fila_init_layer(weight, importance, rank, scaling, config=config)
        products[form] = (scaling * lora_b @ lora_a).double()
        torch.testing.assert_close(products[form], expected, atol=1e-4, rtol=1e-4)

    def weighted_error(m):
        return torch.linalg.norm(w64[:, None] * (weight64 - m))

    assert weighted_error(products["projection"]) <= weighted_error(products["official"]) + 1e-6
    gap = torch.linalg.norm(products["projection"] - products["official"]) / torch.linalg.norm(products["official"])
    assert gap < 1e-4 if shape[0] < shape[1] else gap > 1e-2


def test_b0_form_validation():
    with pytest.raises(ValueError, match="b0_form"):
        FilaConfig(b0_form="u")


def test_constant_importance_gives_scaled_pissa():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(9, 6, generator=gen)
    importance = torch.full((9, 6), 1e-11)  # w = sqrt(6e-11) ~ 7.7e-6, comparable to eps = 1e-5
    rank, scaling, eps = 3, 2.0, 1e-5
    lora_a, lora_b = fila_init_layer(
        weight, importance, rank, scaling, config=FilaConfig(factor_scale="paper", exact_svd=True)
    )
    w = (6e-11) ** 0.5
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    pissa = (u[:, :rank] * s[:rank]) @ vh[:rank]
    torch.testing.assert_close((scaling * lora_b @ lora_a).double(), pissa * (w / (w + eps)), atol=1e-5, rtol=1e-4)
    assert w / (w + eps) < 0.5  # the factor is visible, the test can fail


def test_randomized_svd_is_seeded_and_leaves_global_rng_alone():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 30, generator=gen)
    importance = torch.rand(40, 30, generator=gen)
    config = FilaConfig(factor_scale="paper", exact_svd=False)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = fila_init_layer(weight, importance, 4, 2.0, config=config)
    assert torch.equal(torch.rand(3), expected_next)
    second = fila_init_layer(weight, importance, 4, 2.0, config=config)
    other_seed = fila_init_layer(
        weight, importance, 4, 2.0, config=FilaConfig(factor_scale="paper", exact_svd=False, seed=0)
    )
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other_seed[0])


def test_randomized_svd_close_to_exact_with_spectral_gap():
    gen = torch.Generator().manual_seed(4)
    left, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen))
    spectrum = torch.tensor([50.0, 40.0, 30.0] + [0.01] * 17)
    weight = (left[:, :20] * spectrum) @ right.T
    importance = torch.ones(30, 20)
    exact = fila_init_layer(weight, importance, 3, 1.0, config=FilaConfig(factor_scale="paper", exact_svd=True))
    approx = fila_init_layer(weight, importance, 3, 1.0, config=FilaConfig(factor_scale="paper", exact_svd=False))
    torch.testing.assert_close(approx[1] @ approx[0], exact[1] @ exact[0], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("exact", [True, False, "auto"])
def test_any_rank_up_to_min_dim(exact):
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(7, 5, generator=gen)
    importance = torch.rand(7, 5, generator=gen)
    for rank in range(1, 6):
        lora_a, lora_b = fila_init_layer(
            weight, importance, rank, 1.5, config=FilaConfig(factor_scale="paper", exact_svd=exact)
        )
        assert lora_a.shape == (rank, 5) and lora_b.shape == (7, rank)
        assert torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()
    # full rank reproduces the whole (weighted) matrix: W - s*B0A0 is ~0
    assert (weight - 1.5 * lora_b @ lora_a).abs().max() < 1e-3
    for bad in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="`rank` of layer must be an integer in \\[1, min\\(out, in\\)\\]"):
            fila_init_layer(weight, importance, bad, 1.0)


def test_zero_fisher_rows_are_finite():
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(8, 6, generator=gen)
    importance = torch.rand(8, 6, generator=gen)
    importance[[1, 4]] = 0.0
    for exact in (True, False):
        lora_a, lora_b = fila_init_layer(
            weight, importance, 3, 2.0, config=FilaConfig(factor_scale="paper", exact_svd=exact)
        )
        assert torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()
        assert torch.count_nonzero(lora_b[[1, 4]]) == 0  # rows without forget signal stay out of the adapter


def test_all_zero_fisher_falls_back_to_pissa_with_warning():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 5, generator=gen)
    with pytest.warns(UserWarning, match="every Fisher row weight of L is zero"):
        lora_a, lora_b = fila_init_layer(
            weight, torch.zeros(6, 5), 2, 1.0, config=FilaConfig(factor_scale="paper", exact_svd=True), layer_name="L"
        )
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    torch.testing.assert_close(lora_b @ lora_a, (u[:, :2] * s[:2]) @ vh[:2] / (1 + 1e-5), atol=1e-5, rtol=1e-5)


def test_row_weight_floor():
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(6, 4, generator=gen)
    importance = torch.rand(6, 4, generator=gen) + 0.1
    importance[2] = 0.0
    floor = 0.5
    lora_a, lora_b = fila_init_layer(
        weight, importance, 2, 1.0, config=FilaConfig(factor_scale="paper", exact_svd=True, row_weight_floor=floor)
    )
    w = importance.sum(1).sqrt()
    w_floored = w.clamp_min(floor * w.max())
    u, s, vh = torch.linalg.svd(w_floored[:, None] * weight, full_matrices=False)
    expected = (u[:, :2] * s[:2]) @ vh[:2] / (w_floored + 1e-5)[:, None]
    torch.testing.assert_close(lora_b @ lora_a, expected, atol=1e-5, rtol=1e-5)
    assert lora_b[2].abs().max() > 1e-3  # the floored row now enters the adapter


def test_dtypes_and_input_errors():
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(6, 4, generator=gen).to(torch.bfloat16)
    importance = torch.rand(6, 4, generator=gen)
    lora_a, lora_b = fila_init_layer(weight, importance, 2, 2.0, lora_dtype=torch.bfloat16)
    assert lora_a.dtype == lora_b.dtype == torch.bfloat16
    reference = fila_init_layer(weight.float(), importance, 2, 2.0)  # fp32 math inside, cast at the end
    torch.testing.assert_close(lora_a, reference[0].to(torch.bfloat16), atol=0, rtol=0)
    with pytest.raises(ValueError, match="`importance` of layer has shape"):
        fila_init_layer(weight, importance.T, 2, 1.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        fila_init_layer(weight[0], importance, 2, 1.0)
    with pytest.raises(ValueError, match="float tensor"):
        fila_init_layer(weight.to(torch.int32), importance, 2, 1.0)
    with pytest.raises(ValueError, match="`scaling`"):
        fila_init_layer(weight, importance, 2, 0.0)
    bad = importance.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        fila_init_layer(weight, bad, 2, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# initialize_fila_weights on tiny models
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_outputs_preserved_fp32(arch):
    model = tiny_causal_lm(arch, vocab_size=VOCAB)
    ids = _batches(1, 10)[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="fila")
    )
    info = initialize_fila_weights(peft_model, _batches(2, 11), _batches(2, 12), show_progress=False)
    assert pending_data_driven_adapters(peft_model) == []
    assert peft_model.peft_config["default"].init_lora_weights == "fila"
    layers = _layers(peft_model)
    assert info["num_layers"] == len(layers) > 0
    assert set(info) >= {"fisher_seconds", "svd_seconds", "seconds", "peak_memory_bytes", "num_layers", "f_count"}
    assert info["peak_memory_bytes"] > 0 and info["num_batches"] == 2
    for _, layer in layers:
        assert torch.count_nonzero(layer.lora_B["default"].weight) > 0  # the adapter is no longer a no-op
    base_weights = {n: p for n, p in peft_model.get_base_model().named_parameters() if "lora_" not in n}
    assert any(".base_layer." in n for n in base_weights)
    for name, param in base_weights.items():  # the base is never modified
        assert torch.equal(param, original[name.replace(".base_layer", "")]), name
    assert not any("offset" in key for key in peft_model.state_dict())  # non-persistent buffers
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
        assert (logits - reference).abs().max() <= 1e-5
        with peft_model.disable_adapter():  # the original model, exactly
            assert torch.equal(peft_model(input_ids=ids).logits, reference)


def test_outputs_preserved_bf16():
    """bf16: each layer's output base + s*BA is rounded to bf16 before the offset is subtracted, so logits
    move by about bf16 epsilon times the adapter's share of the output (seen: 0.5% of the logit range)."""
    model = tiny_causal_lm("llama", vocab_size=VOCAB, dtype=torch.bfloat16)
    ids = _batches(1, 13)[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="fila")
    )
    layer = _layers(peft_model)[0][1]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT autocasts bf16 adapters to fp32
    initialize_fila_weights(peft_model, _batches(2, 14), _batches(2, 15), show_progress=False)
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits.float()
    tolerance = 0.02 * reference.abs().max().item()  # documented bf16 tolerance: 2% of the logit range (seen: 0.5%)
    assert (logits - reference).abs().max().item() <= tolerance


def test_layer_by_layer_equals_fila_init_layer_and_conv1d_layout():
    from peft_unlearn.fila.offset import get_offset

    model = tiny_causal_lm("gpt2", vocab_size=VOCAB)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("attn.c_attn")}
    forget, retain = _batches(2, 16), _batches(2, 17)
    peft_model = get_peft_model(
        model, LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], init_lora_weights="fila")
    )
    stats = estimate_fisher(peft_model, forget, retain, show_progress=False)
    config = FilaConfig()
    initialize_fila_weights(peft_model, fisher=stats, show_progress=False)
    for name, layer in _layers(peft_model):
        short = name.removeprefix("base_model.model.")
        expected = fila_init_layer(
            originals[short].T, stats.layer_relative_importance(short, config.eps), 3, 2.0, config=config
        )
        assert torch.equal(layer.lora_A["default"].weight, expected[0])
        assert torch.equal(layer.lora_B["default"].weight, expected[1])
        assert torch.equal(layer.get_base_layer().weight, originals[short])  # Conv1D [in, out], untouched
        lora_a0, lora_b0 = get_offset(layer, "default")
        assert torch.equal(lora_a0, expected[0]) and torch.equal(lora_b0, expected[1])
        assert lora_a0.data_ptr() != layer.lora_A["default"].weight.data_ptr()  # a frozen copy


def test_fisher_path_and_cache_give_the_same_init(tmp_path):
    forget, retain = _batches(2, 18), _batches(2, 19)

    def build():
        return get_peft_model(
            tiny_causal_lm("llama", vocab_size=VOCAB),
            LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights="fila"),
        )

    first = build()
    cache = tmp_path / "fisher.safetensors"
    initialize_fila_weights(first, forget, retain, cache_path=cache, show_progress=False)
    second = build()
    initialize_fila_weights(second, fisher=cache, show_progress=False)
    for (_, a), (_, b) in zip(_layers(first), _layers(second)):
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)
        assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight)


def test_preprocess_fila_initialises_during_get_peft_model():
    forget, retain = _batches(2, 20), _batches(2, 21)
    config = FilaLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    base = tiny_causal_lm("llama", vocab_size=VOCAB)
    ids = forget[0]["input_ids"]
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    preprocess_fila(base, config, forget, retain, show_progress=False)
    direct = get_peft_model(base, config)
    assert pending_data_driven_adapters(direct) == []
    assert not any(hasattr(m, "_fila_importance") for m in direct.modules())
    with torch.no_grad():
        assert (direct(input_ids=ids).logits - reference).abs().max() <= 1e-4
    later = get_peft_model(tiny_causal_lm("llama", vocab_size=VOCAB), config)
    initialize_fila_weights(later, forget, retain, show_progress=False)
    for (_, a), (_, b) in zip(_layers(direct), _layers(later)):
        torch.testing.assert_close(a.lora_B["default"].weight, b.lora_B["default"].weight)
    with pytest.raises(ValueError, match="plain model before get_peft_model"):
        preprocess_fila(direct, config, forget)
    with pytest.raises(ValueError, match="must be 'fila'"):
        preprocess_fila(tiny_causal_lm("llama", vocab_size=VOCAB), LoraConfig(target_modules=["q_proj"]), forget)


def test_patch_free_path_with_default_init():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    ids = _batches(1, 22)[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["v_proj"]))
    initialize_fila_weights(peft_model, _batches(2, 23), show_progress=False)
    assert peft_model.peft_config["default"].init_lora_weights == "fila"
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - reference).abs().max() <= 1e-4


def test_near_zero_rows_warn():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"))
    stats = estimate_fisher(peft_model, _batches(1, 24), show_progress=False)
    name = stats.names[0]
    stats.importance_f[name][0] = 0.0
    with pytest.warns(UserWarning, match="near-\\)zero Fisher weight"):
        initialize_fila_weights(peft_model, fisher=stats, show_progress=False)
    assert torch.count_nonzero(stats.importance_f[name]) > 0  # a user-provided object is not consumed


def test_initialize_errors():
    batches = _batches(1, 25)
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    with pytest.raises(TypeError, match="must be a PeftModel"):
        initialize_fila_weights(model, batches)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"))
    with pytest.raises(ValueError, match="`adapter_name`='other' is not an adapter"):
        initialize_fila_weights(peft_model, batches, adapter_name="other")
    with pytest.raises(ValueError, match="needs `forget_dataloader`"):
        initialize_fila_weights(peft_model)
    with pytest.raises(TypeError, match="`fisher` must be"):
        initialize_fila_weights(peft_model, fisher={"a": 1})
    partial = estimate_fisher(
        tiny_causal_lm("llama", vocab_size=VOCAB),
        batches,
        target_modules=["model.layers.0.self_attn.q_proj"],
        show_progress=False,
    )
    with pytest.raises(ValueError, match="lack 1 layer"):
        initialize_fila_weights(peft_model, fisher=partial)
    initialize_fila_weights(peft_model, batches, show_progress=False)
    with pytest.raises(ValueError, match="already initialised .* would discard"):
        initialize_fila_weights(peft_model, batches, show_progress=False)

    gaussian = get_peft_model(
        tiny_causal_lm("llama", vocab_size=VOCAB),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"),
    )
    with pytest.raises(ValueError, match="init_lora_weights='gaussian'"):
        initialize_fila_weights(gaussian, batches)
    trained = get_peft_model(tiny_causal_lm("llama", vocab_size=VOCAB), LoraConfig(r=2, target_modules=["q_proj"]))
    for _, layer in _layers(trained):
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    with pytest.raises(ValueError, match="non-zero lora_B"):
        initialize_fila_weights(trained, batches)
    embedding = get_peft_model(
        tiny_causal_lm("llama", vocab_size=VOCAB), LoraConfig(r=2, target_modules=["embed_tokens"])
    )
    with pytest.raises(ValueError, match="Embedding"):
        initialize_fila_weights(embedding, batches, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rank_too_big = get_peft_model(
            tiny_causal_lm("llama", vocab_size=VOCAB),
            LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="fila"),
        )
    with pytest.raises(ValueError, match="`rank` of model.layers.0.self_attn.q_proj must be an integer in \\[1, min"):
        initialize_fila_weights(rank_too_big, batches, show_progress=False)


def test_two_fila_adapters_on_one_layer_keep_outputs_and_switch():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    ids = _batches(1, 26)[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila"))
    initialize_fila_weights(peft_model, _batches(2, 27), show_progress=False)
    peft_model.add_adapter("second", LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="fila"))
    initialize_fila_weights(peft_model, _batches(2, 28), adapter_name="second", show_progress=False)
    with torch.no_grad():
        for adapter in ("default", "second"):
            peft_model.set_adapter(adapter)
            assert (peft_model(input_ids=ids).logits - reference).abs().max() <= 1e-5
        peft_model.base_model.set_adapter(["default", "second"])  # both active: both offsets apply
        assert (peft_model(input_ids=ids).logits - reference).abs().max() <= 1e-5


def test_merge_unmerge_and_mixed_batch_with_offset():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    ids = _batches(1, 29)[0]["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights="fila")
    )
    initialize_fila_weights(peft_model, _batches(2, 30), show_progress=False)
    peft_model.eval()
    with torch.no_grad():
        for _, layer in _layers(peft_model):  # move the trainable factors away from their initial values
            layer.lora_B["default"].weight.add_(0.5)
        trained = peft_model(input_ids=ids).logits
        assert (trained - reference).abs().max() > 1e-3
        peft_model.merge_adapter()  # W + s*B*A - s*B0*A0
        torch.testing.assert_close(peft_model(input_ids=ids).logits, trained, atol=1e-5, rtol=1e-5)
        peft_model.unmerge_adapter()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, trained, atol=1e-5, rtol=1e-5)
        for name, param in peft_model.get_base_model().named_parameters():
            if "lora_" not in name:
                torch.testing.assert_close(param, original[name.replace(".base_layer", "")], atol=1e-6, rtol=0)
        both = torch.cat([ids[:1], ids[:1]])
        mixed = peft_model(input_ids=both, adapter_names=["default", "__base__"]).logits
        torch.testing.assert_close(mixed[0], trained[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed[1], reference[0], atol=1e-5, rtol=1e-5)


def test_deepcopy_and_device_moves_keep_the_offset():
    import copy

    peft_model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=VOCAB), LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="fila")
    )
    initialize_fila_weights(peft_model, _batches(2, 31), show_progress=False)
    ids = _batches(1, 32)[0]["input_ids"]
    with torch.no_grad():
        for _, layer in _layers(peft_model):
            layer.lora_B["default"].weight.mul_(2.0)
        expected = peft_model(input_ids=ids).logits
        clone = copy.deepcopy(peft_model)
        torch.testing.assert_close(clone(input_ids=ids).logits, expected, atol=0, rtol=0)
        moved = clone.to(torch.float64)  # buffers follow .to()
        layer = _layers(moved)[0][1]
        assert layer.fila_offset_A["default"].dtype == torch.float64
        torch.testing.assert_close(moved(input_ids=ids).logits.float(), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# factor_scale
# ----------------------------------------------------------------------------------------------------------------


def _lora_products(model) -> dict[str, torch.Tensor]:
    return {
        n: (m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().clone()
        for n, m in _layers(model)
    }


def _first_adamw_step(model, batch, lr) -> dict[str, float]:
    """||delta(s B A)||_F per layer after one AdamW step (no weight decay) on the LM loss."""
    before = _lora_products(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    after = _lora_products(model)
    return {n: float((after[n] - before[n]).norm()) for n in before}


def _fila_model(arch, factor_scale, seed=0):
    model = tiny_causal_lm(arch, vocab_size=VOCAB, seed=seed)
    config = FilaLoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS[arch],
        fila_config=FilaConfig(factor_scale=factor_scale),
    )
    peft_model = get_peft_model(model, config)
    initialize_fila_weights(peft_model, _batches(2, 21), _batches(2, 22), show_progress=False)
    return peft_model


@pytest.mark.parametrize("factor_scale", ["paper", "stable", 0.1, 3])
def test_factor_scale_keeps_outputs_and_scales_the_factors(factor_scale):
    ids = _batches(1, 20)[0]["input_ids"]
    with torch.no_grad():
        reference = tiny_causal_lm("llama", vocab_size=VOCAB)(input_ids=ids).logits
    paper = _fila_model("llama", "paper")
    scaled = _fila_model("llama", factor_scale)
    with torch.no_grad():
        assert (scaled(input_ids=ids).logits - reference).abs().max() <= 1e-4
    for (_, a), (_, b) in zip(_layers(paper), _layers(scaled), strict=True):
        a0, b0 = a.lora_A["default"].weight.detach(), a.lora_B["default"].weight.detach()
        ca, cb = b.lora_A["default"].weight.detach(), b.lora_B["default"].weight.detach()
        ratio = float(ca.norm() / a0.norm())
        assert ratio == pytest.approx(float(cb.norm() / b0.norm()), rel=1e-5)  # one c for both factors
        if factor_scale == "paper":
            assert ratio == pytest.approx(1.0)
        elif factor_scale != "stable":
            assert ratio == pytest.approx(float(factor_scale), rel=1e-5)
        else:  # the documented formula, evaluated independently
            out_f, r = b0.shape[0], b0.shape[1]
            in_f = a0.shape[1]
            expected = (out_f * r / 3) ** 0.5 / (out_f**0.5 * float(a0.norm()) + in_f**0.5 * float(b0.norm()))
            assert ratio == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stable_factor_scale_matches_default_lora_first_step(arch):
    """Measured on the tiny models: the ratio per layer is 0.77-1.07 (llama) and 0.85-0.96 (gpt2)."""
    batch, lr = _batches(1, 23)[0], 1e-3
    torch.manual_seed(0)
    lora = get_peft_model(
        tiny_causal_lm(arch, vocab_size=VOCAB),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[arch]),
    )
    lora_step = _first_adamw_step(lora, batch, lr)
    stable_step = _first_adamw_step(_fila_model(arch, "stable"), batch, lr)
    ratios = {n: stable_step[n] / lora_step[n] for n in lora_step}
    assert ratios and all(0.5 <= q <= 2.0 for q in ratios.values()), ratios


def test_factor_scale_validation():
    assert FilaConfig(factor_scale="STABLE").factor_scale == "stable"
    assert FilaConfig(factor_scale=2).factor_scale == 2.0
    assert FilaConfig.from_value({"factor_scale": 0.5}).factor_scale == 0.5
    for bad in ("huge", 0, -1.0, float("inf"), float("nan"), True, None, [1.0]):
        with pytest.raises(ValueError, match="`factor_scale` must be 'paper', 'stable' or a positive"):
            FilaConfig(factor_scale=bad)
    with pytest.raises(ValueError, match="factor_scale"):
        FilaLoraConfig(r=2, target_modules=["q_proj"], fila_config={"factor_scale": "big"})


# ----------------------------------------------------------------------------------------------------------------
# the data-driven init dispatcher ("fila" / "vila")
# ----------------------------------------------------------------------------------------------------------------


def test_initialize_adapter_weights_dispatches_on_the_init_name(monkeypatch):
    import sys
    import types

    from peft_unlearn.fila import DATA_DRIVEN_INITS, initialize_adapter_weights, is_data_driven_init

    assert DATA_DRIVEN_INITS == ("fila", "vila", "rila")
    assert is_data_driven_init("VILA") and not is_data_driven_init("pissa") and not is_data_driven_init(True)
    forget, retain = _batches(2, 40), _batches(2, 41)
    fila_model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=VOCAB), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila")
    )
    info = initialize_adapter_weights(fila_model, forget, retain, show_progress=False)
    assert info["num_layers"] == 2 and pending_data_driven_adapters(fila_model) == []

    vila_model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=VOCAB), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="vila")
    )
    assert pending_data_driven_adapters(vila_model) == ["default"]  # marked pending like FILA
    calls = []

    def fake_vila(peft_model, forget_dataloader, retain_dataloader, adapter_name="default", **kwargs):
        calls.append((peft_model, forget_dataloader, retain_dataloader, adapter_name, kwargs))
        return {"num_layers": -1}

    monkeypatch.setitem(
        sys.modules, "peft_unlearn.fila.vila", types.SimpleNamespace(initialize_vila_weights=fake_vila)
    )
    assert initialize_adapter_weights(vila_model, forget, retain, max_batches=3) == {"num_layers": -1}
    assert calls == [(vila_model, forget, retain, "default", {"max_batches": 3})]
    monkeypatch.delitem(sys.modules, "peft_unlearn.fila.vila")
    monkeypatch.setattr("importlib.import_module", lambda name: (_ for _ in ()).throw(ImportError("no vila")))
    with pytest.raises(ValueError, match="init_lora_weights='vila' needs peft_unlearn.fila.vila"):
        initialize_adapter_weights(vila_model, forget, retain)
    with pytest.raises(ValueError, match="not a data-driven LoRA init"):
        initialize_adapter_weights(
            get_peft_model(tiny_causal_lm("llama", vocab_size=VOCAB), LoraConfig(r=2, target_modules=["q_proj"])),
            forget,
        )


def test_vila_adapter_initialised_by_fila_weights_keeps_its_name():
    """VILA computes its own importance and calls initialize_fila_weights(fisher=...): the config stays 'vila'."""
    peft_model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=VOCAB), LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="vila")
    )
    stats = estimate_fisher(peft_model, _batches(1, 42), show_progress=False)
    initialize_fila_weights(peft_model, fisher=stats, show_progress=False)
    assert peft_model.peft_config["default"].init_lora_weights == "vila"
    assert pending_data_driven_adapters(peft_model) == []


def test_fisher_options_are_checked_before_the_fisher_pass():
    model = get_peft_model(
        tiny_causal_lm("llama", vocab_size=64), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="fila")
    )
    batches = random_lm_batches(1, 1, vocab_size=64)
    with pytest.raises(ValueError, match=r"unknown keys \['max_batch'\]"):
        initialize_fila_weights(model, batches, fisher_options={"max_batch": 3}, show_progress=False)
    with pytest.raises(TypeError, match="fisher_options"):
        initialize_fila_weights(model, batches, fisher_options=["cpu"], show_progress=False)
    info = initialize_fila_weights(model, batches, fisher_options={"accumulator_device": "cpu"}, show_progress=False)
    assert info["num_layers"] == 2
