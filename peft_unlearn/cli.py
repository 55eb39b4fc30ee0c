"""Command line interface: `peft-unlearn train | eval | env | version`.

Built like TRL's scripts: each command parses its dataclasses with `trl.TrlParser` (so `--config FILE.yaml`
supplies defaults whose keys are field names, and command-line flags win). `train` exposes every
`UnlearningConfig` field (hence every `transformers.TrainingArguments` field) next to the model, data and LoRA
options of `TrainArguments`; `eval` scores memorization (MA, EL_n, NLL, perplexity) of a base model, or a base
model plus an adapter, on forget / retain / held-out sets. See `docs/cli.md`.

Data files (`--forget`, `--retain`, `--heldout`) are read with `datasets.load_dataset`: JSON (a list of records,
a dict of equally long columns or `{"data": [...]}`) and JSON Lines, CSV / TSV (header row), Parquet, TXT (one
example per non-empty line, or per blank-line-separated paragraph with `--text_split paragraph`, in a `text`
column), or a directory written by `datasets.Dataset.save_to_disk`.

Exit codes: 0 success, 1 runtime failure (including a run that trained no step), 2 usage error (bad flag or
value, missing or unreadable input, unsupported file type, dataset without a recognised column, a model path or
adapter directory that does not exist), 130 interrupted.

Examples:
    >>> from peft_unlearn.cli import main
    >>> main(["version"])  # doctest: +SKIP
    peft-unlearn 0.1.0
    0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any, Literal, NoReturn

from trl import TrlParser

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "EvalArguments",
    "TrainArguments",
    "environment_info",
    "format_results_table",
    "main",
    "parse_eval_args",
    "parse_train_args",
]

PROG = "peft-unlearn"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
"""Exit codes: success, runtime failure, usage error, interrupted (Ctrl-C)."""

EVAL_SETS: tuple[str, ...] = ("forget", "retain", "heldout")
_TRACEBACK_ENV = "PEFT_UNLEARN_TRACEBACK"


class CLIError(Exception):
    """An error reported as one line on stderr, then `SystemExit(exit_code)` (`EXIT_USAGE` by default).

    Examples:
        >>> CLIError("--forget: no such file or directory: 'x.jsonl'").exit_code
        2
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def _arg(help: str, default: Any = None, metavar: str | None = None, **metadata: Any) -> Any:
    metadata = {"help": help, **({"metavar": metavar} if metavar else {}), **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_MODEL = "Base model: a local directory, a Hub id, or the alias 'gemma3-270m'."
_ALIASES = ["--model_name_or_path", "--model-name-or-path"]
_FORMATS = ".json, .jsonl, .csv, .tsv, .parquet or .txt file, or a datasets save_to_disk directory"
_DTYPE = "Weight dtype (default: float32 for gemma3-270m, else transformers' default)."
DType = Literal["auto", "float32", "bfloat16", "float16"]


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
    init: Literal["fila", "default", "none"] = _arg(
        "Adapter: 'fila' (Fisher-weighted LoRA init, the paper's), 'default' (PEFT's LoRA init) or 'none' (full "
        "fine-tuning, no PEFT).",
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


@dataclass
class EvalArguments:
    """Options of `peft-unlearn eval`.

    Examples:
        >>> EvalArguments(model="gemma3-270m", forget="forget.jsonl").el_n
        [10]
    """

    _argument_group_name = "evaluation options"

    model: str = field(metadata={"help": _MODEL, "metavar": "NAME_OR_PATH", "aliases": _ALIASES})
    forget: str = field(metadata={"help": f"Forget set: {_FORMATS}.", "metavar": "FILE"})
    adapter: str | None = _arg("PEFT adapter directory (with adapter_config.json), e.g. a train output.", None, "DIR")
    retain: str | None = _arg("Retain set (same formats as --forget).", None, "FILE")
    heldout: str | None = _arg("Held-out set, never trained on (same formats as --forget).", None, "FILE")
    el_n: list[int] = _arg("n-gram sizes of the extraction likelihood EL_n.", [10], "N")
    no_el: bool = _arg("Skip EL_n (it needs greedy generation, the slow part).", False)
    el_prefix_stride: int = _arg("Score EL_n on every k-th prefix only (1 = every prefix, exact).", 1, "K")
    batch_size: int = _arg("Sequences per forward pass.", 8, "B")
    max_length: int = _arg("Truncate every example to this many tokens.", 128, "T")
    max_samples: int | None = _arg("Use only the first N examples of each set.", None, "N")
    completion_only: bool = _arg(
        "Score only the completion / assistant tokens of prompt-completion and chat data (as the trainer's "
        "evaluate() does); --no_completion_only scores every token.",
        True,
    )
    output: str | None = _arg("Write the results as JSON to this file.", None, "FILE.json")
    plot: str | None = _arg("Save a bar chart of MA/EL per set to this image (needs matplotlib).", None, "FILE.png")
    dtype: DType | None = _arg(_DTYPE)
    device: str | None = _arg("Device such as cpu or cuda:0 (default: cuda when available, else cpu).", None, "DEVICE")
    text_split: Literal["line", "paragraph"] = _arg("How .txt files split into examples (see --forget).", "line")
    no_progress: bool = _arg("Hide progress bars.", False)
    trust_remote_code: bool = _arg("Allow custom model code from the Hub.", False)

    def __post_init__(self) -> None:
        if not self.el_n or any(n < 1 for n in self.el_n):
            raise CLIError(f"--el_n: expected positive integers, got {self.el_n}")
        for name in ("batch_size", "el_prefix_stride", "max_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CLIError(f"--{name}: must be a positive integer, got {getattr(self, name)}")
        if self.max_length < 2:
            raise CLIError(f"--max_length: must be at least 2 tokens, got {self.max_length}")


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


class _Parser(TrlParser):
    """`TrlParser` whose argparse errors raise `CLIError` (one line, exit 2) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the line breaks of descriptions and epilogs."""


def _parse(command: str, dataclass_types: list[type], argv: list[str], **kwargs: Any) -> tuple[_Parser, list]:
    """Parse `argv` (and `--config FILE`) into the dataclasses; every problem becomes a `CLIError`."""
    parser = _Parser(dataclass_types, prog=f"{PROG} {command}", formatter_class=_HelpFormatter, **kwargs)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of defaults; keys are field names.")
    try:
        *parsed, from_config, unknown = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except OSError as err:
        raise CLIError(f"--config: cannot read {err.filename or ''!r}: {err.strerror or _one_line(err)}") from err
    except (ValueError, TypeError) as err:  # a config __post_init__, or a YAML file that is not a mapping
        raise CLIError(_one_line(err)) from err
    except Exception as err:  # yaml.YAMLError
        if type(err).__module__.startswith("yaml"):
            raise CLIError(f"--config: cannot parse the YAML file: {_one_line(err)}") from err
        raise
    parsed = [item for item in parsed if not isinstance(item, argparse.Namespace)]  # `--config` itself
    if from_config:
        keys = ", ".join(repr(k[2:]) for k in from_config[::2])
        raise CLIError(f"--config: unknown key(s) {keys}; keys are field names such as learning_rate or output_dir")
    if unknown:
        raise CLIError(f"unrecognized arguments: {' '.join(unknown)} (see '{parser.prog} --help')")
    return parser, parsed


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


_EVAL_DESCRIPTION = """\
Measure memorization of a base model, or of a base model plus a PEFT adapter, on forget /
retain / held-out sets: memorization accuracy (ma), extraction likelihood (el<n>), mean token
negative log-likelihood (nll) and perplexity (ppl). Lower ma/el on the forget set means more
forgotten; the retain and held-out sets show what was kept. Prints a table; --output writes JSON,
--plot a bar chart.

example:
  peft-unlearn eval --model gemma3-270m --adapter unlearned --forget forget.jsonl \\
      --retain retain.jsonl --heldout heldout.jsonl --output results.json --plot results.png"""


def parse_eval_args(argv: Sequence[str]) -> EvalArguments:
    """Parse and check `peft-unlearn eval` arguments without loading anything.

    Args:
        argv: The arguments after `eval`.

    Returns:
        The `EvalArguments`.

    Raises:
        CLIError: (exit 2) unknown flag, bad value, adapter directory without `adapter_config.json`.

    Examples:
        >>> parse_eval_args(["--model", "m", "--forget", "f.jsonl", "--el-n", "5", "10"]).el_n
        [5, 10]
    """
    _, (args,) = _parse("eval", [EvalArguments], list(argv), description=_EVAL_DESCRIPTION)
    if args.adapter is not None:
        _check_adapter_dir(args.adapter)
    if args.device is not None:
        import torch

        try:
            torch.device(args.device)
        except (RuntimeError, ValueError) as err:
            raise CLIError(f"--device: invalid device {args.device!r}: {_one_line(err)}") from err
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise CLIError("--plot needs matplotlib: pip install 'peft-unlearn[plot]'") from err
    for name in ("output", "plot"):
        if getattr(args, name) is not None and Path(getattr(args, name)).expanduser().is_dir():
            raise CLIError(f"--{name}: {getattr(args, name)!r} is a directory; pass a file name")
    return args


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _load_set(path: str, flag: str, text_split: str, max_samples: int | None):
    from peft_unlearn.data_files import DataFileError, check_columns, load_data_file

    try:
        dataset = load_data_file(path, flag=flag, text_split=text_split)
        check_columns(dataset, flag, path)
    except DataFileError as err:
        raise CLIError(str(err)) from err
    return dataset.select(range(max_samples)) if max_samples is not None and max_samples < len(dataset) else dataset


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def _info(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def _load_model(name: str, dtype: str | None, trust_remote_code: bool, show_progress: bool = True):
    from peft_unlearn.models import load_model_and_tokenizer

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return load_model_and_tokenizer(name, dtype=dtype, show_progress=show_progress, **kwargs)
    except FileNotFoundError as err:
        raise CLIError(f"--model: {_one_line(err)}") from err
    except (OSError, ValueError, ImportError) as err:
        raise CLIError(f"--model: cannot load {name!r}: {_one_line(err)}") from err


def _cmd_train(argv: list[str]) -> int:
    from peft import LoraConfig

    from peft_unlearn.losses import reference_users
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
            init_lora_weights="fila" if script_args.init == "fila" else True,
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

    what = {"fila": "FILA LoRA", "default": "LoRA", "none": "full fine-tuning"}[script_args.init]
    with_retain = f" with {len(retain)} retain examples" if retain is not None else ""
    _info(
        f"Unlearning {len(forget)} forget examples{with_retain} ({what}, forget_loss={config.forget_loss}, "
        f"retain_loss={config.retain_loss})"
    )
    trainer.train()
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
    elif args.init == "fila":
        kind = f"FILA adapter as a plain PEFT LoRA (rank {cfg.get('r')} = 2 x --lora_r, portable)"
    else:
        kind = f"plain PEFT LoRA adapter (rank {cfg.get('r')})"
    print(f"Saved the {kind} and the tokenizer to {output_dir}")
    print(
        f"Load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({args.model!r}), {str(output_dir)!r})"
    )
    print(f"Evaluate it with: {PROG} eval --model {args.model} --adapter {output_dir} --forget {args.forget}")


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------


def _check_adapter_dir(adapter: str) -> Path:
    path = Path(adapter).expanduser()
    config_path = path / "adapter_config.json"
    if not path.exists():
        raise CLIError(f"--adapter: no such directory: {adapter!r}")
    if not path.is_dir():
        raise CLIError(f"--adapter: {adapter!r} is a file; pass the adapter directory (with adapter_config.json)")
    if not config_path.is_file():
        raise CLIError(
            f"--adapter: {adapter!r} has no adapter_config.json, so it is not a PEFT adapter directory; pass the "
            "output directory of 'peft-unlearn train' (a full fine-tuned model goes to --model instead)"
        )
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CLIError(f"--adapter: cannot read {str(config_path)!r}: {_one_line(err)}") from err
    if not isinstance(adapter_config, dict):
        raise CLIError(f"--adapter: {str(config_path)!r} does not hold a JSON object")
    if adapter_config.get("init_lora_weights") == "fila" and not (path / "_fila_init").is_dir():
        raise CLIError(
            f"--adapter: {adapter!r} is a raw FILA adapter (init_lora_weights='fila') without the _fila_init/ folder "
            "needed to rebuild its residual base; pass the portable adapter that 'peft-unlearn train' saves instead"
        )
    return path


def _load_adapter(model: Any, adapter: str) -> Any:
    """`PeftModel.from_pretrained`; a raw FILA checkpoint gets its residual base rebuilt from `_fila_init/`."""
    from peft import PeftModel

    path = _check_adapter_dir(adapter)
    raw_fila = (
        json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("init_lora_weights") == "fila"
    )
    try:
        with warnings.catch_warnings():
            if raw_fila:  # the FILA hook warns that the weights are not initialised: they come from the checkpoint
                warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, str(path))
        if raw_fila:
            from peft_unlearn.fila.saving import restore_fila_residual

            restore_fila_residual(model, path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CLIError(f"--adapter: cannot load {adapter!r} onto the model: {_one_line(err)}") from err
    return model


def _cmd_eval(argv: list[str]) -> int:
    import torch

    from peft_unlearn.metrics import evaluate_memorization
    from peft_unlearn.trainer.formats import tokenize_dataset

    args = parse_eval_args(argv)
    sets = {
        n: _load_set(getattr(args, n), f"--{n}", args.text_split, args.max_samples)
        for n in EVAL_SETS
        if getattr(args, n)
    }
    _info(f"Loading model {args.model!r}" + (f" with adapter {args.adapter!r}" if args.adapter else "") + "...")
    model, tokenizer = _load_model(args.model, args.dtype, args.trust_remote_code, show_progress=not args.no_progress)
    if args.adapter is not None:
        model = _load_adapter(model, args.adapter)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model.to(device).eval()
    except (RuntimeError, AssertionError, ValueError) as err:
        raise CLIError(f"--device: cannot use {device!r}: {_one_line(err)}") from err

    results: dict[str, dict[str, float]] = {}
    for name, dataset in sets.items():
        try:
            sequences = tokenize_dataset(
                dataset, tokenizer, max_length=args.max_length, completion_only_loss=args.completion_only, name=name
            )
        except (ValueError, TypeError) as err:
            raise CLIError(f"--{name}: {_one_line(err)}") from err
        _info(f"Scoring the {name} set ({len(sequences)} examples)...")
        try:
            scores = evaluate_memorization(
                model,
                sequences,
                batch_size=args.batch_size,
                el_n=tuple(args.el_n),
                el_prefix_stride=args.el_prefix_stride,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                compute_el=not args.no_el,
                show_progress=not args.no_progress,
            )
        except (ValueError, TypeError) as err:
            raise CLIError(f"evaluating the {name} set failed: {_one_line(err)}", EXIT_FAILURE) from err
        results[name] = {**{key: float(value) for key, value in scores.items()}, "num_examples": len(sequences)}

    print(format_results_table(results))
    undefined = [f"{name}/{key}" for name, sc in results.items() for key, v in sc.items() if not math.isfinite(v)]
    if undefined:
        _info(f"not finite: {', '.join(undefined)} (EL_n is undefined when every sequence has n tokens or fewer); "
              "written as null in the JSON")  # fmt: skip
    if args.output is not None:
        settings = ("el_prefix_stride", "max_length", "batch_size", "max_samples", "completion_only")
        payload = {
            "model": args.model,
            "adapter": args.adapter,
            "data": {name: getattr(args, name) for name in sets},
            "settings": {"el_n": [] if args.no_el else list(args.el_n), **{k: getattr(args, k) for k in settings}},
            "results": {n: {k: (v if math.isfinite(v) else None) for k, v in sc.items()} for n, sc in results.items()},
        }
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"Wrote results to {out}")
    if args.plot is not None:
        from peft_unlearn.plotting import plot_method_comparison

        metrics = [key for key in next(iter(results.values())) if key not in ("num_examples", "nll", "ppl")]
        plot_method_comparison(
            {name: {key: scores[key] for key in metrics} for name, scores in results.items()},
            metrics,
            title=args.model + (f" + {Path(args.adapter).name}" if args.adapter else ""),
            ylabel="score (lower on forget = more forgotten)",
            path=Path(args.plot).expanduser(),
        )
        print(f"Wrote plot to {Path(args.plot).expanduser()}")
    return EXIT_OK


def format_results_table(results: dict[str, dict[str, float]]) -> str:
    """Format `{set: {metric: value}}` as an aligned text table (sets as rows).

    Args:
        results: Per-set metrics, e.g. `{"forget": {"ma": 0.9, "el10": 0.5, "nll": 0.3, "ppl": 1.35}}`.

    Returns:
        The table, one line per set plus a header.

    Examples:
        >>> print(format_results_table({"forget": {"ma": 0.5, "nll": 1.0}}))
        set         ma     nll
        forget  0.5000  1.0000
    """
    metrics = list(dict.fromkeys(key for scores in results.values() for key in scores if key != "num_examples"))
    show_n = any("num_examples" in scores for scores in results.values())
    rows = [["set", *(["n"] if show_n else []), *metrics]]
    for name, scores in results.items():
        rows.append([name, *([str(scores.get("num_examples", ""))] if show_n else [])])
        rows[-1] += [_format_number(scores.get(key)) for key in metrics]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [[row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])] for row in rows]
    return "\n".join("  ".join(cells).rstrip() for cells in lines)


def _format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.4f}"


