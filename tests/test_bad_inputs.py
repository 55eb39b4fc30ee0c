"""Bad and unusual inputs: every case fails early and clearly, loses nothing, and never reports a broken success.

One place for the cases a new user hits (tiny offline models from `peft_unlearn.testing` only): user files in
save folders, non-finite settings and divergent training, boundary errors (vocabulary, lengths, paths, corrupt
files, network), ignored options, empty evaluation sets, and the PrivLeak / EL conventions. Each test fails on
the code before the corresponding fix.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from peft_unlearn.metrics import evaluate_memorization, extraction_likelihood, memorization_accuracy, privleak
from peft_unlearn.metrics.mia import min_k_prob_scores
from peft_unlearn.save_policy import SaveConflictError, is_ours, remove_if_ours, staged_save
from peft_unlearn.testing import TINY_CORPUS, tiny_causal_lm
from peft_unlearn.trainer import UnlearningConfig, UnlearningTrainer
from peft_unlearn.trainer.finite_guard import NonFiniteTrainingError
from peft_unlearn.trainer.run_checks import CorruptCheckpointError
from peft_unlearn.trainer.saving import HubConnectionError
from tests.helpers import quick_cpu_config

FORGET = [{"text": t} for t in TINY_CORPUS[:4]]
RETAIN = [{"text": t} for t in TINY_CORPUS[4:]]


def _args(output_dir, **kwargs) -> UnlearningConfig:
    return quick_cpu_config(str(output_dir), **{"max_steps": 2, "learning_rate": 1e-3, "seed": 0, **kwargs})


def _lora(**kwargs) -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", **kwargs)


def _trainer(tokenizer, output_dir, model=None, peft=True, **kwargs) -> UnlearningTrainer:
    data = {
        "forget_dataset": kwargs.pop("forget_dataset", FORGET),
        "retain_dataset": kwargs.pop("retain_dataset", RETAIN),
    }
    extra = {k: kwargs.pop(k) for k in ("ref_model", "eval_dataset") if k in kwargs}
    return UnlearningTrainer(
        model=model if model is not None else tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args=_args(output_dir, **kwargs),
        processing_class=tokenizer,
        peft_config=_lora() if peft else None,
        **data,
        **extra,
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_files(folder: Path, files: dict[str, str]) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return _snapshot(folder)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_privleak_follows_muse_sign_and_denominator():
    # (AUC_retain - AUC) / (1 - AUC_retain) * 100; leakage is negative, an un-unlearned model scores ~ -100
    assert privleak(0.9, 0.7) == pytest.approx(-200 / 3)
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert privleak(0.4, 0.6) == pytest.approx(50.0)


def test_privleak_retain_auc_one_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`retain_auc` is 1.*denominator"):
        privleak(0.8, 1.0)


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.2, True, "0.5"])
def test_privleak_rejects_non_auc_values(bad):
    with pytest.raises(ValueError, match="must be an AUC in \\[0, 1\\]"):
        privleak(bad, 0.5)


def test_empty_evaluation_set_raises_instead_of_nan(tiny_llama):
    with pytest.raises(ValueError, match="`data` is empty"):
        evaluate_memorization(tiny_llama, [])
    with pytest.raises(ValueError, match="`data` is empty"):
        min_k_prob_scores(tiny_llama, [])
    with pytest.raises(ValueError, match="`input_ids` is empty"):
        memorization_accuracy(tiny_llama, torch.zeros(0, 5, dtype=torch.long))


def test_el_stop_at_eos_without_an_eos_id_is_a_clear_error(tiny_llama):
    tiny_llama.config.eos_token_id = None
    tiny_llama.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="eos_token_id=tokenizer.eos_token_id"):
        extraction_likelihood(tiny_llama, [[5, 6, 7, 8]], n=2, stop_at_eos=True)
    assert not math.isnan(extraction_likelihood(tiny_llama, [[5, 6, 7, 8]], n=2, stop_at_eos=True, eos_token_id=3))


# --------------------------------------------------------------------------------------------------
# Configuration: non-finite settings, ignored options
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("retain_weight", float("inf")),
        ("forget_weight", float("inf")),
        ("forget_weight", float("nan")),
        ("learning_rate", float("inf")),
        ("learning_rate", float("nan")),
        ("beta", float("inf")),
        ("simnpo_delta", float("nan")),
        ("max_grad_norm", float("nan")),
        ("weight_decay", float("inf")),
        ("adam_epsilon", float("nan")),
        ("num_train_epochs", float("inf")),
    ],
)
def test_config_rejects_non_finite_settings(tmp_path, field, value):
    kwargs = (
        {"forget_loss": "npo"} if field == "beta" else {"forget_loss": "simnpo"} if field == "simnpo_delta" else {}
    )
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number, got {value!r}"):
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", **kwargs, **{field: value})


def test_config_rejects_a_negative_learning_rate(tmp_path):
    with pytest.raises(ValueError, match="`learning_rate` must be >= 0"):
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", learning_rate=-1e-4)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"forget_loss": "inverted_hinge", "beta": 0.3}, "`beta`=0.3 is ignored"),
        ({"forget_loss": "npo", "simnpo_delta": 0.5}, "`simnpo_delta`=0.5 is ignored"),
        ({"retain_loss": "nll", "kl_mask": "none"}, "`kl_mask`='none' is ignored"),
        ({"retain_loss": None, "retain_weight": 2.0}, "`retain_weight`=2.0 is ignored"),
        ({"forget_loss": "npo", "idk_answers": ["No idea."]}, "`idk_answers` is ignored"),
        ({"completion_only_loss": False, "assistant_turns": "last"}, "`assistant_turns`='last' is ignored"),
        ({"eval_compute_el": False, "eval_el_n": [5]}, "eval_compute_el=False skips EL"),
        ({"forget_loss": "npo", "rmu_layer": 1}, "`rmu_layer`=1 is ignored"),
        ({"rmu_steering_coeff": 3.0}, "`rmu_steering_coeff`=3.0 is ignored"),
    ],
)
def test_config_warns_about_options_the_mode_ignores(tmp_path, kwargs, fragment):
    with pytest.warns(UserWarning, match=fragment):
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_config_used_options_do_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", forget_loss="simnpo", beta=3.0, simnpo_delta=0.1)
        UnlearningConfig(output_dir=str(tmp_path), report_to="none", retain_loss="kl", kl_mask="none")


def test_trainer_warns_about_fila_and_retain_options_it_ignores(tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="`fila_seed` ignored: the model has no FILA adapter"):
        _trainer(tokenizer, tmp_path / "out", fila_seed=3)
    with pytest.warns(UserWarning, match="`retain_pairing` ignored: the run has no retain data"):
        _trainer(tokenizer, tmp_path / "out", retain_loss=None, retain_dataset=None, retain_pairing="cycle")


# --------------------------------------------------------------------------------------------------
# Training to NaN
# --------------------------------------------------------------------------------------------------


def _nan_after(trainer, step: int):
    """Make compute_loss return NaN from optimizer step `step` on (1-based)."""
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if trainer.state.global_step + 1 >= step and model.training:
            loss = loss * float("nan")
        return loss

    trainer.compute_loss = compute_loss


def test_nan_loss_stops_training_and_nothing_is_saved(tokenizer, tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(tokenizer, out, max_steps=4)
    _nan_after(trainer, step=2)
    with pytest.raises(NonFiniteTrainingError, match=r"Training stopped at step 2: the loss is nan") as info:
        trainer.train()
    assert info.value.step == 2 and "not saved or pushed" in str(info.value)
    with pytest.raises(NonFiniteTrainingError, match="Refusing saving the model"):
        trainer.save_model(str(out))
    with pytest.raises(NonFiniteTrainingError, match="Refusing"):
        trainer.create_model_card()
    with pytest.raises(NonFiniteTrainingError, match="Refusing push_to_hub"):
        trainer.push_to_hub()
    assert not (out / "adapter_model.safetensors").exists() and not (out / "README.md").exists()


def test_exploding_learning_rate_stops_at_the_first_non_finite_step(tokenizer, tmp_path):
    # lr 1e12 with clipping off: the weights overflow; the run must stop instead of logging "loss 0.0"
    trainer = _trainer(
        tokenizer,
        tmp_path / "out",
        max_steps=30,
        learning_rate=1e12,
        max_grad_norm=0.0,
        forget_loss="gradient_ascent",
        optim="sgd",
    )
    with pytest.raises(NonFiniteTrainingError, match=r"Training stopped at step \d+.*learning_rate=1e\+12 is large"):
        trainer.train()
    with pytest.raises(NonFiniteTrainingError):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_non_finite_gradient_stops_before_the_optimizer_applies_it(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path / "out", max_steps=3)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    hooked = next(p for p in model.parameters() if p.requires_grad)
    hooked.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteTrainingError, match="gradient norm is .* so it was not applied"):
        trainer.train()
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(before[n], after[n]) for n in before)  # the optimizer never stepped


def test_a_model_with_nan_weights_is_never_saved(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path / "out")
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(NonFiniteTrainingError, match="holds NaN/inf values"):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_zero_training_steps_is_an_error_not_a_saved_adapter(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path / "out", max_steps=-1, num_train_epochs=0)
    with pytest.raises(ValueError, match="trains for zero steps"):
        trainer.train()


# --------------------------------------------------------------------------------------------------
# User files: nothing overwritten, hijacked or deleted that the library did not write
# --------------------------------------------------------------------------------------------------


def test_save_keeps_a_users_readme(tokenizer, tmp_path):
    out = tmp_path / "out"
    _user_files(out, {"README.md": "# my notes\n"})
    trainer = _trainer(tokenizer, out)
    trainer.save_model(str(out))
    assert (out / "README.md").read_text() == "# my notes\n"
    assert (out / "adapter_model.safetensors").is_file() and is_ours(out, "adapter_model.safetensors")
    trainer.save_model(str(out))  # re-saving over our own files is fine
    assert (out / "README.md").read_text() == "# my notes\n"


def test_model_card_replaces_only_our_readme(tokenizer, tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(tokenizer, out)
    trainer.save_model(str(out))
    assert "peft-unlearn" in (out / "README.md").read_text() and is_ours(out, "README.md")
    (out / "README.md").write_text("# edited by hand\n")  # now it is the user's
    trainer.create_model_card()
    assert (out / "README.md").read_text() == "# edited by hand\n"


def test_save_refuses_to_overwrite_a_users_adapter_and_loses_nothing(tokenizer, tmp_path):
    out = tmp_path / "out"
    before = _user_files(out, {"adapter_config.json": '{"mine": true}', "notes.txt": "x"})
    trainer = _trainer(tokenizer, out)
    with pytest.raises(SaveConflictError, match=r"'adapter_config.json'.*overwrite_output=True"):
        trainer.save_model(str(out))
    assert _snapshot(out) == before  # nothing written, nothing left behind (no staging folder)
    with pytest.raises(SaveConflictError, match="adapter_config.json"):
        trainer.train()  # refused before training, not after it
    assert trainer.state.global_step == 0


def test_overwrite_output_allows_it_but_still_keeps_the_readme(tokenizer, tmp_path):
    out = tmp_path / "out"
    _user_files(out, {"adapter_config.json": "{}", "README.md": "mine"})
    trainer = _trainer(tokenizer, out, overwrite_output=True)
    trainer.save_model(str(out))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "README.md").read_text() == "mine"


def test_adapter_is_never_saved_into_a_base_models_folder(tokenizer, tmp_path):
    base_dir = tmp_path / "base"
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(base_dir)
    before = _snapshot(base_dir)
    trainer = _trainer(tokenizer, tmp_path / "out")
    with pytest.raises(SaveConflictError, match="from_pretrained\\(\\) on it would afterwards load the adapter"):
        trainer.save_model(str(base_dir))
    assert _snapshot(base_dir) == before
    trainer = _trainer(tokenizer, base_dir)
    with pytest.raises(SaveConflictError, match="holds a model"):
        trainer.train()
    assert _snapshot(base_dir) == before


def test_full_model_save_refuses_a_foreign_config(tokenizer, tmp_path):
    out = tmp_path / "out"
    before = _user_files(out, {"config.json": "{}"})
    trainer = _trainer(tokenizer, out, peft=False)
    with pytest.raises(SaveConflictError, match="config.json"):
        trainer.save_model(str(out))
    assert _snapshot(out) == before


def test_checkpoints_are_recorded_and_rotation_never_deletes_a_foreign_checkpoint(tokenizer, tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(tokenizer, out, save_strategy="steps", save_steps=1, max_steps=2)
    trainer.train()
    assert is_ours(out / "checkpoint-2", "adapter_model.safetensors")
    assert is_ours(out / "checkpoint-2", "optimizer.pt")
    (out / "checkpoint-1").mkdir(exist_ok=True)
    foreign = tmp_path / "other"
    _user_files(foreign / "checkpoint-1", {"precious.bin": "data"})
    trainer = _trainer(tokenizer, foreign, save_strategy="steps", save_steps=1, max_steps=2, save_total_limit=1)
    with pytest.raises(SaveConflictError, match="save_total_limit=1 would delete 'checkpoint-1'"):
        trainer.train()
    assert (foreign / "checkpoint-1" / "precious.bin").read_text() == "data"


def test_staged_save_unit_rules(tmp_path):
    folder = tmp_path / "f"
    _user_files(folder, {"user.json": "u", "README.md": "user"})
    with pytest.raises(SaveConflictError, match="'user.json'"):
        with staged_save(folder) as stage:
            (stage / "user.json").write_text("ours")
            (stage / "new.json").write_text("ours")
    assert not (folder / "new.json").exists() and (folder / "user.json").read_text() == "u"
    assert [p.name for p in folder.iterdir() if p.name.startswith("_peft_unlearn_staging")] == []
    with staged_save(folder) as stage:
        (stage / "README.md").write_text("card")
        (stage / "sub").mkdir()
        (stage / "sub" / "a.safetensors").write_text("x")
    assert (folder / "README.md").read_text() == "user" and is_ours(folder, "sub/a.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "sub", "user.json"]  # no bookkeeping inside


def test_remove_if_ours_never_deletes_a_users_folder(tmp_path):
    folder = tmp_path / "f"
    _user_files(folder, {"_fila_init/fila_meta.json": "{}"})
    with pytest.warns(UserWarning, match="Leaving .* did not write"):
        assert remove_if_ours(folder, "_fila_init") is False
    assert (folder / "_fila_init" / "fila_meta.json").is_file()
    with staged_save(folder, overwrite=True) as stage:
        (stage / "_fila_init").mkdir()
        (stage / "_fila_init" / "fila_meta.json").write_text("{}")
    assert remove_if_ours(folder, "_fila_init") is True and not (folder / "_fila_init").exists()


def _fila_trainer(tokenizer, output_dir, **kwargs):
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights="fila")
    return UnlearningTrainer(
        model=tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args=_args(output_dir, **kwargs),
        processing_class=tokenizer,
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        peft_config=lora,
    )


def test_fila_portable_save_is_decided_by_the_trainer_not_the_folder_name(tokenizer, tmp_path):
    trainer = _fila_trainer(tokenizer, tmp_path / "out", max_steps=1)
    trainer.train()
    named_like_a_checkpoint = tmp_path / "checkpoint-7"
    trainer.save_model(str(named_like_a_checkpoint))
    config = json.loads((named_like_a_checkpoint / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 4  # the portable rank-2r LoRA
    assert not (named_like_a_checkpoint / "_fila_init").exists()


def test_fila_save_keeps_a_foreign_fila_init_folder(tokenizer, tmp_path):
    out = tmp_path / "out"
    _user_files(out, {"_fila_init/fila_meta.json": '{"user": 1}'})
    trainer = _fila_trainer(tokenizer, out, max_steps=1)
    trainer.train()
    with pytest.warns(UserWarning, match="Leaving"):
        trainer.save_model(str(out))
    assert (out / "_fila_init" / "fila_meta.json").read_text() == '{"user": 1}'


# --------------------------------------------------------------------------------------------------
# Boundaries: vocabulary, lengths, paths, corrupt files, reference model, network, resume, eval sets
# --------------------------------------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary_are_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"forget example 1 holds token id 5000, outside the model's vocabulary"):
        _trainer(tokenizer, tmp_path / "out", forget_dataset=[{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5000]}])


def test_a_tokenizer_larger_than_the_embedding_is_a_clear_error(tokenizer, tmp_path):
    small = tiny_causal_lm("llama", vocab_size=len(tokenizer) - 20)
    with pytest.raises(ValueError, match=r"`processing_class` has \d+ tokens but the model's embedding has \d+ rows"):
        _trainer(tokenizer, tmp_path / "out", model=small)


def test_sequences_longer_than_the_model_positions_are_refused(tokenizer, tmp_path):
    short = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    short.config.max_position_embeddings = 8
    with pytest.raises(ValueError, match=r"more than the model's 8 positions .* Set max_length <= 8"):
        _trainer(tokenizer, tmp_path / "out", model=short, max_length=64)
    _trainer(tokenizer, tmp_path / "out", model=short, max_length=8)  # truncated to fit: accepted


def test_a_missing_model_path_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`model`='.*missing' looks like a local path but does not exist"):
        UnlearningTrainer(
            model=str(tmp_path / "missing"),
            args=_args(tmp_path / "o"),
            processing_class=tokenizer,
            forget_dataset=FORGET,
            retain_dataset=RETAIN,
        )


def test_a_corrupt_model_file_is_named_on_load(tokenizer, tmp_path):
    folder = tmp_path / "model"
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors' is corrupt or truncated"):
        UnlearningTrainer(
            model=str(folder),
            args=_args(tmp_path / "o"),
            processing_class=tokenizer,
            forget_dataset=FORGET,
            retain_dataset=RETAIN,
        )


def test_resume_from_a_missing_or_corrupt_checkpoint(tokenizer, tmp_path):
    out = tmp_path / "out"
    trainer = _trainer(tokenizer, out, save_strategy="steps", save_steps=1, max_steps=1)
    with pytest.raises(ValueError, match="resume_from_checkpoint=True but output_dir=.* holds no checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='.*nope' does not exist"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nope"))
    trainer.train()
    checkpoint = out / "checkpoint-1"
    data = (checkpoint / "adapter_model.safetensors").read_bytes()
    (checkpoint / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    trainer = _trainer(tokenizer, out, save_strategy="steps", save_steps=1, max_steps=2)
    with pytest.raises(CorruptCheckpointError, match="checkpoint-1/adapter_model.safetensors' is corrupt"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_reference_model_with_another_vocabulary_is_refused(tokenizer, tmp_path):
    ref = tiny_causal_lm("llama", vocab_size=len(tokenizer) + 16)
    with pytest.raises(ValueError, match=r"`ref_model` has a vocabulary of \d+ tokens but the trained model has"):
        _trainer(tokenizer, tmp_path / "out", peft=False, forget_loss="npo", ref_model=ref)


def test_hub_push_without_network_is_one_line(tokenizer, tmp_path, monkeypatch):
    import requests
    import transformers.trainer

    class NoNetwork:
        def create_repo(self, *args, **kwargs):
            raise requests.exceptions.ConnectionError(
                "HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded\n  ... long trace ..."
            )

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: NoNetwork())
    with pytest.raises(HubConnectionError) as info:
        _trainer(tokenizer, tmp_path / "out", push_to_hub=True, hub_model_id="someone/tiny")
    message = str(info.value)
    assert "\n" not in message and "cannot reach the Hugging Face Hub" in message and "push_to_hub=False" in message
    assert info.value.__suppress_context__


def test_failed_background_hub_pushes_are_reported_once(tokenizer, tmp_path, monkeypatch, caplog):
    """`Trainer` uploads checkpoints with run_as_future=True and never looks at the futures: we report failures."""
    import types
    from concurrent.futures import Future

    import requests
    import transformers.trainer

    uploads: list[Future] = []

    class NoNetworkUploads:
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, **kwargs):
            assert kwargs["run_as_future"]
            job = Future()
            job.set_exception(requests.exceptions.ConnectionError("Max retries exceeded\n  ... long trace ..."))
            uploads.append(job)
            return job

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: NoNetworkUploads())
    trainer = _trainer(
        tokenizer, tmp_path / "out", push_to_hub=True, hub_model_id="someone/tiny", hub_strategy="every_save",
        save_strategy="steps", save_steps=1, max_steps=2,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="peft_unlearn.trainer.saving"):
        trainer.train()
        trainer._finish_current_push()  # a second wait reports nothing new
    reports = [r.getMessage() for r in caplog.records if "background push" in r.getMessage()]
    assert len(uploads) == 2 and len(reports) == 2
    for message in reports:
        assert (
            "\n" not in message and "cannot reach the Hugging Face Hub" in message and str(tmp_path / "out") in message
        )
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()  # the local save is complete


def test_empty_evaluation_sets_raise(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        _trainer(tokenizer, tmp_path / "out", eval_dataset={"forget": []})
    trainer = _trainer(tokenizer, tmp_path / "out")
    with pytest.raises(ValueError, match="empty"):
        trainer.evaluate({"heldout": []})
    with pytest.raises(ValueError, match="empty dict"):
        trainer.evaluate({})


def test_large_files_stay_ours_when_rewritten_identically(tmp_path):
    folder = tmp_path / "f"
    payload = bytes(range(256)) * (40 * 1024 + 7)  # ~10 MiB: above the full-hash limit
    with staged_save(folder) as stage:
        (stage / "tokenizer.json").write_bytes(payload)
    (folder / "tokenizer.json").write_bytes(payload)  # e.g. tokenizer.save_pretrained again: new mtime, same bytes
    assert is_ours(folder, "tokenizer.json")
    (folder / "tokenizer.json").write_bytes(payload[:-1] + b"!")
    assert not is_ours(folder, "tokenizer.json")


# --------------------------------------------------------------------------------------------------
# Command line: the same policy and checks, one error line, nothing reported as saved
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from peft_unlearn.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    tiny_causal_lm("llama", vocab_size=len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    forget, retain = root / "forget.jsonl", root / "retain.jsonl"
    forget.write_text("".join(json.dumps(row) + "\n" for row in FORGET))
    retain.write_text("".join(json.dumps(row) + "\n" for row in RETAIN))
    return root


def _cli_train(cli_files, output, *extra):
    from peft_unlearn.cli import main

    argv = [
        "train",
        "--model",
        str(cli_files / "model"),
        "--forget",
        str(cli_files / "forget.jsonl"),
        "--retain",
        str(cli_files / "retain.jsonl"),
        "--output",
        str(output),
        "--max_steps",
        "1",
        "--lora_r",
        "2",
        "--report_to",
        "none",
        "--use_cpu",
        "True",
        "--disable_tqdm",
        "True",
        *extra,
    ]
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_cli_refuses_to_put_an_adapter_into_the_base_model_folder(cli_files, capsys):
    before = _snapshot(cli_files / "model")
    code = _cli_train(cli_files, cli_files / "model")
    err = capsys.readouterr().err
    assert code == 1 and "holds a model" in err and "--overwrite_output" in err and "Traceback" not in err
    assert _snapshot(cli_files / "model") == before


def test_cli_keeps_a_users_readme_and_reports_the_save(cli_files, tmp_path, capsys):
    out = tmp_path / "out"
    _user_files(out, {"README.md": "mine"})
    assert _cli_train(cli_files, out) == 0
    assert (out / "README.md").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()
    assert "Saved the" in capsys.readouterr().out


def test_cli_zero_steps_is_an_error_not_a_saved_adapter(cli_files, tmp_path, capsys):
    out = tmp_path / "out"
    code = _cli_train(cli_files, out, "--max_steps", "-1", "--num_train_epochs", "0")
    captured = capsys.readouterr()
    assert code != 0 and "zero steps" in captured.err and "Saved the" not in captured.out
    assert not (out / "adapter_model.safetensors").exists()


def test_cli_rejects_a_non_finite_learning_rate(cli_files, tmp_path, capsys):
    code = _cli_train(cli_files, tmp_path / "out", "--learning_rate", "inf")
    err = capsys.readouterr().err
    assert code != 0 and "`learning_rate` must be a finite number" in err and "Traceback" not in err


def test_models_loader_names_a_missing_model():
    from peft_unlearn.models import load_model_and_tokenizer

    with pytest.raises(FileNotFoundError, match="looks like a local path but does not exist"):
        load_model_and_tokenizer("./no/such/model")
    with pytest.raises(OSError, match="name_or_path='no-such-model-xyz' could not be loaded"):
        load_model_and_tokenizer("no-such-model-xyz")


# --------------------------------------------------------------------------------------------------
# Data: every example fits the detected format; pre-tokenized ids are never coerced silently
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, fragment",
    [
        ([{"input_ids": [1, 2.5, 3]}], "got 2.5 (a float) at position 1"),
        ([{"input_ids": [True, False, True]}], "got True (a bool) at position 0"),
        ([{"input_ids": ["a", "b"]}], "got 'a' (a str) at position 0"),
        ([{"input_ids": [[1, 2], [3, 4]]}], "got [1, 2] (a list) at position 0"),
        ([{"input_ids": "1 2 3"}], "'input_ids' must be a list of integer token ids"),
        ([{"input_ids": [1, 2, 3], "labels": [1, -5, 3]}], "'labels' holds -5 at position 1"),
        ([{"input_ids": [1, 2, 3], "attention_mask": [1, 2, 1]}], "'attention_mask' must hold only 0 and 1"),
        ([{"text": "a b c d"}, {"prompt": "q", "completion": "a"}], "example 1 has no 'text' column"),
    ],
)
def test_malformed_examples_are_named(tokenizer, data, fragment):
    from peft_unlearn.trainer import tokenize_dataset

    with pytest.raises(ValueError, match=re.escape(fragment)):
        tokenize_dataset(data, tokenizer, name="forget")


def test_labels_outside_the_vocabulary_are_a_clear_error(tokenizer, tmp_path):
    data = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 99999]}]
    with pytest.raises(ValueError, match="token id 99999 in 'labels', outside the model's vocabulary"):
        _trainer(tokenizer, tmp_path / "out", forget_dataset=data)


def test_nested_staged_saves_keep_the_outer_records(tmp_path):
    folder = tmp_path / "f"
    with staged_save(folder) as stage:
        (stage / "README.md").write_text("card")
    with staged_save(folder) as outer:
        with staged_save(outer) as inner:  # e.g. the trainer staging a FILA save_pretrained that stages too
            (inner / "adapter_config.json").write_text("{}")
    assert is_ours(folder, "README.md") and is_ours(folder, "adapter_config.json")


def test_metrics_name_token_ids_outside_the_vocabulary(tiny_llama):
    vocab = tiny_llama.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=f"`input_ids` holds token id {vocab + 5}, outside the model's vocabulary"):
        evaluate_memorization(tiny_llama, [[1, 2, vocab + 5]], compute_el=False)
    with pytest.raises(ValueError, match="`labels` holds token id"):
        memorization_accuracy(tiny_llama, torch.tensor([[1, 2, 3]]), labels=torch.tensor([[-100, 2, vocab]]))


def test_policy_write_stages_on_the_main_process_only(tmp_path):
    from peft_unlearn.save_policy import policy_write

    folder = tmp_path / "f"
    _user_files(folder, {"adapter_config.json": "user"})
    with pytest.raises(SaveConflictError, match="save_pretrained\\(\\.\\.\\., overwrite_output=True\\)"):
        policy_write(
            folder,
            lambda d: (d / "adapter_config.json").write_text("ours"),
            switch="save_pretrained(..., overwrite_output=True)",
        )
    assert (folder / "adapter_config.json").read_text() == "user"
    seen = []
    policy_write(folder, seen.append, is_main_process=False)  # other ranks write nothing: no staging
    assert seen == [folder]


def test_fila_save_pretrained_follows_the_policy(tokenizer, tmp_path):
    trainer = _fila_trainer(tokenizer, tmp_path / "run", max_steps=1)
    trainer.train()
    model = trainer.model
    out = tmp_path / "out"
    before = _user_files(out, {"adapter_config.json": "user", "README.md": "mine", "_fila_init/fila_meta.json": "u"})
    with pytest.raises(
        SaveConflictError, match=r"'adapter_config.json'.*save_pretrained\(\.\.\., overwrite_output=True\)"
    ):
        model.save_pretrained(str(out))
    assert _snapshot(out) == before
    with pytest.warns(UserWarning, match="Leaving"):  # the foreign _fila_init/ is never deleted
        model.save_pretrained(str(out), overwrite_output=True)
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert (out / "README.md").read_text() == "mine" and (out / "_fila_init" / "fila_meta.json").read_text() == "u"
    raw = tmp_path / "raw"
    model.save_pretrained(str(raw), fila_portable=False)
    model.save_pretrained(str(raw))  # portable over our own raw save: our _fila_init/ is removed
    assert not (raw / "_fila_init").exists()


def test_a_copied_folder_is_the_users(tmp_path):
    import shutil

    folder = tmp_path / "a"
    with staged_save(folder) as stage:
        (stage / "adapter_config.json").write_text("{}")
    shutil.copytree(folder, tmp_path / "b")
    assert is_ours(folder, "adapter_config.json") and not is_ours(tmp_path / "b", "adapter_config.json")


# --------------------------------------------------------------------------------------------------
# Issue 23: the save policy's own holes, silent references, raw errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("False", False), ("true", True), ("0", False)])
def test_overwrite_output_strings_are_parsed_strictly(tmp_path, value, expected):
    assert _args(tmp_path / "out", overwrite_output=value).overwrite_output is expected


@pytest.mark.parametrize("value", ["nope", 2, None, "off-ish"])
def test_overwrite_output_rejects_a_non_bool(tmp_path, value):
    with pytest.raises(TypeError, match=r"`overwrite_output` must be a bool.*overwrite_output=False"):
        _args(tmp_path / "out", overwrite_output=value)


def test_overwrite_output_string_false_keeps_the_users_adapter(tokenizer, tmp_path):
    out = tmp_path / "out"
    before = _user_files(out, {"adapter_config.json": '{"mine": true}'})
    trainer = _trainer(tokenizer, out, overwrite_output="false")
    with pytest.raises(SaveConflictError, match="adapter_config.json"):
        trainer.save_model(str(out))
    assert _snapshot(out) == before


def test_a_large_file_edited_in_the_middle_is_the_users(tmp_path):
    out = tmp_path / "out"
    size = 9 * 1024 * 1024  # above the old 8 MiB partial-hash limit
    with staged_save(out) as stage:
        (stage / "adapter_model.safetensors").write_bytes(b"\0" * size)
    assert is_ours(out, "adapter_model.safetensors")
    with (out / "adapter_model.safetensors").open("r+b") as handle:  # same size, middle changed
        handle.seek(size // 2)
        handle.write(b"user")
    assert not is_ours(out, "adapter_model.safetensors")
    with pytest.raises(SaveConflictError, match="adapter_model.safetensors"):
        with staged_save(out) as stage:
            (stage / "adapter_model.safetensors").write_bytes(b"new")
    assert (out / "adapter_model.safetensors").stat().st_size == size


def test_fisher_cache_fingerprint_sees_every_weight():
    from peft_unlearn.fila.fisher_cache import weight_fingerprint

    layer = torch.nn.Linear(64, 64, bias=False)
    before = weight_fingerprint(layer)
    with torch.no_grad():
        layer.weight.view(-1)[1] += 1.0  # not among 1024 evenly strided values of 4096
    assert weight_fingerprint(layer) != before


@pytest.mark.parametrize("bad", [11, -3])
def test_inverted_hinge_loss_rejects_out_of_range_labels(bad):
    from peft_unlearn.losses.functions import inverted_hinge_loss

    labels = torch.tensor([[1, 2, bad, -100]])
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary of the logits \[0, 11\)"):
        inverted_hinge_loss(torch.randn(1, 4, 11), labels)


def test_metrics_reject_a_negative_pad_token_id(tiny_llama):
    from peft_unlearn.metrics.generation import greedy_generate

    data = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}]
    with pytest.raises(ValueError, match=r"`pad_token_id` must be a token id >= 0.*tokenizer.eos_token_id"):
        evaluate_memorization(tiny_llama, data, pad_token_id=-1)
    with pytest.raises(ValueError, match="`pad_token_id` must be a token id >= 0"):
        greedy_generate(tiny_llama, [[5, 6], [7]], max_new_tokens=2, pad_token_id=-100)


def test_output_dir_that_is_a_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "out"
    path.write_text("mine")
    with pytest.raises(NotADirectoryError, match="`output_dir` must be a folder"):
        _args(path)
    assert path.read_text() == "mine"


def test_fila_cache_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(IsADirectoryError, match=r"`fila_cache` must be a file path.*fisher.safetensors"):
        _args(tmp_path / "out", fila_cache=str(tmp_path / "cache"))


def test_a_record_cache_that_is_a_file_is_refused_before_saving(tmp_path, monkeypatch):
    cache = tmp_path / "cache_file"
    cache.write_text("mine")
    monkeypatch.setenv("PEFT_UNLEARN_CACHE", str(cache))
    with pytest.raises(NotADirectoryError, match="PEFT_UNLEARN_CACHE at a writable folder"):
        with staged_save(tmp_path / "out") as stage:
            (stage / "adapter_config.json").write_text("{}")
    assert not (tmp_path / "out").exists() and cache.read_text() == "mine"


def test_adapter_is_never_saved_into_the_librarys_own_full_model_output(tokenizer, tmp_path):
    out = tmp_path / "out"
    full = _trainer(tokenizer, out, peft=False)
    full.save_model(str(out))  # an earlier full fine-tuning run of this library
    assert is_ours(out, "config.json") and is_ours(out, "model.safetensors")
    before = _snapshot(out)
    lora = _trainer(tokenizer, tmp_path / "elsewhere")
    with pytest.raises(SaveConflictError, match=r"holds a model .* that peft_unlearn wrote .*from_pretrained\(\)"):
        lora.save_model(str(out))
    assert _snapshot(out) == before
    with pytest.raises(SaveConflictError, match="another output_dir"):
        _trainer(tokenizer, out).train()  # refused before training
    assert _snapshot(out) == before
    allowed = _trainer(tokenizer, tmp_path / "elsewhere", overwrite_output=True)
    allowed.save_model(str(out))  # the switch still allows it
    assert (out / "adapter_config.json").is_file() and (out / "model.safetensors").read_bytes() == before[
        "model.safetensors"
    ]


def test_a_portable_save_into_a_fila_checkpoint_is_refused_and_resume_still_works(tokenizer, tmp_path):
    out = tmp_path / "run"
    trainer = _fila_trainer(tokenizer, out, max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "_fila_init" / "fila_meta.json").is_file()
    before = _snapshot(checkpoint)
    with pytest.raises(SaveConflictError, match=r"resumable trainer checkpoint .*fila_portable=False"):
        trainer.model.save_pretrained(str(checkpoint))
    with pytest.raises(SaveConflictError, match="Save to another folder"):
        trainer.save_model(str(checkpoint))
    assert _snapshot(checkpoint) == before
    resumed = _fila_trainer(tokenizer, out, max_steps=2, save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 and resumed.fila_stats == {}  # A0/B0 re-attached, not recomputed


def test_resuming_a_fila_checkpoint_on_another_base_is_refused(tokenizer, tmp_path):
    out = tmp_path / "run"
    _fila_trainer(tokenizer, out, max_steps=1, save_strategy="steps", save_steps=1).train()
    checkpoint = out / "checkpoint-1"
    other = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)  # same architecture, other weights
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights="fila")
    trainer = UnlearningTrainer(
        model=other,
        args=_args(out, max_steps=2, save_strategy="steps", save_steps=1),
        processing_class=tokenizer,
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        peft_config=lora,
    )
    with pytest.raises(ValueError, match=r"base weight differs from the one the raw checkpoint .* was trained on"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0
    same = _fila_trainer(tokenizer, out, max_steps=2, save_strategy="steps", save_steps=1)  # the same base
    same.train(resume_from_checkpoint=str(checkpoint))
    assert same.state.global_step == 2


@pytest.mark.parametrize("loss", [{"forget_loss": "npo"}, {"retain_loss": "kl"}])
def test_a_reloaded_trained_fila_adapter_needs_an_explicit_reference(tokenizer, tmp_path, loss):
    from peft_unlearn.fila.offset import get_offset
    from peft_unlearn.fila.state import iter_lora_layers
    from peft_unlearn.models import load_adapter

    out = tmp_path / "run"
    _fila_trainer(tokenizer, out, max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-2).train()
    reloaded = load_adapter(
        tiny_causal_lm("llama", vocab_size=len(tokenizer)), out / "checkpoint-1", is_trainable=True
    )
    with pytest.raises(ValueError, match=r"differ from the frozen initial factors A0/B0.*Pass `ref_model=`"):
        _trainer(tokenizer, tmp_path / "again", model=reloaded, peft=False, **loss)
    # back at the initial factors: the adapter is a no-op, the disabled-adapter reference is right
    with torch.no_grad():
        for _, layer in iter_lora_layers(reloaded, "default"):
            lora_a0, lora_b0 = get_offset(layer, "default")
            layer.lora_A["default"].weight.copy_(lora_a0)
            layer.lora_B["default"].weight.copy_(lora_b0)
    _trainer(tokenizer, tmp_path / "again", model=reloaded, peft=False, **loss)
    ref = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    _trainer(tokenizer, tmp_path / "again", model=reloaded, peft=False, ref_model=ref, **loss)


def test_fila_with_lm_head_among_the_targets_saves_a_portable_adapter(tokenizer, tmp_path, cli_files):
    from peft import PeftModel

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights="fila")
    trainer = UnlearningTrainer(
        model=tiny_causal_lm("llama", vocab_size=len(tokenizer)),
        args=_args(tmp_path / "out", learning_rate=1e-2),
        processing_class=tokenizer,
        forget_dataset=FORGET,
        retain_dataset=RETAIN,
        peft_config=lora,
    )
    trainer.train()
    with pytest.warns(UserWarning, match="save_embedding_layers"):  # PEFT's own "auto" choice, as for a plain LoRA
        trainer.save_model(str(tmp_path / "saved"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        with trained.disable_adapter():
            base_logits = trained(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-4  # the adapter (lm_head included) changed the model
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama", vocab_size=len(tokenizer)), tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    out = tmp_path / "cli"  # the command line: the run is saved, not lost
    assert _cli_train(cli_files, out, "--target_modules", "q_proj", "lm_head") == 0
    assert "lm_head" in json.loads((out / "adapter_config.json").read_text())["target_modules"]


def test_fisher_pass_on_a_4bit_base_repacked_for_cpu_inference_is_a_clear_error(tmp_path):
    """bitsandbytes repacks a 4-bit weight at the first eval-mode no-grad forward on CPUs with AVX512-BF16.

    This machine may lack AVX512-BF16, so the test sets the one flag bitsandbytes checks for it
    (`Linear4bit.support_avx512bf16_for_cpu`); the repack itself is bitsandbytes' own code.
    """
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_unlearn.fila.fisher import estimate_fisher
    from peft_unlearn.fila.fisher_hooks import MissingOutputGradientError
    from peft_unlearn.testing import random_lm_batches

    tiny_causal_lm("llama", vocab_size=320, hidden_size=64, seed=0).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))  # e.g. an evaluation before training
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)  # bitsandbytes repacked them
    batches = random_lm_batches(1)
    with pytest.raises(MissingOutputGradientError, match=r"repacked the 4-bit weights of 14 layer.*model.train\(\)"):
        estimate_fisher(model, batches, batches, show_progress=False)


def test_fisher_hooks_name_a_layer_without_output_gradient(tiny_llama):
    """A module with no backward after a target layer: its output-gradient hook gets None (an AttributeError before)."""
    from peft_unlearn.fila.fisher import estimate_fisher
    from peft_unlearn.fila.fisher_hooks import MissingOutputGradientError
    from peft_unlearn.testing import random_lm_batches

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    tiny_llama.model.layers[1].mlp.register_forward_hook(lambda module, args, out: NoBackward.apply(out))
    batches = random_lm_batches(1, vocab_size=tiny_llama.config.vocab_size)
    with pytest.raises(
        MissingOutputGradientError, match=r"'model.layers.1.mlp.down_proj' received no output gradient"
    ):
        estimate_fisher(tiny_llama, batches, batches, show_progress=False)


@pytest.mark.parametrize("failure", ["offline mode", "connection refused"])
def test_hub_push_without_network_keeps_the_local_save_and_says_how_to_push(tokenizer, tmp_path, monkeypatch, failure):
    """The real huggingface_hub client: its offline error, or its HTTP client's transport error (httpx2 in 2.x)."""
    import huggingface_hub
    import transformers.trainer

    if failure == "connection refused":  # a closed local port: the client's own transport error, no network used
        monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
        monkeypatch.setattr(
            transformers.trainer, "hf_api", lambda: huggingface_hub.HfApi(endpoint="http://127.0.0.1:9", token="hf_x")
        )
    out = tmp_path / "out"
    trainer = _trainer(tokenizer, out, hub_model_id="someone/tiny")
    trainer.train()
    with pytest.raises(HubConnectionError) as info:
        trainer.push_to_hub()
    message = str(info.value)
    assert "\n" not in message and "cannot reach the Hugging Face Hub" in message, message
    assert f"saved locally in {str(out)!r}" in message and f"`hf upload someone/tiny {out}`" in message
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    with pytest.raises(HubConnectionError, match="cannot reach the Hugging Face Hub"):
        _trainer(tokenizer, tmp_path / "o2", push_to_hub=True, hub_model_id="someone/tiny")  # at construction too


