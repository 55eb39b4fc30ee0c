"""Saving, checkpoints, Hub pushes and the model card of `UnlearningTrainer`.

[`UnlearningSavingMixin`][peft_unlearn.trainer.saving.UnlearningSavingMixin] holds the `Trainer` save paths of
[`UnlearningTrainer`][peft_unlearn.UnlearningTrainer]:

- a FILA adapter is written as the portable plain LoRA by `save_model`, in the raw format (with `_fila_init/`)
  in checkpoints; the trainer knows when it writes a checkpoint, so the folder name plays no part;
- every write follows [`peft_unlearn.save_policy`][peft_unlearn.save_policy]: no user file is overwritten
  without `overwrite_output=True`, a user's `README.md` is kept, an adapter never goes into a base model's folder,
  and only files this library wrote are deleted;
- a run that diverged (NaN/inf loss or gradient, see `finite_guard`) is never saved, pushed or described by a
  model card, and a model with non-finite trainable weights is never written;
- a Hub call without network fails with one line
  ([`HubConnectionError`][peft_unlearn.trainer.saving.HubConnectionError]) instead of a connection trace, and a
  background checkpoint upload (`hub_strategy="every_save"`) that failed is logged as one warning line (`Trainer`
  itself never looks at the outcome of those uploads).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..fila.saving import check_not_a_resumable_checkpoint, has_data_driven_adapter
from ..fila.state import init_name
from ..save_policy import (
    OVERWRITE_SWITCH,
    SaveConflictError,
    check_save_folder,
    is_ours,
    record_written,
    remove_if_ours,
    staged_save,
    write_model_card,
)
from ..utils import is_peft_model
from .finite_guard import check_finite_parameters

__all__ = ["HubConnectionError", "UnlearningSavingMixin"]

logger = logging.getLogger(__name__)

_TRAINING_ARGS_NAME = "training_args.bin"
# files Trainer writes only into checkpoint folders (never copied into output_dir by _push_from_checkpoint)
_CHECKPOINT_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "README.md")


class HubConnectionError(ConnectionError):
    """The Hugging Face Hub could not be reached; the local save (if any) is complete."""


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # huggingface_hub's OfflineModeIsEnabled too
    with contextlib.suppress(ImportError):
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    for transport in ("httpx", "httpx2"):  # huggingface_hub 1.x uses httpx, 2.x httpx2
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(transport).TransportError)
    return tuple(errors)


def is_connection_error(err: BaseException) -> bool:
    """Whether `err` says that the Hub could not be reached (no network, offline mode, DNS, timeout).

    Besides the known classes, any ``TransportError`` of an ``httpx``-family client counts (the HTTP client of
    `huggingface_hub` has changed between major versions).
    """
    if isinstance(err, _connection_errors()):
        return True
    return any(
        cls.__name__ == "TransportError" and cls.__module__.split(".")[0].startswith("httpx")
        for cls in type(err).__mro__
    )


def _hub_failure_message(
    action: str, err: BaseException, saved_in: str | None = None, repo_id: str | None = None
) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    repo = repo_id or "<repo_id>"
    if saved_in is not None:
        later = (
            f"The model is saved locally in {saved_in!r}; push it later, once online, with `hf upload {repo} "
            f"{saved_in}` (or trainer.push_to_hub())."
        )
    else:
        later = "Or set push_to_hub=False and upload the saved folder later with `hf upload <repo_id> <folder>`."
    return (
        f"{action}: cannot reach the Hugging Face Hub ({type(err).__name__}: {first}). Check the network (and "
        f"HF_HUB_OFFLINE / HF_ENDPOINT). {later}"
    )


@contextlib.contextmanager
def hub_errors(action: str, saved_in: str | None = None, repo_id: str | None = None) -> Iterator[None]:
    """Turn a connection failure of a Hub call into a one-line `HubConnectionError`.

    Args:
        action: The call, for the message (e.g. ``"push_to_hub"``).
        saved_in: The local folder that already holds the save (the message then says how to push it later).
        repo_id: The Hub repository, for the message.

    Raises:
        HubConnectionError: Instead of the connection error (its chain suppressed).
    """
    try:
        yield
    except HubConnectionError:
        raise  # already one line (a nested Hub call)
    except Exception as err:
        if not is_connection_error(err):
            raise
        raise HubConnectionError(_hub_failure_message(action, err, saved_in, repo_id)) from None


def is_data_driven_peft_model(model: Any) -> bool:
    """Whether `model` is a PeftModel with a data-driven adapter (FILA, VILA, RILA; pending or initialised)."""
    return is_peft_model(model) and has_data_driven_adapter(model)


class UnlearningSavingMixin:
    """The save / checkpoint / Hub / model-card paths of `UnlearningTrainer` (mixed in before `Trainer`).

    Needs from the trainer: `args` (an `UnlearningConfig`), `_finite_guard` and `_dataset_sizes`.
    """

    _in_checkpoint_save: bool = False
    _push_saved: bool = False  # whether push_to_hub's local save happened (a failed push still leaves the save)

    # ---- policy helpers ----------------------------------------------------------------------------------------

    def _overwrite_allowed(self) -> bool:
        return bool(getattr(self.args, "overwrite_output", False))

    def _refuse_broken_model(self, action: str, check_weights: bool = True) -> None:
        self._finite_guard.check_can_save(action)
        if check_weights:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            check_finite_parameters(model, action)

    def check_output_dir(self) -> None:
        """Fail before training if saving into `args.output_dir` would later be refused.

        Checks the files an unlearning save writes (see [`peft_unlearn.save_policy`][peft_unlearn.save_policy]) and,
        with `save_total_limit`, that no `checkpoint-*` folder there holds files this library did not write (the
        rotation would delete it).

        Raises:
            SaveConflictError: Naming the files and `overwrite_output=True`.
        """
        if not self.args.should_save or self._overwrite_allowed():
            return
        model = self.accelerator.unwrap_model(self.model)
        output_dir = Path(self.args.output_dir)
        check_save_folder(output_dir, adapter=is_peft_model(model))
        if self.args.save_total_limit is not None and output_dir.is_dir():
            for folder in sorted(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
                files = [p for p in folder.rglob("*") if p.is_file()]
                if any(not is_ours(folder, p.relative_to(folder)) for p in files):
                    raise SaveConflictError(
                        f"Refusing to train into {str(output_dir)!r}: save_total_limit={self.args.save_total_limit} "
                        f"would delete {folder.name!r}, which peft_unlearn did not write. Move it away, use another "
                        f"output_dir, or allow it with {OVERWRITE_SWITCH}."
                    )

    # ---- Trainer save paths ------------------------------------------------------------------------------------

    # Private override: checkpoints are written only through `_save_checkpoint` (no public hook runs before the write;
    # on_save runs after it): the save policy must refuse a foreign folder first, and data-driven adapters are saved
    # raw (rank r plus `_fila_init/`) in checkpoints, so that resume works, instead of the portable export.
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.args.hub_model_id is None:
            model_name = Path(self.args.output_dir).name
        else:
            model_name = self.args.hub_model_id.split("/")[-1]
        self.create_model_card(model_name=model_name)
        folder = Path(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and not self._overwrite_allowed() and folder.is_dir():
            foreign = [p for p in folder.rglob("*") if p.is_file() and not is_ours(folder, p.relative_to(folder))]
            if foreign:
                raise SaveConflictError(
                    f"Refusing to write the checkpoint {str(folder)!r}: the folder already holds "
                    f"{foreign[0].name!r}, which peft_unlearn did not write. Use another output_dir, or allow it with "
                    f"{OVERWRITE_SWITCH}."
                )
        self._in_checkpoint_save = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint_save = False
        if self.args.should_save and folder.is_dir():
            record_written(folder, [p.name for p in folder.iterdir()])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the trained model (a FILA adapter as the portable plain LoRA) and the model card.

        Follows [`peft_unlearn.save_policy`][peft_unlearn.save_policy]: refuses to overwrite files this library did
        not write (unless `overwrite_output=True`), keeps a user's README.md, and refuses a diverged model.
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        self._push_saved = True
        if not _internal_call:
            self.create_model_card(output_dir=output_dir)

    # Private override: `_save` is the one write that `save_model` reaches on every backend (plain, FSDP, DeepSpeed
    # hand it their gathered state dict); staging it here applies the save policy and the portable export to all.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Stage the save, check it against the policy, then move it into `output_dir`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._refuse_broken_model(f"saving the model to {str(output_dir)!r}")
        if not self.args.should_save:
            return self._write_model(output_dir, state_dict)  # non-writer ranks: collectives only
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if is_data_driven_peft_model(model) and not self._in_checkpoint_save:
            check_not_a_resumable_checkpoint(output_dir)  # the portable save would break resuming that checkpoint
        with staged_save(output_dir, overwrite=self._overwrite_allowed()) as stage:
            self._write_model(str(stage), state_dict)
        if is_data_driven_peft_model(model) and not self._in_checkpoint_save:
            from peft_unlearn.fila.saving import INIT_DIR, RAW_NOTE

            remove_if_ours(output_dir, INIT_DIR)  # a raw save's stale initial factors: ours only
            remove_if_ours(output_dir, RAW_NOTE)
        return None

    def _write_model(self, output_dir: str, state_dict: dict | None) -> None:
        """Write the adapter(s): FILA ones as portable LoRA, or raw with their initial factors in checkpoints."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not is_data_driven_peft_model(model):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        kwargs: dict[str, Any] = {"is_main_process": True, "fila_portable": not self._in_checkpoint_save}
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        model.save_pretrained(output_dir, **kwargs)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))
        return None

    # ---- Hub ---------------------------------------------------------------------------------------------------

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """`Trainer.init_hf_repo`, failing with one line when the Hub cannot be reached."""
        with hub_errors("push_to_hub (creating the Hub repository)"):
            super().init_hf_repo(token=token, private=private)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """`Trainer.push_to_hub` that refuses a diverged model and fails with one line without network.

        Without network the model is still saved in `output_dir` (also when the Hub repository could not be created,
        which `Trainer` tries before saving), and the `HubConnectionError` says where and how to push it later.
        """
        self._refuse_broken_model("push_to_hub()")
        self._push_saved = False
        try:
            return super().push_to_hub(
                commit_message=commit_message,
                blocking=blocking,
                token=token,
                revision=revision,
                private=private,
                **kwargs,
            )
        except Exception as err:
            if not (isinstance(err, HubConnectionError) or is_connection_error(err)):
                raise
            original = err.__context__ if isinstance(err, HubConnectionError) and err.__context__ is not None else err
            if not self._push_saved and self.args.should_save:
                self.save_model()  # the repository could not be created before Trainer saved: save now, lose nothing
            saved_in = str(self.args.output_dir)
            repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
            raise HubConnectionError(_hub_failure_message("push_to_hub", original, saved_in, repo_id)) from None

    # Private override: Trainer pushes the model files of a checkpoint folder to the Hub only from here (hub_strategy
    # 'every_save'); for a data-driven adapter the pushed files must be the portable export, not the raw checkpoint.
    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push to the Hub; for FILA models the pushed model files are the portable adapter, not the raw checkpoint.

        `Trainer._push_from_checkpoint` copies the model files of the folder it gets into `output_dir` and uploads
        `output_dir` (without `_*` and `checkpoint-*`); those copies follow the save policy. For a FILA model it
        gets a temporary folder holding the portable rank-2r export instead of the raw rank-r checkpoint.
        """
        model = self.accelerator.unwrap_model(self.model)
        if not is_data_driven_peft_model(model):
            return self._push_files_from(checkpoint_folder)
        # the early exits of Trainer._push_from_checkpoint, checked before paying for the export
        hub_strategy = str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy))
        if not self.is_world_process_zero() or hub_strategy == "end":
            return None
        if hub_strategy in ("checkpoint", "all_checkpoints"):
            raise ValueError(
                f"hub_strategy={hub_strategy!r} uploads raw FILA checkpoints as the model; use "
                "hub_strategy='every_save' or 'end', which push the portable plain-LoRA adapter."
            )
        push_in_progress = getattr(self, "push_in_progress", None)
        if not self.args.hub_always_push and push_in_progress is not None and not push_in_progress.is_done():
            return None
        with tempfile.TemporaryDirectory(prefix="fila_portable_") as portable:
            model.save_pretrained(portable, fila_portable=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(portable)
            return self._push_files_from(portable)

    # Private override: Trainer waits for its background uploads only here and drops their futures unexamined, so this
    # is the one place a failed upload can be reported.
    def _finish_current_push(self) -> None:
        """`Trainer._finish_current_push` (wait for background uploads), then report the ones that failed."""
        super()._finish_current_push()
        self._report_failed_pushes()

    def _report_failed_pushes(self) -> None:
        """Log one warning line for each finished background upload that raised (each reported once).

        `Trainer` uploads checkpoints with `run_as_future=True` and drops the futures unexamined, so without this
        a push that failed (no network, no permission) would go unnoticed.
        """
        progress = getattr(self, "push_in_progress", None)
        reported = self.__dict__.setdefault("_reported_push_failures", set())
        for job in getattr(progress, "jobs", None) or []:
            if not job.done() or job.cancelled() or id(job) in reported or job.exception() is None:
                continue
            reported.add(id(job))
            err = job.exception()
            if is_connection_error(err):
                message = _hub_failure_message("background push of a checkpoint to the Hub", err)
            else:
                message = f"background push of a checkpoint to the Hub failed: {type(err).__name__}: {err}"
            logger.warning(" ".join(message.split()) + f" The local save in {self.args.output_dir} is complete.")

    def _push_files_from(self, folder: str) -> None:
        self._refuse_broken_model("pushing to the Hub", check_weights=False)
        self._report_failed_pushes()  # the previous uploads: Trainer replaces their futures once they are done
        names = [p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("rng_state")]
        names = [n for n in names if n not in _CHECKPOINT_ONLY] + [_TRAINING_ARGS_NAME]
        if self.is_world_process_zero():
            check_save_folder(self.args.output_dir, names=names, adapter=False, overwrite=self._overwrite_allowed())
        with hub_errors(
            "push to the Hub", saved_in=str(self.args.output_dir), repo_id=getattr(self, "hub_model_id", None)
        ):
            super()._push_from_checkpoint(folder)
        if self.is_world_process_zero():
            record_written(self.args.output_dir, [n for n in names if (Path(self.args.output_dir) / n).is_file()])

    # ---- model card --------------------------------------------------------------------------------------------

    def _final_metrics(self) -> dict[str, float]:
        """Latest logged train/forget/retain losses and NLLs, and every evaluation metric, for the model card."""
        keep = ("train_loss", "forget_loss", "forget_nll", "retain_loss", "retain_nll")
        latest: dict[str, float] = {}
        for entry in self.state.log_history:
            for key, value in entry.items():
                wanted = key in keep or (key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")))
                if wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
                    latest[key] = float(value)
        return latest

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write `README.md` (objective, data sizes, adapter and hyper-parameters, citation) on the main process.

        The card is written only where no user README.md exists (see
        [`peft_unlearn.save_policy`][peft_unlearn.save_policy]), and never for a run that diverged.

        Args:
            model_name: Title of the card (default: the output folder name).
            dataset_name: Hub dataset id(s) for the metadata.
            tags: Extra tags.
            output_dir: Folder of the card (default `args.output_dir`).
            **kwargs: Accepted for compatibility with `Trainer.push_to_hub` (`tags` among them is used).
        """
        if not self.is_world_process_zero():
            return
        self._refuse_broken_model("writing a model card", check_weights=False)
        from .model_card import build_model_card

        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        is_peft = is_peft_model(model)
        base = model.get_base_model() if is_peft else model
        base_model = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        if base_model and os.path.isdir(base_model):
            base_model = None
        adapter = None
        data_driven_init = None
        if is_peft:
            config = model.peft_config[model.active_adapter]
            adapter = {
                "peft_type": getattr(getattr(config, "peft_type", None), "value", None),
                "r": getattr(config, "r", None),
                "lora_alpha": getattr(config, "lora_alpha", None),
                "target_modules": sorted(config.target_modules)
                if isinstance(getattr(config, "target_modules", None), (set, list))
                else getattr(config, "target_modules", None),
                "init_lora_weights": getattr(config, "init_lora_weights", None),
            }
            data_driven_init = init_name(getattr(config, "init_lora_weights", None))
            if (
                data_driven_init is not None
            ):  # r / lora_alpha above are the adapter's; the published plain LoRA has twice the rank
                from peft_unlearn.fila.saving import portable_lora_config

                portable = portable_lora_config(config)
                adapter["published_r"] = portable.r
                adapter["published_lora_alpha"] = portable.lora_alpha
        args = self.args
        hyper = {
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
            "max_steps": args.max_steps if args.max_steps > 0 else None,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_length": args.max_length,
            "retain_pairing": args.retain_pairing,
            "seed": args.seed,
        }
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = build_model_card(
            base_model=base_model,
            model_name=model_name or Path(output_dir).name,
            hub_model_id=getattr(self, "hub_model_id", None),
            forget_loss=args.forget_loss,
            retain_loss=args.retain_loss,
            forget_weight=args.forget_weight,
            retain_weight=args.retain_weight,
            beta=args.beta,
            datasets=self._dataset_sizes,
            dataset_name=dataset_name,
            hyperparameters=hyper,
            adapter=adapter,
            init=data_driven_init,
            metrics=self._final_metrics(),
            tags=extra_tags,
            library_name="peft" if is_peft else "transformers",
            robustness=self._robustness_report(),
        )
        write_model_card(output_dir, card)

    def _robustness_report(self) -> dict[str, Any] | None:
        """The ``to_dict()`` of the last `RobustnessCallback` that ran, or None."""
        from .callbacks import RobustnessCallback

        reports = [cb.report for cb in self.callback_handler.callbacks if isinstance(cb, RobustnessCallback)]
        reports = [r for r in reports if r is not None]
        return reports[-1].to_dict() if reports else None