# --------------------------------------------------------------------------------------------------
# env, version, main
# --------------------------------------------------------------------------------------------------


def environment_info() -> dict[str, str]:
    """Versions and hardware worth pasting into a bug report (what `peft-unlearn env` prints).

    Examples:
        >>> "PyTorch version" in environment_info()
        True
    """
    import torch

    from peft_unlearn import __version__

    def version(name: str) -> str:
        try:
            return _dist_version(name)
        except PackageNotFoundError:
            return "not installed"

    info = {"Platform": platform.platform(), "Python version": platform.python_version(),
            "peft_unlearn version": __version__}  # fmt: skip
    for label, name in [("PyTorch", "torch"), ("Transformers", "transformers"), ("PEFT", "peft"), ("TRL", "trl"),
                        ("Datasets", "datasets"), ("Accelerate", "accelerate"), ("matplotlib", "matplotlib")]:  # fmt: skip
        info[f"{label} version"] = version(name)
    if torch.cuda.is_available():
        info["Accelerator(s)"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["Accelerator(s)"] = "MPS" if torch.backends.mps.is_available() else "cpu"
    return info


def _cmd_env(argv: list[str]) -> int:
    _Parser(prog=f"{PROG} env", description="Print versions of the ML stack for bug reports.").parse_args(argv)
    print("\nCopy-paste the following information when reporting a bug:\n")
    print("\n".join(f"- {key}: {value}" for key, value in environment_info().items()) + "\n")
    return EXIT_OK


def _cmd_version(argv: list[str]) -> int:
    from peft_unlearn import __version__

    _Parser(prog=f"{PROG} version", description="Print the peft_unlearn version.").parse_args(argv)
    print(f"{PROG} {__version__}")
    return EXIT_OK


_COMMANDS: dict[str, tuple[Any, str]] = {
    "train": (_cmd_train, "unlearn a forget set (LoRA with FILA or default init, or full fine-tuning)"),
    "eval": (_cmd_eval, "measure memorization (MA, EL_n, NLL, perplexity) on forget/retain/held-out sets"),
    "env": (_cmd_env, "print versions of torch, transformers, peft, trl, ... for bug reports"),
    "version": (_cmd_version, "print the peft_unlearn version"),
}


def _top_level_help() -> str:
    commands = "\n".join(f"  {name:<9} {text}" for name, (_, text) in _COMMANDS.items())
    return (
        f"usage: {PROG} [-h] [--version] {{{','.join(_COMMANDS)}}} ...\n\n"
        "Parameter-efficient knowledge unlearning for LLMs (Inverted Hinge Loss + FILA, arXiv 2408.06621).\n\n"
        f"commands:\n{commands}\n\noptions:\n  -h, --help  show this help message and exit\n"
        f"  --version   print the version and exit\n\nRun '{PROG} COMMAND --help' for the options of a command. "
        "Exit codes: 0 ok, 1 failure, 2 usage error."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `peft-unlearn` command line.

    Args:
        argv: Arguments without the program name; `None` uses `sys.argv[1:]`.

    Returns:
        `EXIT_OK` on success. Failures raise `SystemExit` with `EXIT_USAGE` (2), `EXIT_FAILURE` (1) or
        `EXIT_INTERRUPTED` (130) after printing one line to stderr (set `PEFT_UNLEARN_TRACEBACK=1` for the
        traceback of an unexpected error).

    Examples:
        >>> main(["version"])  # doctest: +SKIP
        peft-unlearn 0.1.0
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_top_level_help(), file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    command, rest = ("version" if args[0] in ("--version", "-V") else args[0]), args[1:]
    if command in ("-h", "--help"):
        print(_top_level_help())
        return EXIT_OK
    if command not in _COMMANDS:
        print(f"{PROG}: error: unknown command {command!r}; expected one of {', '.join(_COMMANDS)} (see '{PROG} "
              "--help')", file=sys.stderr)  # fmt: skip
        raise SystemExit(EXIT_USAGE)
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return _COMMANDS[command][0](rest)
    except CLIError as err:
        print(f"{PROG} {command}: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as err:
        if os.environ.get(_TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise
        print(f"{PROG} {command}: error: {type(err).__name__}: {_one_line(err)} (set {_TRACEBACK_ENV}=1 for the "
              "traceback)", file=sys.stderr)  # fmt: skip
        raise SystemExit(EXIT_FAILURE) from None


if __name__ == "__main__":
    sys.exit(main())