def test_chat_content_as_a_list_of_text_parts_is_joined_and_other_parts_are_refused(tokenizer, tmp_path):
    from peft_unlearn.trainer.formats import tokenize_dataset, tokenize_idk_dataset

    plain = [
        {"role": "user", "content": "Who wrote it?"},
        {"role": "assistant", "content": "The author of the book."},
    ]
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Who wrote "}, {"type": "text", "text": "it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The author of the book."}]},
    ]
    as_parts = tokenize_dataset([{"messages": parts}], tokenizer, completion_only_loss=True)
    assert as_parts == tokenize_dataset([{"messages": plain}], tokenizer, completion_only_loss=True)
    pc = {"prompt": parts[:1], "completion": parts[1:]}
    assert tokenize_dataset([pc], tokenizer) == tokenize_dataset(
        [{"prompt": plain[:1], "completion": plain[1:]}], tokenizer
    )
    assert tokenize_idk_dataset([{"messages": parts}], tokenizer, ["No idea."]) == tokenize_idk_dataset(
        [{"messages": plain}], tokenizer, ["No idea."]
    )
    _trainer(tokenizer, tmp_path / "out", forget_dataset=[{"messages": parts}] * 2)  # accepted by the trainer
    image = [
        {"role": "user", "content": [{"type": "image", "url": "x.png"}, {"type": "text", "text": "What?"}]},
        plain[1],
    ]
    with pytest.raises(ValueError, match=r"forget example 1: messages\[0\]\['content'\]\[0\] is a 'image' part.*text"):
        _trainer(tokenizer, tmp_path / "out", forget_dataset=[{"messages": plain}, {"messages": image}])
    with pytest.raises(TypeError, match=r"messages\[1\]\['content'\] must be a string or a list of text parts"):
        tokenize_dataset([{"messages": [plain[0], {"role": "assistant", "content": 3}]}], tokenizer, name="forget")


