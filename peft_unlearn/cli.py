"""Command line interface: ``peft-unlearn train | eval | env | version``.

In the spirit of ``trl sft``: ``train`` exposes every :class:`~peft_unlearn.UnlearningConfig` field
(hence every ``transformers.TrainingArguments`` field) as a flag next to a few model, data and LoRA
options, and ``eval`` scores memorization (MA, EL_n, NLL, perplexity) of a base model or of a base
model plus an adapter on forget / retain / held-out sets. See ``docs/cli.md``.

Data files (``--forget``, ``--retain``, ``--heldout``) may be JSON (a list of records, a dict of
columns, or ``{"data": [...]}``), JSON Lines, CSV / TSV (header row), TXT (one example per non-empty
line, or per blank-line-separated paragraph with ``--text_split paragraph``; the text goes to a
``text`` column), or a directory written by ``datasets.Dataset.save_to_disk``.

Exit codes: 0 success, 1 runtime failure, 2 usage error (bad flag or value, missing or unreadable
input, unsupported file type, dataset without a recognised column, adapter directory without
``adapter_config.json``), 130 interrupted.

Examples:
    >>> from peft_unlearn.cli import main
    >>> main(["version"])  # doctest: +SKIP
    peft-unlearn 0.1.0
    0
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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
from typing import Any, Literal, NoReturn, get_type_hints

__all__ = [
    "DATA_EXTENSIONS",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "INIT_CHOICES",
    "CLIError",
    "EvalArguments",
    "TrainArguments",
    "check_columns",
    "environment_info",
    "format_results_table",
    "load_data_file",
    "main",
    "parse_eval_args",
    "parse_train_args",
]

PROG = "peft-unlearn"

EXIT_OK = 0
"""Success."""
EXIT_FAILURE = 1
"""The command started but failed (training or evaluation raised)."""
EXIT_USAGE = 2
"""Bad command line: unknown flag or value, missing or unreadable input, unsupported format."""
EXIT_INTERRUPTED = 130
"""Interrupted with Ctrl-C."""

INIT_CHOICES: tuple[str, ...] = ("fila", "default", "none")
"""``--init`` values: FILA LoRA, PEFT's default LoRA init, or ``none`` (full fine-tuning, no PEFT)."""

DATA_EXTENSIONS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
}
"""File extensions accepted for data files, mapped to their reader."""

TEXT_SPLITS: tuple[str, ...] = ("line", "paragraph")

_TRACEBACK_ENV = "PEFT_UNLEARN_TRACEBACK"


