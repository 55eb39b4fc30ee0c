"""What the `peft-unlearn` commands (`train`, `evaluate`) share: exit codes, `CLIError`, the `TrlParser` wrapper
that turns every parsing problem into one line, and the model and data options with their loaders.

Examples:
    >>> ModelDataArguments(model="gemma3-270m", forget="forget.jsonl").text_split
    'line'
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, NoReturn

import yaml
from trl import TrlParser

from ..utils import one_line

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "PROG", "CLIError", "ModelDataArguments"]

PROG = "peft-unlearn"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
"""Exit codes: success, runtime failure, usage error, interrupted (Ctrl-C)."""


class CLIError(Exception):
    """An error reported as one line on stderr, then `SystemExit(exit_code)` (`EXIT_USAGE` by default).

    Examples:
        >>> CLIError("--forget: no such file or directory: 'x.jsonl'").exit_code
        2
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def info(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def arg(help: str, default: Any = None, metavar: str | None = None, **metadata: Any) -> Any:
    """A dataclass field with `TrlParser` help (`MISSING`: required; a list default is copied per instance)."""
    metadata = {"help": help, **({"metavar": metavar} if metavar else {}), **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelDataArguments:
    """Model and data options of `train` and `eval`; `_positive` fields must be positive integers when given."""

    _argument_group_name = "model and data options"
    _positive = ()  # a class attribute, not a field

    model: str = arg(
        "Base model: a local directory, a Hub id, or the alias 'gemma3-270m'.",
        MISSING,
        "NAME_OR_PATH",
        aliases=["--model_name_or_path", "--model-name-or-path"],
    )
    forget: str = arg(
        "Forget set: a .json, .jsonl, .ndjson, .csv, .tsv, .parquet or .txt file, or a save_to_disk dir.",
        MISSING,
        "FILE",
    )
    retain: str | None = arg("Retain set (same formats as --forget); train needs it for --retain_loss.", None, "FILE")
    heldout: str | None = arg("Held-out set, never trained on (train scores it with --eval_strategy).", None, "FILE")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = arg(
        "Weight dtype (default: float32 for gemma3-270m, else transformers' default)."
    )
    text_split: Literal["line", "paragraph"] = arg("How .txt files split: an example per line or paragraph.", "line")
    trust_remote_code: bool = arg("Allow custom model code from the Hub.", False)

    def __post_init__(self) -> None:
        for name in self._positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be a positive integer, got {getattr(self, name)}")


class Parser(TrlParser):
    """`TrlParser` whose argparse errors raise `CLIError` (one line, exit 2) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the line breaks of descriptions and epilogs."""


def parse(command: str, dataclass_types: list[type], argv: list[str], **kwargs: Any) -> tuple[Parser, list]:
    """Parse `argv` (and `--config FILE`) into the dataclasses; every problem becomes a `CLIError`."""
    parser = Parser(dataclass_types, prog=f"{PROG} {command}", formatter_class=_HelpFormatter, **kwargs)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of defaults; keys are field names.")
    try:
        *parsed, from_config, unknown = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except OSError as err:
        raise CLIError(f"--config: cannot read {err.filename or ''!r}: {err.strerror or one_line(err)}") from err
    except (ValueError, TypeError) as err:  # a dataclass __post_init__, or a YAML file that is not a mapping
        raise CLIError(one_line(err)) from err
    except yaml.YAMLError as err:
        raise CLIError(f"--config: cannot parse the YAML file: {one_line(err)}") from err
    if from_config:
        keys = ", ".join(repr(k[2:]) for k in from_config[::2])
        raise CLIError(f"--config: unknown key(s) {keys}; keys are field names such as learning_rate or output_dir")
    if unknown:
        raise CLIError(f"unrecognized arguments: {' '.join(unknown)} (see '{parser.prog} --help')")
    return parser, [item for item in parsed if not isinstance(item, argparse.Namespace)]  # `--config` itself


def load_sets(args: ModelDataArguments, **max_samples: int | None) -> dict[str, Any]:
    """The forget / retain / held-out sets given in `args`, each cut to its first `max_samples[name]` examples."""
    from ..data_files import check_columns, load_data_file

    sets = {}
    for name in [name for name in ("forget", "retain", "heldout") if getattr(args, name) is not None]:
        sets[name] = load_data_file(getattr(args, name), f"--{name}", args.text_split, max_samples.get(name))
        check_columns(sets[name], f"--{name}", getattr(args, name))
    return sets


def load_model(args: ModelDataArguments, show_progress: bool = True) -> tuple[Any, Any]:
    """`load_model_and_tokenizer(args.model)`; a model that cannot be found or loaded is a usage error."""
    from ..models import load_model_and_tokenizer

    kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
    try:
        return load_model_and_tokenizer(args.model, dtype=args.dtype, show_progress=show_progress, **kwargs)
    except (OSError, ValueError, ImportError) as err:  # the messages name the model
        raise CLIError(f"--model: {one_line(err)}") from err
