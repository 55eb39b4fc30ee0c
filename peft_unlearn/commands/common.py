"""What every `peft-unlearn` command shares: the error type and exit codes, the `TrlParser` wrapper that turns
every parsing problem into one line, and the model and data loaders that report bad input as usage errors.

Examples:
    >>> CLIError("--forget: no such file or directory: 'x.jsonl'").exit_code
    2
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import field
from typing import Any, Literal, NoReturn

from trl import TrlParser

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "PROG", "CLIError"]

PROG = "peft-unlearn"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
"""Exit codes: success, runtime failure, usage error, interrupted (Ctrl-C)."""

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


def _load_set(path: str, flag: str, text_split: str, max_samples: int | None):
    from peft_unlearn.data_files import DataFileError, check_columns, load_data_file

    try:
        dataset = load_data_file(path, flag=flag, text_split=text_split)
        check_columns(dataset, flag, path)
    except DataFileError as err:
        raise CLIError(str(err)) from err
    return dataset.select(range(max_samples)) if max_samples is not None and max_samples < len(dataset) else dataset


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