class CLIError(Exception):
    """An error reported as one line on stderr, then ``SystemExit(exit_code)``.

    Args:
        message: The line to print (after ``peft-unlearn <command>: error:``).
        exit_code: Process exit status, :data:`EXIT_USAGE` by default.

    Examples:
        >>> raise CLIError("--forget: file not found: 'x.jsonl'")  # doctest: +SKIP
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------------
# Argument dataclasses
# --------------------------------------------------------------------------------------------------


def _arg(help: str, default: Any = dataclasses.MISSING, metavar: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field carrying argparse metadata (``help``, ``metavar``, ``aliases``) for ``HfArgumentParser``."""
    metadata: dict[str, Any] = {"help": help}
    if metavar is not None:
        metadata["metavar"] = metavar
    if "aliases" in kwargs:
        metadata["aliases"] = kwargs.pop("aliases")
    if callable(default) and not isinstance(default, (str, int, float, bool)):
        return field(default_factory=default, metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


_MODEL_HELP = "Base model: a local directory, a Hub id, or the alias 'gemma3-270m'."
_MODEL_ALIASES = ["--model_name_or_path", "--model-name-or-path"]
_FORMATS_HELP = ".json, .jsonl, .csv, .tsv or .txt file, or a datasets save_to_disk directory"
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class TrainArguments:
    """Model, data and LoRA options of ``peft-unlearn train`` (the rest comes from ``UnlearningConfig``).

    Examples:
        >>> TrainArguments(model="gemma3-270m", forget="forget.jsonl").init
        'fila'
    """

    model: str = _arg(_MODEL_HELP, metavar="NAME_OR_PATH", aliases=_MODEL_ALIASES)
    forget: str = _arg(f"Forget set: {_FORMATS_HELP}.", metavar="FILE")
    retain: str | None = _arg("Retain set (same formats as --forget); needed by retain losses.", None, "FILE")
    heldout: str | None = _arg(
        "Held-out set (same formats), scored with the forget and retain sets when --eval_strategy is not 'no'.",
        None,
        "FILE",
    )
    init: Literal["fila", "default", "none"] = _arg(
        "Adapter: 'fila' (Fisher-weighted LoRA init, the paper's), 'default' (PEFT's LoRA init) or "
        "'none' (full fine-tuning, no PEFT).",
        "fila",
    )
    lora_r: int = _arg("LoRA rank r (ignored with --init none).", 8, "R")
    lora_alpha: int = _arg("LoRA alpha; the update is scaled by alpha/r.", 16, "ALPHA")
    lora_dropout: float = _arg("LoRA dropout probability.", 0.0, "P")
    target_modules: list[str] = _arg(
        "Modules to adapt: 'all-linear' or module names, e.g. q_proj v_proj.", lambda: ["all-linear"], "NAME"
    )
    dtype: DType | None = _arg("Weight dtype (default: float32 for gemma3-270m, else transformers' default).", None)
    text_split: Literal["line", "paragraph"] = _arg(
        "How .txt files split into examples: one per non-empty line, or per blank-line-separated paragraph.",
        "line",
    )
    max_forget_samples: int | None = _arg("Use only the first N forget examples.", None, "N")
    max_retain_samples: int | None = _arg("Use only the first N retain examples.", None, "N")
    trust_remote_code: bool = _arg("Allow custom model code from the Hub.", False)


@dataclass
class EvalArguments:
    """Options of ``peft-unlearn eval``.

    Examples:
        >>> EvalArguments(model="gemma3-270m", forget="forget.jsonl").el_n
        [10]
    """

    model: str = _arg(_MODEL_HELP, metavar="NAME_OR_PATH", aliases=_MODEL_ALIASES)
    forget: str = _arg(f"Forget set: {_FORMATS_HELP}.", metavar="FILE")
    adapter: str | None = _arg(
        "PEFT adapter directory (with adapter_config.json), e.g. the output of 'peft-unlearn train'.", None, "DIR"
    )
    retain: str | None = _arg("Retain set (same formats as --forget).", None, "FILE")
    heldout: str | None = _arg("Held-out set, never trained on (same formats as --forget).", None, "FILE")
    el_n: list[int] = _arg("n-gram sizes of the extraction likelihood EL_n.", lambda: [10], "N")
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
    dtype: DType | None = _arg("Weight dtype (default: float32 for gemma3-270m, else transformers' default).", None)
    device: str | None = _arg("Device such as cpu or cuda:0 (default: cuda when available, else cpu).", None, "DEVICE")
    text_split: Literal["line", "paragraph"] = _arg("How .txt files split into examples (see --forget).", "line")
    no_progress: bool = _arg("Hide progress bars.", False)
    trust_remote_code: bool = _arg("Allow custom model code from the Hub.", False)


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


class _PlainParser(argparse.ArgumentParser):
    """``argparse`` parser whose errors raise :class:`CLIError` (one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _hf_argument_parser_class() -> type:
    from transformers import HfArgumentParser

    class CommandParser(HfArgumentParser):
        """``HfArgumentParser`` with titled argument groups and one-line errors (:class:`CLIError`, exit 2).

        Args:
            dataclass_types: Dataclasses whose fields become ``--name`` / ``--dash-name`` flags.
            group_titles: ``{dataclass: (title, description)}`` for the help's option groups.
            **kwargs: Passed to ``argparse.ArgumentParser``.
        """

        def __init__(self, dataclass_types, group_titles=None, **kwargs):
            self._group_titles = dict(group_titles or {})
            kwargs.setdefault("formatter_class", _HelpFormatter)
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(dataclass_types, **kwargs)

        def _add_dataclass_arguments(self, dtype):
            if dtype not in self._group_titles:
                return super()._add_dataclass_arguments(dtype)
            group = self.add_argument_group(*self._group_titles[dtype])
            hints = get_type_hints(dtype)
            for dc_field in dataclasses.fields(dtype):
                if dc_field.init:
                    dc_field.type = hints[dc_field.name]  # what HfArgumentParser does as well
                    self._parse_dataclass_field(group, dc_field)

        def error(self, message):
            raise CLIError(f"{message} (see '{self.prog} --help')")

    return CommandParser


def _build_parser(
    prog: str,
    description: str,
    groups: Sequence[tuple[type, str, str | None]],
    epilog: str | None = None,
    usage: str | None = None,
) -> argparse.ArgumentParser:
    """Build an ``HfArgumentParser`` with one titled option group per dataclass.

    Args:
        prog: Program name shown in help and errors, e.g. ``"peft-unlearn train"``.
        description: Text under the usage line.
        groups: ``(dataclass type, group title, group description)`` triples.
        epilog: Text after the option list.
        usage: Usage line (default: argparse's, which lists every option).

    Returns:
        The parser; each field is reachable as ``--name`` and ``--dash-name``; errors raise :class:`CLIError`.
    """
    parser_class = _hf_argument_parser_class()
    return parser_class(
        [dtype for dtype, _, _ in groups],
        group_titles={dtype: (title, text) for dtype, title, text in groups},
        prog=prog,
        usage=usage,
        description=description,
        epilog=epilog,
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the line breaks of descriptions and epilogs."""


def _add_alias(parser: argparse.ArgumentParser, dest: str, alias: str) -> None:
    """Make ``alias`` (e.g. ``--output``) an extra spelling of the option stored in ``dest``."""
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            action.option_strings.append(alias)
            parser._option_string_actions[alias] = action
            return
    raise RuntimeError(f"internal error: no option with dest {dest!r} to alias as {alias!r}")


def _namespace_to_dataclasses(namespace: argparse.Namespace, dtypes: Sequence[type]) -> list[Any]:
    """Instantiate each dataclass from the parsed namespace; ``ValueError``/``TypeError`` become usage errors."""
    values = vars(namespace)
    out = []
    for dtype in dtypes:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            out.append(dtype(**{k: v for k, v in values.items() if k in keys}))
        except (ValueError, TypeError) as err:
            raise CLIError(_one_line(err)) from err
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# --------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------


def _read_json_records(path: Path, flag: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # A .json file holding JSON Lines is common; accept it when every line parses.
        if "\n" in text.strip():
            try:
                return _read_jsonl_records(path, flag)
            except CLIError:
                pass
        raise CLIError(f"{flag}: {str(path)!r} is not valid JSON (line {err.lineno}: {err.msg})") from err
    if isinstance(data, dict):
        only = next(iter(data.values())) if len(data) == 1 else None
        if isinstance(only, list) and only and all(isinstance(item, dict) for item in only):
            data = only  # {"data": [{...}, ...]} / {"train": [...]}
        elif data and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) != 1:
                raise CLIError(
                    f"{flag}: {str(path)!r} is a dict of columns of different lengths {sorted(lengths)}; "
                    "expected equally long lists or a list of records"
                )
            columns = list(data)
            data = [dict(zip(columns, row)) for row in zip(*data.values())]
        else:
            data = [data]  # a single record
    if not isinstance(data, list):
        raise CLIError(
            f"{flag}: {str(path)!r} holds a JSON {type(data).__name__}; expected a list of records "
            '(e.g. [{"text": "..."}]), a dict of columns or {"data": [...]}'
        )
    return [_as_record(item, path, flag, index) for index, item in enumerate(data)]


def _read_jsonl_records(path: Path, flag: str) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{flag}: {str(path)!r} line {lineno} is not valid JSON ({err.msg})") from err
            records.append(_as_record(item, path, flag, lineno, what="line"))
    return records


def _as_record(item: Any, path: Path, flag: str, index: int, what: str = "item") -> dict[str, Any]:
    if isinstance(item, str):
        return {"text": item}
    if not isinstance(item, dict):
        raise CLIError(
            f"{flag}: {what} {index} of {str(path)!r} is a JSON {type(item).__name__}; expected an object "
            'such as {"text": "..."} or a string'
        )
    return item


def _read_csv_records(path: Path, flag: str, delimiter: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            return []
        records = [dict(row) for row in reader]
    for lineno, row in enumerate(records, start=2):
        if None in row:
            raise CLIError(f"{flag}: {str(path)!r} row {lineno} has more fields than the header")
    return records


def _read_txt_records(path: Path, text_split: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if text_split == "paragraph":
        chunks, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line.rstrip())
            elif current:
                chunks.append("\n".join(current))
                current = []
        if current:
            chunks.append("\n".join(current))
    else:
        chunks = [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]
    return [{"text": chunk} for chunk in chunks]


def load_data_file(path: str | os.PathLike[str], flag: str = "--forget", text_split: str = "line"):
    """Read a data file or a saved ``datasets`` directory into a ``datasets.Dataset``.

    Formats (chosen by extension): ``.json`` (a list of records or strings, a dict of equally long
    columns, or ``{"data": [...]}``; JSON Lines content is accepted too), ``.jsonl`` / ``.ndjson``,
    ``.csv`` / ``.tsv`` (header row; values stay strings), ``.txt`` (one example per non-empty
    line, or per blank-line-separated paragraph with ``text_split="paragraph"``, stored in a
    ``text`` column), or a directory written by ``Dataset.save_to_disk`` (a ``DatasetDict`` must have
    a single split or a ``train`` split).

    Args:
        path: File or directory.
        flag: The command-line flag the path came from, used in error messages.
        text_split: ``"line"`` or ``"paragraph"``, for ``.txt`` files.

    Returns:
        The dataset (no column checks; see :func:`check_columns`).

    Raises:
        CLIError: (exit 2) the path does not exist, has an unsupported extension, cannot be parsed,
            or holds no example.

    Examples:
        >>> ds = load_data_file("forget.jsonl", flag="--forget")  # doctest: +SKIP
        >>> ds.column_names  # doctest: +SKIP
        ['text']
    """
    from datasets import Dataset

    if text_split not in TEXT_SPLITS:
        raise CLIError(f"--text_split: invalid value {text_split!r}; expected one of {', '.join(TEXT_SPLITS)}")
    source = Path(os.fspath(path)).expanduser()
    if not source.exists():
        raise CLIError(f"{flag}: no such file or directory: {str(source)!r}")
    if source.is_dir():
        return _load_saved_dataset(source, flag)
    suffix = source.suffix.lower()
    reader = DATA_EXTENSIONS.get(suffix)
    if reader is None:
        raise CLIError(
            f"{flag}: unsupported file type {suffix or '(no extension)'!r} for {str(source)!r}; expected one of "
            f"{', '.join(DATA_EXTENSIONS)} or a directory written by datasets' save_to_disk"
        )
    try:
        if reader == "json":
            records = _read_json_records(source, flag)
        elif reader == "jsonl":
            records = _read_jsonl_records(source, flag)
        elif reader in ("csv", "tsv"):
            records = _read_csv_records(source, flag, "," if reader == "csv" else "\t")
        else:
            records = _read_txt_records(source, text_split)
    except UnicodeDecodeError as err:
        raise CLIError(f"{flag}: {str(source)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise CLIError(f"{flag}: cannot read {str(source)!r}: {err.strerror or err}") from err
    if not records:
        raise CLIError(f"{flag}: {str(source)!r} holds no examples")
    try:
        return Dataset.from_list(records)
    except Exception as err:  # pyarrow type clashes between records
        raise CLIError(f"{flag}: cannot build a dataset from {str(source)!r}: {_one_line(err)}") from err


def _load_saved_dataset(source: Path, flag: str):
    from datasets import Dataset, DatasetDict, load_from_disk

    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((source / name).is_file() for name in markers):
        raise CLIError(
            f"{flag}: {str(source)!r} is a directory but not a saved dataset (none of {', '.join(markers)}); "
            f"pass a data file ({', '.join(DATA_EXTENSIONS)}) or a directory written by Dataset.save_to_disk"
        )
    try:
        loaded = load_from_disk(str(source))
    except Exception as err:
        raise CLIError(f"{flag}: cannot load the saved dataset {str(source)!r}: {_one_line(err)}") from err
    if isinstance(loaded, DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise CLIError(
                f"{flag}: {str(source)!r} is a DatasetDict with splits {sorted(loaded)} and no 'train' split; "
                "save the split you mean with dataset[split].save_to_disk(...)"
            )
    if not isinstance(loaded, Dataset):  # pragma: no cover - IterableDataset etc.
        raise CLIError(f"{flag}: {str(source)!r} did not load as a datasets.Dataset")
    if len(loaded) == 0:
        raise CLIError(f"{flag}: {str(source)!r} holds no examples")
    return loaded


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------

_TRAIN_DESCRIPTION = """\
Unlearn a forget set from a causal language model and save the result.

With --init fila (default) or --init default a LoRA adapter is trained and saved as a plain,
portable PEFT adapter (FILA adapters are converted to a rank-2r LoRA that loads with
PeftModel.from_pretrained on the ORIGINAL base model); with --init none the whole model is
fine-tuned and saved. The tokenizer is saved next to it.

Every UnlearningConfig / transformers.TrainingArguments field is a flag (--name or --dash-name),
e.g. --forget_loss, --retain_loss, --learning_rate, --max_steps, --num_train_epochs,
--per_device_train_batch_size, --report_to, --use_cpu. --config FILE.yaml reads defaults from a
YAML file whose keys are flag names (command-line flags win)."""

_TRAIN_EPILOG = """\
data formats: .json, .jsonl, .csv, .tsv, .txt (one example per non-empty line; --text_split
paragraph for blank-line-separated paragraphs) or a Dataset.save_to_disk directory; columns:
text | prompt+completion | messages | input_ids (see docs/cli.md).

example:
  peft-unlearn train --model gemma3-270m --forget forget.jsonl --retain retain.jsonl \\
      --init fila --forget_loss inverted_hinge --output unlearned --max_steps 20

exit codes: 0 ok, 1 training failed, 2 usage error (bad flag/value, missing or bad data file)."""


def _unlearning_config_class() -> type:
    from peft_unlearn.trainer.unlearning_config import UnlearningConfig

    return UnlearningConfig


def _train_parser() -> argparse.ArgumentParser:
    config_class = _unlearning_config_class()
    parser = _build_parser(
        f"{PROG} train",
        _TRAIN_DESCRIPTION,
        [
            (TrainArguments, "model, data and LoRA options", None),
            (config_class, "training options (UnlearningConfig, a transformers.TrainingArguments)", None),
        ],
        epilog=_TRAIN_EPILOG,
        usage=f"{PROG} train --model NAME_OR_PATH --forget FILE [--retain FILE] --output DIR [options]",
    )
    _add_alias(parser, "output_dir", "--output")
    _add_config_flag(parser)
    return parser


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="YAML (or JSON) file of default flag values, keys spelled like the flags without '--'.",
    )


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Load ``--config FILE`` (if present in ``argv``) into the parser's defaults, like TRL's ``TrlParser``."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return
    path = Path(known.config).expanduser()
    if not path.is_file():
        raise CLIError(f"--config: no such file: {str(path)!r}")
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as err:
        raise CLIError(f"--config: cannot parse {str(path)!r}: {_one_line(err)}") from err
    if data is None:
        return
    if not isinstance(data, dict):
        raise CLIError(
            f"--config: {str(path)!r} must hold a mapping of flag names to values, got {type(data).__name__}"
        )
    by_option = {
        option.lstrip("-"): action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        action = by_option.get(str(key)) or by_option.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            raise CLIError(f"--config: unknown key {key!r} in {str(path)!r}; keys are flag names, e.g. learning_rate")
        if isinstance(value, str) and action.type is not None and callable(action.type):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as err:
                raise CLIError(f"--config: bad value {value!r} for {key!r}: {_one_line(err)}") from err
        defaults[action.dest] = value
        action.required = False
    parser.set_defaults(**defaults)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    _apply_config_file(parser, argv)
    namespace = parser.parse_args(argv)
    if hasattr(namespace, "config"):
        delattr(namespace, "config")
    return namespace


def _check_choice(flag: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise CLIError(f"{flag}: invalid value {value!r}; expected one of {', '.join(map(str, choices))}")


def _validate_train_namespace(ns: argparse.Namespace) -> None:
    from peft_unlearn.losses import FORGET_LOSSES, RETAIN_LOSSES

    if ns.output_dir is None:
        raise CLIError("--output (or --output_dir) is required: the directory for the adapter and tokenizer")
    _check_choice("--init", ns.init, INIT_CHOICES)
    if hasattr(ns, "forget_loss"):
        _check_choice("--forget_loss", ns.forget_loss, FORGET_LOSSES)
    if hasattr(ns, "retain_loss"):
        if isinstance(ns.retain_loss, str) and ns.retain_loss.lower() in ("none", "null", ""):
            ns.retain_loss = None
        if ns.retain_loss is not None:
            _check_choice("--retain_loss", ns.retain_loss, (*RETAIN_LOSSES, "none"))
    _check_dtype(ns.dtype)
    if ns.lora_r < 1:
        raise CLIError(f"--lora_r: must be a positive integer, got {ns.lora_r}")
    if ns.lora_alpha <= 0:
        raise CLIError(f"--lora_alpha: must be positive, got {ns.lora_alpha}")
    if not 0.0 <= ns.lora_dropout < 1.0:
        raise CLIError(f"--lora_dropout: must be in [0, 1), got {ns.lora_dropout}")
    for flag in ("max_forget_samples", "max_retain_samples"):
        value = getattr(ns, flag)
        if value is not None and value < 1:
            raise CLIError(f"--{flag}: must be a positive integer, got {value}")


_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None:
        _check_choice("--dtype", dtype, _DTYPES)


def _load_model(name: str, dtype: str | None, trust_remote_code: bool, show_progress: bool = True):
    from peft_unlearn.models import load_model_and_tokenizer

    kwargs: dict[str, Any] = {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        return load_model_and_tokenizer(name, dtype=dtype, show_progress=show_progress, **kwargs)
    except FileNotFoundError as err:
        raise CLIError(f"--model: {_one_line(err)}") from err
    except (OSError, ValueError, ImportError) as err:
        raise CLIError(f"--model: cannot load {name!r}: {_one_line(err)}") from err


def _build_lora_config(args: TrainArguments):
    from peft import LoraConfig

    targets: str | list[str] = args.target_modules
    if len(targets) == 1:
        targets = targets[0]
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        init_lora_weights="fila" if args.init == "fila" else True,
        task_type="CAUSAL_LM",
    )


def parse_train_args(argv: Sequence[str]) -> tuple[TrainArguments, Any]:
    """Parse and check ``peft-unlearn train`` arguments without loading anything.

    Args:
        argv: The arguments after ``train``.

    Returns:
        ``(TrainArguments, UnlearningConfig)``.

    Raises:
        CLIError: (exit 2) unknown flag, bad value, missing ``--output``.

    Examples:
        >>> script_args, config = parse_train_args(  # doctest: +SKIP
        ...     ["--model", "m", "--forget", "f.jsonl", "--forget-loss", "npo", "--output", "out"]
        ... )
    """
    argv = list(argv)
    ns = _parse(_train_parser(), argv)
    _validate_train_namespace(ns)
    script_args, config = _namespace_to_dataclasses(ns, [TrainArguments, _unlearning_config_class()])
    return script_args, config


def _cmd_train(argv: list[str]) -> int:
    script_args, config = parse_train_args(argv)
    forget = _load_set(script_args.forget, "--forget", script_args.text_split, script_args.max_forget_samples)
    retain = heldout = None
    if script_args.retain is not None:
        retain = _load_set(script_args.retain, "--retain", script_args.text_split, script_args.max_retain_samples)
    elif config.retain_loss is not None:
        raise CLIError(
            f"--retain is required with --retain_loss {config.retain_loss}; pass --retain FILE, "
            "or --retain_loss none to train on the forget set alone"
        )
    if script_args.heldout is not None:
        heldout = _load_set(script_args.heldout, "--heldout", script_args.text_split, None)
    eval_sets = None
    if str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no":
        eval_sets = {"forget": forget, "retain": retain, "heldout": heldout}
        eval_sets = {name: data for name, data in eval_sets.items() if data is not None}

    _info(f"Loading model {script_args.model!r}...")
    model, tokenizer = _load_model(script_args.model, script_args.dtype, script_args.trust_remote_code)
    peft_config = None if script_args.init == "none" else _build_lora_config(script_args)
    ref_model = None
    if peft_config is None and (config.forget_loss == "npo" or config.retain_loss == "kl"):
        _info("Loading a frozen copy of the model as reference (needed by npo / kl with --init none)...")
        ref_model, _ = _load_model(script_args.model, script_args.dtype, script_args.trust_remote_code)

    from peft_unlearn.trainer.unlearning_trainer import UnlearningTrainer

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
    _info(
        f"Unlearning {len(forget)} forget examples"
        + (f" with {len(retain)} retain examples" if retain is not None else "")
        + f" ({what}, forget_loss={config.forget_loss}, retain_loss={config.retain_loss})"
    )
    trainer.train()
    output_dir = Path(config.output_dir)
    trainer.save_model(str(output_dir))  # saves the tokenizer too; FILA adapters as portable plain LoRA
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
        _report_saved(output_dir, script_args)
    return EXIT_OK


def _report_saved(output_dir: Path, args: TrainArguments) -> None:
    adapter_config = output_dir / "adapter_config.json"
    if args.init != "none" and adapter_config.is_file():
        cfg = json.loads(adapter_config.read_text(encoding="utf-8"))
        if cfg.get("init_lora_weights") == "fila":
            kind = "raw FILA adapter (needs peft_unlearn and _fila_init/ to load)"
        elif args.init == "fila":
            kind = f"FILA adapter as a plain PEFT LoRA (rank {cfg.get('r')} = 2 x --lora_r, portable)"
        else:
            kind = f"plain PEFT LoRA adapter (rank {cfg.get('r')})"
        print(f"Saved the {kind} and the tokenizer to {output_dir}")
        print(
            "Load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
            f"{args.model!r}), {str(output_dir)!r})"
        )
        print(f"Evaluate it with: {PROG} eval --model {args.model} --adapter {output_dir} --forget {args.forget}")
    else:
        print(f"Saved the model and the tokenizer to {output_dir}")
        print(f"Evaluate it with: {PROG} eval --model {output_dir} --forget {args.forget}")


def _info(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def _load_set(path: str, flag: str, text_split: str, max_samples: int | None):
    dataset = load_data_file(path, flag=flag, text_split=text_split)
    check_columns(dataset, flag, path)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    return dataset


def check_columns(dataset: Any, flag: str, path: str | os.PathLike[str]) -> str:
    """Check that a dataset is in one of the formats of `peft_unlearn.trainer.formats`.

    Args:
        dataset: A ``datasets.Dataset``.
        flag: The flag the data came from, for the error message.
        path: The file the data came from, for the error message.

    Returns:
        The detected format, a key of ``peft_unlearn.trainer.formats.SUPPORTED_FORMATS``, e.g. ``"prompt_completion"``.

    Raises:
        CLIError: (exit 2) no recognised column.

    Examples:
        >>> from datasets import Dataset
        >>> check_columns(Dataset.from_dict({"text": ["a"]}), "--forget", "f.jsonl")
        'language_modeling'
    """
    from peft_unlearn.trainer.formats import detect_format

    columns = list(dataset.column_names)
    fmt = detect_format(columns, dataset[0] if len(dataset) else None)
    if fmt is None:
        raise CLIError(
            f"{flag}: {str(path)!r} has columns {sorted(columns)} but needs one of: 'text' | 'prompt' + "
            "'completion' | 'messages' | 'input_ids'; rename a column (e.g. to 'text')"
        )
    return fmt


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------

_EVAL_DESCRIPTION = """\
Measure memorization of a base model, or of a base model plus a PEFT adapter, on forget /
retain / held-out sets: memorization accuracy (ma), extraction likelihood (el<n>), mean token
negative log-likelihood (nll) and perplexity (ppl). Lower ma/el on the forget set means more
forgotten; the retain and held-out sets show what was kept. Prints a table; --output writes JSON,
--plot a bar chart."""

_EVAL_EPILOG = """\
example:
  peft-unlearn eval --model gemma3-270m --adapter unlearned --forget forget.jsonl \\
      --retain retain.jsonl --heldout heldout.jsonl --output results.json --plot results.png

exit codes: 0 ok, 1 evaluation failed, 2 usage error (bad flag/value, missing or bad data file,
adapter directory without adapter_config.json)."""

EVAL_SETS: tuple[str, ...] = ("forget", "retain", "heldout")
"""Names of the evaluation sets, in table order."""


def _eval_parser() -> argparse.ArgumentParser:
    parser = _build_parser(
        f"{PROG} eval",
        _EVAL_DESCRIPTION,
        [(EvalArguments, "evaluation options", None)],
        epilog=_EVAL_EPILOG,
        usage=f"{PROG} eval --model NAME_OR_PATH [--adapter DIR] --forget FILE [--retain FILE] [--heldout FILE] [options]",
    )
    _add_config_flag(parser)
    return parser


def _validate_eval_args(args: EvalArguments) -> None:
    _check_dtype(args.dtype)
    if not args.el_n or any(n < 1 for n in args.el_n):
        raise CLIError(f"--el_n: expected positive integers, got {args.el_n}")
    for flag in ("batch_size", "max_length", "el_prefix_stride"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag}: must be a positive integer, got {getattr(args, flag)}")
    if args.max_length < 2:
        raise CLIError(f"--max_length: must be at least 2 tokens, got {args.max_length}")
    if args.max_samples is not None and args.max_samples < 1:
        raise CLIError(f"--max_samples: must be a positive integer, got {args.max_samples}")
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
    for flag in ("output", "plot"):
        target = getattr(args, flag)
        if target is not None and Path(target).expanduser().is_dir():
            raise CLIError(f"--{flag}: {target!r} is a directory; pass a file name")


def _check_adapter_dir(adapter: str) -> Path:
    path = Path(adapter).expanduser()
    if not path.exists():
        raise CLIError(f"--adapter: no such directory: {adapter!r}")
    if not path.is_dir():
        raise CLIError(f"--adapter: {adapter!r} is a file; pass the adapter directory (with adapter_config.json)")
    if not (path / "adapter_config.json").is_file():
        raise CLIError(
            f"--adapter: {adapter!r} has no adapter_config.json, so it is not a PEFT adapter directory; "
            "pass the output directory of 'peft-unlearn train' (a full fine-tuned model goes to --model instead)"
        )
    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CLIError(f"--adapter: cannot read {str(path / 'adapter_config.json')!r}: {_one_line(err)}") from err
    if not isinstance(adapter_config, dict):
        raise CLIError(f"--adapter: {str(path / 'adapter_config.json')!r} does not hold a JSON object")
    if adapter_config.get("init_lora_weights") == "fila" and not (path / "_fila_init").is_dir():
        raise CLIError(
            f"--adapter: {adapter!r} is a raw FILA adapter (init_lora_weights='fila') without the _fila_init/ folder "
            "holding its initial factors; pass the portable adapter that 'peft-unlearn train' saves instead"
        )
    return path


def _load_adapter(model: Any, adapter: str) -> Any:
    """Load ``adapter`` onto ``model`` with plain ``PeftModel.from_pretrained``.

    A raw FILA adapter (a Trainer checkpoint: config ``init_lora_weights="fila"`` plus ``_fila_init/``) is
    loaded too: its frozen initial factors ``A0``/``B0`` are re-attached from ``_fila_init/``.
    """
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
            from peft_unlearn.fila.saving import restore_fila_state

            restore_fila_state(model, path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CLIError(f"--adapter: cannot load {adapter!r} onto the model: {_one_line(err)}") from err
    return model


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _tokenize_for_eval(dataset: Any, tokenizer: Any, args: EvalArguments, name: str) -> list[dict[str, list[int]]]:
    """Tokenize like the trainer does (``peft_unlearn.trainer.formats.tokenize_dataset``): ids plus -100-masked labels."""
    from peft_unlearn.trainer.formats import tokenize_dataset

    try:
        return tokenize_dataset(
            dataset, tokenizer, max_length=args.max_length, completion_only_loss=args.completion_only, name=name
        )
    except (ValueError, TypeError) as err:
        raise CLIError(f"--{name}: {_one_line(err)}") from err


def parse_eval_args(argv: Sequence[str]) -> EvalArguments:
    """Parse and check ``peft-unlearn eval`` arguments without loading anything.

    Args:
        argv: The arguments after ``eval``.

    Returns:
        The :class:`EvalArguments`.

    Raises:
        CLIError: (exit 2) unknown flag, bad value, adapter directory without ``adapter_config.json``.

    Examples:
        >>> parse_eval_args(["--model", "m", "--forget", "f.jsonl", "--el-n", "5", "10"]).el_n  # doctest: +SKIP
        [5, 10]
    """
    ns = _parse(_eval_parser(), list(argv))
    (args,) = _namespace_to_dataclasses(ns, [EvalArguments])
    _validate_eval_args(args)
    return args


def _cmd_eval(argv: list[str]) -> int:
    args = parse_eval_args(argv)
    sets = {}
    for name in EVAL_SETS:
        path = getattr(args, name)
        if path is not None:
            sets[name] = _load_set(path, f"--{name}", args.text_split, args.max_samples)

    _info(f"Loading model {args.model!r}" + (f" with adapter {args.adapter!r}" if args.adapter else "") + "...")
    model, tokenizer = _load_model(args.model, args.dtype, args.trust_remote_code, show_progress=not args.no_progress)
    if args.adapter is not None:
        model = _load_adapter(model, args.adapter)
    device = args.device or _default_device()
    try:
        model.to(device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise CLIError(f"--device: cannot use {device!r}: {_one_line(err)}") from err
    model.eval()

    from peft_unlearn.metrics import evaluate_memorization

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenized = {name: _tokenize_for_eval(dataset, tokenizer, args, name) for name, dataset in sets.items()}
    results: dict[str, dict[str, float]] = {}
    for name, sequences in tokenized.items():
        _info(f"Scoring the {name} set ({len(sequences)} examples)...")
        try:
            scores = evaluate_memorization(
                model,
                sequences,
                batch_size=args.batch_size,
                el_n=tuple(args.el_n),
                el_prefix_stride=args.el_prefix_stride,
                pad_token_id=pad_id,
                compute_el=not args.no_el,
                show_progress=not args.no_progress,
            )
        except (ValueError, TypeError) as err:
            raise CLIError(f"evaluating the {name} set failed: {_one_line(err)}", EXIT_FAILURE) from err
        results[name] = {key: float(value) for key, value in scores.items()}
        results[name]["num_examples"] = len(sequences)

    print(format_results_table(results))
    undefined = [f"{name}/{key}" for name, sc in results.items() for key, v in sc.items() if not math.isfinite(v)]
    if undefined:
        _info(
            f"not finite: {', '.join(undefined)} (EL_n is undefined when every sequence has n tokens or fewer); "
            "written as null in the JSON"
        )
    if args.output is not None:
        payload = {
            "model": args.model,
            "adapter": args.adapter,
            "data": {name: getattr(args, name) for name in sets},
            "settings": {
                "el_n": list(args.el_n) if not args.no_el else [],
                "el_prefix_stride": args.el_prefix_stride,
                "max_length": args.max_length,
                "batch_size": args.batch_size,
                "max_samples": args.max_samples,
                "completion_only": args.completion_only,
            },
            "results": {
                name: {key: (v if math.isfinite(v) else None) for key, v in scores.items()}
                for name, scores in results.items()
            },
        }
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"Wrote results to {out}")
    if args.plot is not None:
        _plot_results(results, args, Path(args.plot).expanduser())
    return EXIT_OK


def format_results_table(results: dict[str, dict[str, float]]) -> str:
    """Format ``{set: {metric: value}}`` as an aligned text table (sets as rows).

    Args:
        results: Per-set metrics, e.g. ``{"forget": {"ma": 0.9, "el10": 0.5, "nll": 0.3, "ppl": 1.35}}``.

    Returns:
        The table, one line per set plus a header.

    Examples:
        >>> print(format_results_table({"forget": {"ma": 0.5, "nll": 1.0}}))
        set         ma     nll
        forget  0.5000  1.0000
    """
    metrics: list[str] = []
    for scores in results.values():
        for key in scores:
            if key != "num_examples" and key not in metrics:
                metrics.append(key)
    show_n = any("num_examples" in scores for scores in results.values())
    header = ["set", *(["n"] if show_n else []), *metrics]
    rows = [header]
    for name, scores in results.items():
        row = [name, *([str(scores.get("num_examples", ""))] if show_n else [])]
        row += [_format_number(scores.get(key)) for key in metrics]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.4f}"


def _plot_results(results: dict[str, dict[str, float]], args: EvalArguments, path: Path) -> None:
    """Bar chart of MA and EL_n per set with :func:`peft_unlearn.plotting.plot_method_comparison`."""
    from peft_unlearn.plotting import plot_method_comparison

    metrics = [key for key in next(iter(results.values())) if key not in ("num_examples", "nll", "ppl")]
    title = args.model + (f" + {Path(args.adapter).name}" if args.adapter else "")
    plot_method_comparison(
        {name: {key: scores[key] for key in metrics} for name, scores in results.items()},
        metrics,
        title=title,
        ylabel="score (lower on forget = more forgotten)",
        path=path,
    )
    print(f"Wrote plot to {path}")


# --------------------------------------------------------------------------------------------------
# env, version, main
# --------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str:
    try:
        return _dist_version(name)
    except PackageNotFoundError:
        return "not installed"


def environment_info() -> dict[str, str]:
    """Versions and hardware worth pasting into a bug report (what ``peft-unlearn env`` prints).

    Returns:
        Ordered ``{label: value}``.

    Examples:
        >>> "PyTorch version" in environment_info()
        True
    """
    from peft_unlearn import __version__

    info = {
        "Platform": platform.platform(),
        "Python version": platform.python_version(),
        "peft_unlearn version": __version__,
        "PyTorch version": _package_version("torch"),
        "Transformers version": _package_version("transformers"),
        "PEFT version": _package_version("peft"),
        "TRL version": _package_version("trl"),
        "Datasets version": _package_version("datasets"),
        "Accelerate version": _package_version("accelerate"),
        "matplotlib version": _package_version("matplotlib"),
    }
    try:
        import torch

        if torch.cuda.is_available():
            accelerators = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            accelerators = "MPS"
        else:
            accelerators = "cpu"
    except Exception as err:  # pragma: no cover - broken torch install
        accelerators = f"unknown ({_one_line(err)})"
    info["Accelerator(s)"] = accelerators
    return info


def _cmd_env(argv: list[str]) -> int:
    parser = _PlainParser(prog=f"{PROG} env", description="Print versions of the ML stack for bug reports.")
    parser.parse_args(argv)
    print("\nCopy-paste the following information when reporting a bug:\n")
    for key, value in environment_info().items():
        print(f"- {key}: {value}")
    print()
    return EXIT_OK


def _cmd_version(argv: list[str]) -> int:
    from peft_unlearn import __version__

    if argv and argv[0] not in ("-h", "--help"):
        raise CLIError(f"unexpected arguments {argv}")
    print(f"{PROG} {__version__}")
    return EXIT_OK


_COMMANDS: dict[str, tuple[Any, str]] = {
    "train": (_cmd_train, "unlearn a forget set (LoRA with FILA or default init, or full fine-tuning)"),
    "eval": (_cmd_eval, "measure memorization (MA, EL_n, NLL, perplexity) on forget/retain/held-out sets"),
    "env": (_cmd_env, "print versions of torch, transformers, peft, trl, ... for bug reports"),
    "version": (_cmd_version, "print the peft_unlearn version"),
}


def _top_level_help() -> str:
    lines = [
        f"usage: {PROG} [-h] [--version] {{{','.join(_COMMANDS)}}} ...",
        "",
        "Parameter-efficient knowledge unlearning for LLMs (Inverted Hinge Loss + FILA, arXiv 2408.06621).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<9} {text}" for name, (_, text) in _COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help  show this help message and exit",
        "  --version   print the version and exit",
        "",
        f"Run '{PROG} COMMAND --help' for the options of a command. Exit codes: 0 ok, 1 failure, 2 usage error.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``peft-unlearn`` command line.

    Args:
        argv: Arguments without the program name; ``None`` uses ``sys.argv[1:]``.

    Returns:
        :data:`EXIT_OK` on success. Failures raise ``SystemExit`` with :data:`EXIT_USAGE` (2),
        :data:`EXIT_FAILURE` (1) or :data:`EXIT_INTERRUPTED` (130) after printing one line to stderr
        (set ``PEFT_UNLEARN_TRACEBACK=1`` to get tracebacks of unexpected errors).

    Examples:
        >>> main(["version"])  # doctest: +SKIP
        peft-unlearn 0.1.0
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_top_level_help(), file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    command, rest = args[0], args[1:]
    if command in ("-h", "--help"):
        print(_top_level_help())
        return EXIT_OK
    if command in ("--version", "-V"):
        command = "version"
    if command not in _COMMANDS:
        print(
            f"{PROG}: error: unknown command {command!r}; expected one of {', '.join(_COMMANDS)} "
            f"(see '{PROG} --help')",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE)
    handler = _COMMANDS[command][0]
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return handler(rest)
    except CLIError as err:
        print(f"{PROG} {command}: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as err:
        if os.environ.get(_TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise
        print(
            f"{PROG} {command}: error: {type(err).__name__}: {_one_line(err)} "
            f"(set {_TRACEBACK_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_FAILURE) from None


if __name__ == "__main__":
    sys.exit(main())
