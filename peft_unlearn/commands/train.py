"""`peft-unlearn train`: unlearn a forget set with `UnlearningTrainer` and save a portable adapter (or model).

Examples:
    >>> script_args, config = parse_train_args(
    ...     ["--model", "m", "--forget", "f.jsonl", "--output", "out", "--report_to", "none"]
    ... )
    >>> script_args.init, config.forget_loss
    ('fila', 'inverted_hinge')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .common import (
    _ALIASES,
    _DTYPE,
    _FORMATS,
    _MODEL,
    EXIT_FAILURE,
    EXIT_OK,
    PROG,
    CLIError,
    DType,
    _arg,
    _info,
    _load_model,
    _load_set,
    _one_line,
    _parse,
)

__all__ = ["TrainArguments", "parse_train_args", "run_train"]


@dataclass
class TrainArguments:
    """Model, data and LoRA options of `peft-unlearn train` (the rest comes from `UnlearningConfig`).

    Examples:
        >>> TrainArguments(model="gemma3-270m", forget="forget.jsonl").init
        'fila'
    """

    _argument_group_name = "model, data and LoRA options"

    model: str = field(metadata={"help": _MODEL, "metavar": "NAME_OR_PATH", "aliases": _ALIASES})
    forget: str = field(metadata={"help": f"Forget set: {_FORMATS}.", "metavar": "FILE"})
    retain: str | None = _arg("Retain set (same formats as --forget); needed by retain losses.", None, "FILE")
    heldout: str | None = _arg("Held-out set, scored with the others when --eval_strategy is not 'no'.", None, "FILE")
    init: Literal["fila", "vila", "default", "none"] = _arg(
        "Adapter: 'fila' (Fisher-weighted LoRA init, the paper's), 'vila' (gradient-variance-weighted LoRA init, "
        "arXiv 2508.21300), 'default' (PEFT's LoRA init) or 'none' (full fine-tuning, no PEFT).",
        "fila",
    )
    lora_r: int = _arg("LoRA rank r (ignored with --init none).", 8, "R")
    lora_alpha: int = _arg("LoRA alpha; the update is scaled by alpha/r.", 16, "ALPHA")
    lora_dropout: float = _arg("LoRA dropout probability.", 0.0, "P")
    target_modules: list[str] = _arg("Modules to adapt: 'all-linear' or names, e.g. q_proj v_proj.", ["all-linear"])
    dtype: DType | None = _arg(_DTYPE)
    text_split: Literal["line", "paragraph"] = _arg(
        "How .txt files split into examples: per line or paragraph.", "line"
    )
    max_forget_samples: int | None = _arg("Use only the first N forget examples.", None, "N")
    max_retain_samples: int | None = _arg("Use only the first N retain examples.", None, "N")
    trust_remote_code: bool = _arg("Allow custom model code from the Hub.", False)

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise CLIError(f"--lora_r: must be a positive integer, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise CLIError(f"--lora_alpha: must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise CLIError(f"--lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        for name in ("max_forget_samples", "max_retain_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CLIError(f"--{name}: must be a positive integer, got {getattr(self, name)}")


_TRAIN_DESCRIPTION = """\
Unlearn a forget set from a causal language model and save the result.

With --init fila (default) or --init default a LoRA adapter is trained and saved as a plain,
portable PEFT adapter (FILA adapters are converted to a rank-2r LoRA that loads with
PeftModel.from_pretrained on the ORIGINAL base model); with --init none the whole model is
fine-tuned and saved. The tokenizer is saved next to it.

Every UnlearningConfig / transformers.TrainingArguments field is a flag (--name or --dash-name),
e.g. --forget_loss, --retain_loss, --learning_rate, --max_steps, --report_to, --use_cpu;
--output is short for --output_dir. --config FILE.yaml reads defaults (keys are field names)."""

_TRAIN_EPILOG = """\
data formats: .json, .jsonl, .csv, .tsv, .parquet, .txt (one example per non-empty line;
--text_split paragraph for blank-line-separated paragraphs) or a Dataset.save_to_disk directory;
columns: text | prompt+completion | messages | input_ids (see docs/cli.md).

example:
  peft-unlearn train --model gemma3-270m --forget forget.jsonl --retain retain.jsonl \\
      --init fila --forget_loss inverted_hinge --output unlearned --max_steps 20

