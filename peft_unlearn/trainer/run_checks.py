"""Checks of a training run at its boundaries: data against the model, resume folders, and the step count.

Each check raises (or warns) with the argument, the value, what was expected and the fix, instead of a raw
torch `IndexError`, a CUDA assert deep in an embedding, or a run that reports a saved adapter after zero steps.

Examples:
    >>> check_token_ids([{"input_ids": [1, 2, 3]}], vocab_size=10, name="forget")
    >>> check_token_ids([{"input_ids": [1, 12]}], vocab_size=10, name="forget")
    Traceback (most recent call last):
    ...
    ValueError: forget example 0 holds token id 12, outside the model's vocabulary (embedding size 10, ids 0..9). The tokenizer does not match the model: pass the model's own tokenizer (AutoTokenizer.from_pretrained of the same checkpoint), or resize the embeddings with model.resize_token_embeddings(len(tokenizer)).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..utils import is_peft_model

__all__ = [
    "CorruptCheckpointError",
    "check_causal_lm",
    "check_liger_kernel",
    "check_checkpoint_files",
    "check_reference_vocab",
    "check_resume_checkpoint",
    "check_sequence_lengths",
    "check_token_ids",
    "check_tokenizer_fits",
    "check_trainer_options",
    "check_trained_some_steps",
    "check_trains_some_steps",
    "embedding_size",
    "load_causal_lm",
    "max_positions",
    "warn_full_finetune_learning_rate",
    "warn_ignored_run_options",
]


logger = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """A checkpoint or weights file cannot be read; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# vocabulary and lengths
# ----------------------------------------------------------------------------------------------------------------


def embedding_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (the valid token ids are ``0 .. size - 1``), or None if unknown."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embedding supports (`max_position_embeddings`, `n_positions`)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fix_vocab() -> str:
    return (
        "The tokenizer does not match the model: pass the model's own tokenizer (AutoTokenizer.from_pretrained of "
        "the same checkpoint), or resize the embeddings with model.resize_token_embeddings(len(tokenizer))."
    )


def check_tokenizer_fits(tokenizer: Any, model: nn.Module) -> None:
    """Raise if the tokenizer can produce ids the model's embedding does not have.

    Args:
        tokenizer: The tokenizer of the run.
        model: The model (or PeftModel).

    Raises:
        ValueError: If `len(tokenizer)` exceeds the embedding size.
    """
    size = embedding_size(model)
    try:
        n_tokens = len(tokenizer)
    except TypeError:
        return
    if size is not None and n_tokens > size:
        raise ValueError(
            f"`processing_class` has {n_tokens} tokens but the model's embedding has {size} rows, so ids "
            f"{size}..{n_tokens - 1} would crash inside the embedding. {_fix_vocab()}"
        )


def check_token_ids(examples: Sequence[Any], vocab_size: int | None, name: str) -> None:
    """Raise if a tokenized example holds an id outside ``0 .. vocab_size - 1``.

    Args:
        examples: Dicts with `input_ids` (the trainer's tokenized data).
        vocab_size: The model's embedding size (None: nothing to check).
        name: The data set, for the message (``"forget"``, ``"retain"``, ...).

    Raises:
        ValueError: Naming the set, the example and the id.
    """
    if vocab_size is None:
        return
    for index, example in enumerate(examples):
        columns = {"input_ids": example["input_ids"]} if isinstance(example, dict) else {"input_ids": example}
        if isinstance(example, dict) and example.get("labels") is not None:
            columns["labels"] = [t for t in example["labels"] if t != -100]
        for column, ids in columns.items():
            if len(ids) == 0:
                continue
            low, high = min(ids), max(ids)
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                where = "" if column == "input_ids" else f" in {column!r}"
                raise ValueError(
                    f"{name} example {index} holds token id {bad}{where}, outside the model's vocabulary (embedding "
                    f"size {vocab_size}, ids 0..{vocab_size - 1}). {_fix_vocab()}"
                )


