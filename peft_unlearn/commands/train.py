"""`peft-unlearn train`: unlearn a forget set with `UnlearningTrainer` and save a portable adapter (or model)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..fila.registry import INITS, is_data_driven_init
from ..utils import one_line
from . import PROG, CLIError, ModelDataArguments, arg, info, load_model, load_sets, parse

__all__ = ["TrainArguments", "parse_train_args", "run_train"]


@dataclass
class TrainArguments(ModelDataArguments):
    """Model, data and LoRA options of `peft-unlearn train` (the rest comes from `UnlearningConfig`)."""

    _argument_group_name = "model, data and LoRA options"
    _positive = ("lora_r", "lora_alpha", "max_forget_samples", "max_retain_samples")

    # the choices are PEFT's default, the registry's data-driven inits (peft_unlearn.fila.registry) and none
    init: Literal[("default", *INITS, "none")] = arg(  # type: ignore[valid-type]
        "Adapter: 'default' (PEFT's LoRA init, recommended: no data-driven init kept more at the same forgetting "
        "speed in the library's benchmark), "
        + ", ".join(f"'{entry.name}' ({entry.summary}, {entry.paper})" for entry in INITS.values())
        + " or 'none' (full fine-tuning, no PEFT; pass a low --learning_rate such as 1e-5).",
        "default",
    )
    lora_r: int = arg("LoRA rank r (ignored with --init none).", 8, "R")
    lora_alpha: int = arg("LoRA alpha; the update is scaled by alpha/r.", 16, "ALPHA")
    lora_dropout: float = arg("LoRA dropout probability.", 0.0, "P")
    target_modules: list[str] = arg("Modules to adapt: 'all-linear' or names, e.g. q_proj v_proj.", ["all-linear"])
    max_forget_samples: int | None = arg("Use only the first N forget examples.", None, "N")
    max_retain_samples: int | None = arg("Use only the first N retain examples.", None, "N")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout: must be in [0, 1), got {self.lora_dropout}")


_DESCRIPTION = """\
Unlearn a forget set; save a portable PEFT LoRA adapter (or, with --init none, the model) and the
tokenizer. Every UnlearningConfig / TrainingArguments field is a flag; --output is short for
--output_dir. Reference: docs/cli.md. Exit codes: 0 ok, 1 failed or trained no step, 2 usage error."""

_OUTPUT_FLAGS = ("--output_dir", "--output-dir")


def parse_train_args(argv: Sequence[str]) -> tuple[TrainArguments, Any]:
    """Parse and check `peft-unlearn train` arguments without loading anything.

    Args:
        argv: The arguments after `train`.

    Returns:
        `(TrainArguments, UnlearningConfig)`.

    Raises:
        CLIError: (exit 2) an unknown flag, a bad value or a missing `--output`.

    Examples:
        >>> script_args, config = parse_train_args(
        ...     ["--model", "m", "--forget", "f.jsonl", "--forget-loss", "npo", "--output", "out", "--report_to", "none"]
        ... )
        >>> script_args.init, config.forget_loss, config.beta, config.output_dir
        ('default', 'npo', 0.1, 'out')
    """
    from peft_unlearn.trainer.unlearning_config import UnlearningConfig

    argv = [_OUTPUT_FLAGS[0] + a[len("--output") :] if a.split("=")[0] == "--output" else a for a in argv]
    usage = f"{PROG} train --model NAME_OR_PATH --forget FILE [--retain FILE] --output OUTPUT_DIR [options]"
    parser, (script_args, config) = parse(
        "train", [TrainArguments, UnlearningConfig], argv, usage=usage, description=_DESCRIPTION
    )
    if parser.get_default("output_dir") is None and not any(a.split("=")[0] in _OUTPUT_FLAGS for a in argv):
        raise CLIError("--output (or --output_dir) is required: the directory for the adapter and tokenizer")
    return script_args, config


def run_train(argv: list[str]) -> None:
    """Run `peft-unlearn train ARGV` (errors raise `CLIError`)."""
    from peft import LoraConfig

    from peft_unlearn.losses import reference_users
    from peft_unlearn.save_policy import check_save_folder
    from peft_unlearn.trainer.unlearning_trainer import UnlearningTrainer

    args, config = parse_train_args(argv)
    if args.retain is None and config.retain_loss is not None:
        fix = "pass --retain FILE, or --retain_loss none to train on the forget set alone"
        raise CLIError(f"--retain is required with --retain_loss {config.retain_loss}; {fix}")
    sets = load_sets(args, forget=args.max_forget_samples, retain=args.max_retain_samples)
    forget, retain = sets["forget"], sets.get("retain")
    # refuse an --output that holds files this library did not write before loading the model (exit 1)
    check_save_folder(config.output_dir, adapter=args.init != "none", overwrite=config.overwrite_output)

    info(f"Loading model {args.model!r}...")
    model, tokenizer = load_model(args)
    peft_config = ref_model = None
    if args.init != "none":
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules[0] if len(args.target_modules) == 1 else args.target_modules,
            init_lora_weights=args.init if is_data_driven_init(args.init) else True,
            task_type="CAUSAL_LM",
        )
    elif reference_users(config.forget_loss, config.retain_loss):
        info("Loading a frozen copy of the model as reference (needed by the chosen losses with --init none)...")
        ref_model, _ = load_model(args)
    try:
        trainer = UnlearningTrainer(
            model=model,
            args=config,
            forget_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
            eval_dataset=dict(sets) if config.eval_strategy != "no" else None,
            peft_config=peft_config,
            ref_model=ref_model,
        )
    except (ValueError, TypeError) as err:  # data or configuration the trainer rejects
        raise CLIError(one_line(err)) from err

    losses = f"forget_loss={config.forget_loss}, retain_loss={config.retain_loss}"
    info(f"Unlearning {len(forget)} forget and {len(retain or [])} retain examples (--init {args.init}, {losses})")
    # the trainer raises on a run of zero steps, and the save policy on an --output it may not write: `main` reports
    # either as exit 1, and nothing is saved
    trainer.train()
    trainer.save_model(config.output_dir)  # FILA/VILA adapters as portable plain LoRA, with the tokenizer
    if trainer.is_world_process_zero():
        _report_saved(Path(config.output_dir), args)


def _report_saved(output_dir: Path, args: TrainArguments) -> None:
    rank = args.init != "none" and json.loads((output_dir / "adapter_config.json").read_text(encoding="utf-8"))["r"]
    kind = {"none": "model", "default": f"plain PEFT LoRA adapter (rank {rank})"}.get(
        args.init, f"{args.init.upper()} adapter as a plain PEFT LoRA (rank {rank} = 2 x --lora_r, portable)"
    )
    print(f"Saved the {kind} and the tokenizer to {output_dir}")
    if rank:
        base = f"AutoModelForCausalLM.from_pretrained({args.model!r})"
        print(f"Load it with: PeftModel.from_pretrained({base}, {str(output_dir)!r})")
    model = f"{output_dir} " if args.init == "none" else f"{args.model} --adapter {output_dir} "
    print(f"Evaluate it with: {PROG} eval --model {model}--forget {args.forget}")