exit codes: 0 ok, 1 training failed or trained no step, 2 usage error."""

_OUTPUT_FLAGS = ("--output_dir", "--output-dir")


def parse_train_args(argv: Sequence[str]) -> tuple[TrainArguments, Any]:
    """Parse and check `peft-unlearn train` arguments without loading anything.

    Args:
        argv: The arguments after `train`.

    Returns:
        `(TrainArguments, UnlearningConfig)`.

    Raises:
        CLIError: (exit 2) unknown flag, bad value, missing `--output`.

    Examples:
        >>> script_args, config = parse_train_args(
        ...     ["--model", "m", "--forget", "f.jsonl", "--forget-loss", "npo", "--output", "out", "--report_to", "none"]
        ... )
        >>> script_args.init, config.forget_loss, config.beta, config.output_dir
        ('fila', 'npo', 0.1, 'out')
    """
    from peft_unlearn.trainer.unlearning_config import UnlearningConfig

    argv = [_OUTPUT_FLAGS[0] + arg[len("--output") :] if arg.split("=")[0] == "--output" else arg for arg in argv]
    usage = f"{PROG} train --model NAME_OR_PATH --forget FILE [--retain FILE] --output OUTPUT_DIR [options]"
    parser, (script_args, config) = _parse(
        "train", [TrainArguments, UnlearningConfig], argv, usage=usage, description=_TRAIN_DESCRIPTION,
        epilog=_TRAIN_EPILOG,
    )  # fmt: skip
    if parser.get_default("output_dir") is None and not any(a.split("=")[0] in _OUTPUT_FLAGS for a in argv):
        raise CLIError("--output (or --output_dir) is required: the directory for the adapter and tokenizer")
    return script_args, config


def run_train(argv: list[str]) -> int:
    """Run `peft-unlearn train ARGV`; returns the exit code (errors raise `CLIError`)."""
    from peft import LoraConfig

    from peft_unlearn.losses import reference_users
    from peft_unlearn.save_policy import check_save_folder
    from peft_unlearn.trainer.unlearning_trainer import UnlearningTrainer

    script_args, config = parse_train_args(argv)
    forget = _load_set(script_args.forget, "--forget", script_args.text_split, script_args.max_forget_samples)
    retain = heldout = None
    if script_args.retain is not None:
        retain = _load_set(script_args.retain, "--retain", script_args.text_split, script_args.max_retain_samples)
    elif config.retain_loss is not None:
        raise CLIError(
            f"--retain is required with --retain_loss {config.retain_loss}; pass --retain FILE, or --retain_loss none "
            "to train on the forget set alone"
        )
    if script_args.heldout is not None:
        heldout = _load_set(script_args.heldout, "--heldout", script_args.text_split, None)
    eval_sets = None
    if str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no":
        eval_sets = {
            k: v for k, v in {"forget": forget, "retain": retain, "heldout": heldout}.items() if v is not None
        }

    try:  # refuse an --output that holds files this library did not write before loading the model
        check_save_folder(config.output_dir, adapter=script_args.init != "none", overwrite=config.overwrite_output)
    except (FileExistsError, NotADirectoryError) as err:
        raise CLIError(_one_line(err), EXIT_FAILURE) from err
    _info(f"Loading model {script_args.model!r}...")
    model, tokenizer = _load_model(script_args.model, script_args.dtype, script_args.trust_remote_code)
    peft_config = None
    if script_args.init != "none":
        targets = script_args.target_modules
        peft_config = LoraConfig(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=targets[0] if len(targets) == 1 else targets,
            init_lora_weights=script_args.init if script_args.init in ("fila", "vila") else True,
            task_type="CAUSAL_LM",
        )
    ref_model = None
    if peft_config is None and reference_users(config.forget_loss, config.retain_loss):
        _info("Loading a frozen copy of the model as reference (needed by the chosen losses with --init none)...")
        ref_model, _ = _load_model(script_args.model, script_args.dtype, script_args.trust_remote_code)
    try:
        trainer = UnlearningTrainer(
            model=model,
            args=config,
            forget_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
            eval_dataset=eval_sets,
            peft_config=peft_config,
            ref_model=ref_model,
        )
    except (ValueError, TypeError) as err:  # data or configuration the trainer rejects
        raise CLIError(_one_line(err)) from err

    what = {"fila": "FILA LoRA", "vila": "VILA LoRA", "default": "LoRA", "none": "full fine-tuning"}[script_args.init]
    with_retain = f" with {len(retain)} retain examples" if retain is not None else ""
    _info(
        f"Unlearning {len(forget)} forget examples{with_retain} ({what}, forget_loss={config.forget_loss}, "
        f"retain_loss={config.retain_loss})"
    )
    try:
        trainer.train()
    except (FileExistsError, NotADirectoryError) as err:  # the save policy refused the output folder
        raise CLIError(_one_line(err), EXIT_FAILURE) from err
    if trainer.state.global_step == 0:
        raise CLIError(
            f"training ran zero optimizer steps (max_steps={config.max_steps}, num_train_epochs="
            f"{config.num_train_epochs}, {len(forget)} forget examples), so nothing was unlearned and nothing was "
            "saved; raise --max_steps or --num_train_epochs",
            EXIT_FAILURE,
        )
    output_dir = Path(config.output_dir)
    trainer.save_model(str(output_dir))  # FILA adapters are saved as portable plain LoRA
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
        _report_saved(output_dir, script_args)
    return EXIT_OK


def _report_saved(output_dir: Path, args: TrainArguments) -> None:
    adapter_config = output_dir / "adapter_config.json"
    if args.init == "none" or not adapter_config.is_file():
        print(f"Saved the model and the tokenizer to {output_dir}")
        print(f"Evaluate it with: {PROG} eval --model {output_dir} --forget {args.forget}")
        return
    cfg = json.loads(adapter_config.read_text(encoding="utf-8"))
    if cfg.get("init_lora_weights") == "fila":
        kind = "raw FILA adapter (needs peft_unlearn and _fila_init/ to load)"
    elif args.init in ("fila", "vila"):
        kind = f"{args.init.upper()} adapter as a plain PEFT LoRA (rank {cfg.get('r')} = 2 x --lora_r, portable)"
    else:
        kind = f"plain PEFT LoRA adapter (rank {cfg.get('r')})"
    print(f"Saved the {kind} and the tokenizer to {output_dir}")
    print(
        f"Load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({args.model!r}), {str(output_dir)!r})"
    )
    print(f"Evaluate it with: {PROG} eval --model {args.model} --adapter {output_dir} --forget {args.forget}")