def check_sequence_lengths(examples: Sequence[Any], limit: int | None, name: str, max_length: int | None) -> None:
    """Raise if a tokenized example is longer than the model's positions.

    The trainer truncates to `max_length`; a sequence that is still longer than the model supports is refused
    rather than truncated again (a second, silent cut would change what is unlearned).

    Args:
        examples: Dicts with `input_ids`.
        limit: The model's `max_position_embeddings` (None: nothing to check).
        name: The data set, for the message.
        max_length: The run's `max_length`, for the fix.

    Raises:
        ValueError: Naming the set, the example, its length and the limit.
    """
    if limit is None:
        return
    for index, example in enumerate(examples):
        length = len(example["input_ids"] if isinstance(example, dict) else example)
        if length > limit:
            raise ValueError(
                f"{name} example {index} has {length} tokens, more than the model's {limit} positions "
                f"(max_position_embeddings), with max_length={max_length!r}. Set max_length <= {limit} "
                "(sequences are then truncated on the right), or shorten the data."
            )


def check_reference_vocab(model: nn.Module, ref_model: nn.Module | None) -> None:
    """Raise if the reference model (NPO / KL) has another vocabulary than the trained model.

    Raises:
        ValueError: With both sizes.
    """
    if ref_model is None:
        return
    ours, theirs = embedding_size(model), embedding_size(ref_model)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(
            f"`ref_model` has a vocabulary of {theirs} tokens but the trained model has {ours}; NPO and KL compare "
            "their token distributions position by position, so both must use the same tokenizer. Pass a frozen copy "
            "of the initial model as `ref_model` (or train a PEFT adapter and omit `ref_model`)."
        )


# ----------------------------------------------------------------------------------------------------------------
# resume and checkpoint files
# ----------------------------------------------------------------------------------------------------------------


def check_checkpoint_files(folder: str | os.PathLike[str]) -> None:
    """Read the headers of a checkpoint's files and raise, naming the file, if one is corrupt.

    Checks every `*.safetensors` (header only), every `*.json`, and that `*.bin` / `*.pt` / `*.pth` files are
    not empty. Cheap: no tensor is loaded.

    Args:
        folder: A checkpoint or save folder.

    Raises:
        CorruptCheckpointError: Naming the unreadable file.
    """
    from safetensors import safe_open

    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix in (".bin", ".pt", ".pth") and path.stat().st_size == 0:
                raise ValueError("the file is empty")
        except Exception as err:  # noqa: BLE001 - every reader error means the same: the file is unusable
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CorruptCheckpointError(
                f"The file {str(path)!r} is corrupt or truncated ({type(err).__name__}: {first}). Restore it from a "
                "backup or resume from another checkpoint (or start without resume_from_checkpoint)."
            ) from None


def check_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """Resolve `resume_from_checkpoint` and check that the folder exists and its files are readable.

    Args:
        resume_from_checkpoint: None/False (no resume), True (the last checkpoint in `output_dir`) or a folder.
        output_dir: The run's `output_dir`.

    Returns:
        The checkpoint folder, or None without resume.

    Raises:
        ValueError: If the folder does not exist, is not a folder, or (True) `output_dir` has no checkpoint.
        CorruptCheckpointError: If a file in it is corrupt.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(
                f"resume_from_checkpoint=True but output_dir={output_dir!r} holds no checkpoint-* folder. Pass the "
                "checkpoint folder explicitly, or start without resume_from_checkpoint."
            )
        resume_from_checkpoint = last
    path = Path(resume_from_checkpoint)
    if not path.exists():
        raise ValueError(
            f"resume_from_checkpoint={str(resume_from_checkpoint)!r} does not exist. Pass an existing checkpoint folder "
            "(e.g. <output_dir>/checkpoint-500), True for the last one in output_dir, or None to start afresh."
        )
    if not path.is_dir():
        raise ValueError(
            f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is a file; pass the checkpoint folder that holds it."
        )
    check_checkpoint_files(path)
    return str(path)


def load_causal_lm(name_or_path: str, kwargs: dict[str, Any] | None, arg: str = "model") -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` with errors that name the argument, the value and the fix.

    Args:
        name_or_path: A local model folder or a Hub id.
        kwargs: Keyword arguments for `from_pretrained`.
        arg: The argument that held the path (``"model"``, ``"ref_model"``), for the message.

    Returns:
        The loaded model.

    Raises:
        FileNotFoundError: If the value looks like a local path that does not exist.
        CorruptCheckpointError: If a local folder holds an unreadable weights/config file (named).
        OSError: If the model cannot be found or downloaded (the first line of the cause is kept).
    """
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"`{arg}`={name_or_path!r} looks like a local path but does not exist. Pass an existing model folder "
            "(with config.json), a Hub id such as 'org/name', or a loaded model."
        )
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **(kwargs or {}))
    except Exception as err:
        if path.is_dir():
            check_checkpoint_files(path)  # names a corrupt file if there is one
        if isinstance(err, OSError):
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise OSError(
                f"`{arg}`={name_or_path!r} could not be loaded: {first} Pass an existing model folder, or a Hub id "
                "that is reachable (or cached, when offline)."
            ) from err
        raise