def test_a_raw_fila_checkpoint_says_how_to_load_and_export_it(tokenizer, tmp_path):
    """Stock PEFT fails on a raw checkpoint with its own "Unknown initialization" error; the folder carries the how-to."""
    from peft import PeftModel

    from peft_unlearn.models import load_adapter

    out = tmp_path / "run"
    trainer = _fila_trainer(tokenizer, out, max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-2)
    trainer.train()
    note = (out / "checkpoint-1" / "HOW_TO_LOAD.txt").read_text()
    assert "Stock PEFT cannot load it" in note and "Unknown initialization init_lora_weights='fila'" in note
    assert "load_adapter(base_model, " in note and 'model.save_pretrained("path/to/portable")' in note
    model = load_adapter(tiny_causal_lm("llama", vocab_size=len(tokenizer)), out / "checkpoint-1")  # as the note says
    model.save_pretrained(str(tmp_path / "portable"))
    assert not (tmp_path / "portable" / "HOW_TO_LOAD.txt").exists()  # only raw folders carry the note
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = PeftModel.from_pretrained(tiny_causal_lm("llama", vocab_size=len(tokenizer)), tmp_path / "portable")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    raw = tmp_path / "raw"
    model.save_pretrained(str(raw), fila_portable=False)
    assert (raw / "HOW_TO_LOAD.txt").is_file()
    model.save_pretrained(str(raw))  # portable over a raw save: its note goes with its _fila_init/
    assert not (raw / "HOW_TO_LOAD.txt").exists() and not (raw / "_fila_init").exists()