# ----------------------------------------------------------------------------------------------------------------
# step count
# ----------------------------------------------------------------------------------------------------------------


def check_trains_some_steps(args: Any) -> None:
    """Raise before training when the settings give zero optimizer steps (nothing would be unlearned).

    Raises:
        ValueError: For `max_steps <= 0` together with `num_train_epochs <= 0`.
    """
    max_steps = getattr(args, "max_steps", -1)
    epochs = getattr(args, "num_train_epochs", 1.0)
    if (max_steps is None or max_steps <= 0) and epochs is not None and epochs <= 0:
        raise ValueError(
            f"num_train_epochs={epochs!r} with max_steps={max_steps!r} trains for zero steps, so the model would be "
            "saved unchanged as if unlearned. Set num_train_epochs > 0 or max_steps > 0."
        )


def check_trained_some_steps(global_step: int, args: Any) -> None:
    """Raise after training that ran zero optimizer steps, so no caller reports an unchanged model as unlearned.

    Raises:
        RuntimeError: If `global_step` is 0.
    """
    if global_step == 0:
        raise RuntimeError(
            f"Training ran zero optimizer steps (max_steps={getattr(args, 'max_steps', None)!r}, num_train_epochs="
            f"{getattr(args, 'num_train_epochs', None)!r}); the model is unchanged and was not saved. Check the "
            "dataset size, batch size and step settings."
        )


def warn_ignored_run_options(args: Any, *, has_retain_data: bool, is_fila: bool) -> list[str]:
    """Warn about options this run ignores: retain settings without retain data, FILA settings without FILA.

    Returns:
        The warning messages.
    """
    messages: list[str] = []
    if not has_retain_data:
        used = [n for n, d in (("retain_weight", 1.0), ("retain_pairing", "random")) if getattr(args, n, d) != d]
        if used:
            messages.append(f"{', '.join(f'`{n}`' for n in used)} ignored: the run has no retain data.")
    if not is_fila:
        defaults = {"fila_batch_size": 4, "fila_max_batches": None, "fila_cache": None, "fila_seed": None}
        if (getattr(args, "retain_subspace_weight", 0) or 0) > 0:  # its statistics pass reads these two
            defaults = {n: d for n, d in defaults.items() if n not in ("fila_batch_size", "fila_max_batches")}
        used = [n for n, d in defaults.items() if getattr(args, n, d) != d]
        if used:
            messages.append(
                f"{', '.join(f'`{n}`' for n in used)} ignored: the model has no FILA adapter "
                "(LoraConfig(init_lora_weights='fila'))."
            )
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=3)
    return messages


def _causal_lm_class_names() -> set[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def check_liger_kernel(args: Any, fused_loss: bool) -> None:
    """Keep a script with `use_liger_kernel=True` working where Liger-Kernel is not installed (CPU, no CUDA).

    Liger's fused cross-entropy only serves the NLL and returns ``logits=None``; the fused linear + loss path of
    peft_unlearn covers every unlearning loss. With that path active and Liger missing, the flag is switched off
    with a warning; without it (``fused_loss=False`` or an unsupported model) this is an error that says what to do.
    With Liger installed nothing changes (its patched forward still feeds the fused path its hidden states).

    Args:
        args: The `UnlearningConfig` (its `use_liger_kernel` may be set to False).
        fused_loss: Whether the run uses the fused path.

    Raises:
        ImportError: If `use_liger_kernel=True`, liger-kernel is missing and the fused path is off.
    """
    from transformers.utils import is_liger_kernel_available

    if not getattr(args, "use_liger_kernel", False) or is_liger_kernel_available():
        return
    if not fused_loss:
        raise ImportError(
            "use_liger_kernel=True, but liger-kernel is not installed (it needs a CUDA GPU: `pip install "
            "liger-kernel`). peft_unlearn does not need it: set `fused_loss='auto'` (the default) or True, whose fused "
            "linear + loss path computes every unlearning loss without materializing the logits, and "
            "`use_liger_kernel=False`."
        )
    logger.warning(
        "use_liger_kernel=True is ignored: liger-kernel is not installed, and the fused linear + loss path "
        "(fused_loss=%r) already computes the losses without materializing the logits.",
        args.fused_loss,
    )
    args.use_liger_kernel = False


def check_causal_lm(model: Any) -> None:
    """Raise unless `model` (or the base model of a PeftModel) is a causal language model.

    Raises:
        ValueError: For any other model class.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    name = type(base).__name__
    if name in _causal_lm_class_names() or name.endswith(("ForCausalLM", "LMHeadModel")):
        return
    raise ValueError(
        f"`model` must be a causal language model (a `*ForCausalLM`, e.g. loaded with "
        f"`AutoModelForCausalLM.from_pretrained`), got {name}. Unlearning needs next-token logits over the "
        "vocabulary; load the checkpoint with AutoModelForCausalLM instead."
    )


def warn_full_finetune_learning_rate(args: Any, *, has_adapter: bool) -> str | None:
    """Warn when a full model (no PEFT adapter) trains at `UnlearningConfig`'s adapter learning rate or above.

    The default `learning_rate=1e-3` suits LoRA adapters; on every weight of a model it wrecks the model in a few
    steps, so a full fine-tuning run at 1e-3 or more gets a warning (the run still starts: the rate may be intended).

    Args:
        args: The `UnlearningConfig`.
        has_adapter: Whether the model trains PEFT adapters.

    Returns:
        The warning message, or `None` when there is nothing to warn about.
    """
    if has_adapter or args.learning_rate < 1e-3:
        return None
    message = (
        f"learning_rate={args.learning_rate:g} on a model without a PEFT adapter: every weight is trained, and rates "
        "this large (UnlearningConfig's default 1e-3 is meant for LoRA adapters) usually destroy the model within a "
        "few steps. Pass e.g. learning_rate=1e-5 for full fine-tuning, or wrap the model with peft.get_peft_model."
    )
    warnings.warn(message, UserWarning, stacklevel=3)
    return message


def check_trainer_options(args: Any, *, is_fila: bool) -> None:
    """Options of `UnlearningTrainer` that cannot work together: raise, or warn where the run still makes sense.

    Raises:
        ValueError: For `load_best_model_at_end` on `eval_loss` (never logged), or a checkpoint Hub strategy with a
            FILA adapter (it would upload raw FILA checkpoints).
    """
    if args.load_best_model_at_end and args.metric_for_best_model in ("loss", "eval_loss"):
        raise ValueError(
            "UnlearningTrainer logs per-set metrics (eval_forget_loss, eval_forget_ma, ...) but no `eval_loss`; "
            "set `metric_for_best_model`, e.g. metric_for_best_model='eval_forget_ma' with "
            "greater_is_better=False."
        )

    hub_strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
    if is_fila and args.push_to_hub and hub_strategy in ("checkpoint", "all_checkpoints"):
        raise ValueError(
            f"hub_strategy={hub_strategy!r} uploads raw FILA checkpoints as the model; use "
            "hub_strategy='every_save' or 'end', which push the portable plain-LoRA adapter."
        )

    if args.dataloader_persistent_workers and args.dataloader_num_workers > 0 and args.retain_pairing == "random":
        logger.warning(
            "dataloader_persistent_workers=True keeps the workers' copy of the paired dataset, so the random "
            "forget/retain pairing is not redrawn after the first epoch; set it to False to redraw it."
        )
