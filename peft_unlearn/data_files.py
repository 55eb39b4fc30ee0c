"""Read a user's data file (or a saved `datasets` directory) into a `datasets.Dataset` the trainer accepts.

Files are read with `datasets.load_dataset` (`DATA_BUILDERS` maps extensions to builders); the few conveniences
on top (a JSON dict of columns or `{"data": [...]}`, blank lines of text files) and the checks turn every problem
into a one-line `DataFileError` that names the flag or argument, the file, and what was expected.

Examples:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "forget.jsonl"
    >>> _ = path.write_text('{"prompt": "Q?", "completion": " A"}\\n')
    >>> check_columns(load_data_file(path), "forget", path)
    'prompt_completion'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .utils import one_line

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["DATA_BUILDERS", "DataFileError", "check_columns", "load_data_file"]

DATA_BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
"""Data file extensions and the `datasets.load_dataset` builder that reads them."""


class DataFileError(ValueError):
    """A data file that is missing, unsupported, unreadable, empty or without a recognised column."""


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence `datasets`' progress bars and its error log while reading (errors are reported as one line)."""
    from datasets.utils import logging as ds_logging

    verbosity, bars = ds_logging.get_verbosity(), ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def load_data_file(
    path: str | os.PathLike[str], flag: str = "forget", text_split: str = "line", max_samples: int | None = None
) -> Dataset:
    """Read a data file (with `datasets.load_dataset`) or a saved `datasets` directory into a `datasets.Dataset`.

    The extension picks the builder (`DATA_BUILDERS`): `.json` (records, a dict of equally long columns or
    `{"data": [...]}`) / `.jsonl` / `.ndjson`, `.csv` / `.tsv`, `.parquet`, `.txt` (one example per non-empty
    line, or per blank-line-separated paragraph with `text_split="paragraph"`, in a `text` column). A directory
    must be written by `Dataset.save_to_disk` (a `DatasetDict` needs one split or a `train` split).

    Args:
        path: File or directory.
        flag: The command-line flag the path came from, used in error messages.
        text_split: `"line"` or `"paragraph"`, for `.txt` files.
        max_samples: Keep only the first `max_samples` examples (`None`: all of them).

    Returns:
        The dataset (no column checks; see `check_columns`).

    Raises:
        DataFileError: The path does not exist, has an unsupported extension, cannot be parsed, or holds no
            example.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "forget.jsonl"
        >>> _ = path.write_text('{"text": "a"}\\n{"text": "b"}\\n')
        >>> load_data_file(path).to_list()
        [{'text': 'a'}, {'text': 'b'}]
        >>> load_data_file(path, max_samples=1).to_list()
        [{'text': 'a'}]
    """
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    dataset = _read_data_file(Path(os.fspath(path)).expanduser(), flag, text_split)
    return dataset.select(range(max_samples)) if max_samples is not None and max_samples < len(dataset) else dataset


def _read_data_file(source: Path, flag: str, text_split: str) -> Dataset:
    from datasets import Dataset, load_dataset

    if not source.exists():
        raise DataFileError(f"{flag}: no such file or directory: {str(source)!r}")
    if source.is_dir():
        return _load_saved_dataset(source, flag)
    builder = DATA_BUILDERS.get(source.suffix.lower())
    if builder is None:
        raise DataFileError(
            f"{flag}: unsupported file type {source.suffix.lower() or '(no extension)'!r} for {str(source)!r}; "
            f"expected one of {', '.join(DATA_BUILDERS)} or a directory written by datasets' save_to_disk"
        )
    options = {"sep": "\t"} if source.suffix.lower() == ".tsv" else {}
    if builder == "text":
        options = {"sample_by": "paragraph" if text_split == "paragraph" else "line", "encoding": "utf-8-sig"}
    try:
        with _quiet_datasets():
            dataset = load_dataset(builder, data_files=str(source), split="train", **options)
    except Exception as err:
        cause = _root_cause(err)
        if isinstance(cause, UnicodeDecodeError):
            raise DataFileError(
                f"{flag}: {str(source)!r} is not UTF-8 text ({cause.reason} at byte {cause.start})"
            ) from err
        if "corresponds to no data" in str(err) or isinstance(cause, StopIteration):
            raise DataFileError(f"{flag}: {str(source)!r} holds no examples") from err
        what = {"json": "valid JSON or JSON Lines records", "csv": "a readable CSV/TSV file with a header row"}
        raise DataFileError(
            f"{flag}: {str(source)!r} is not {what.get(builder, f'a readable {builder} file')} ({one_line(cause)})"
        ) from err
    if builder == "text":  # drop blank lines / whitespace around paragraphs, as the line and paragraph modes promise
        texts = ["\n".join(line.rstrip() for line in t.splitlines() if line.strip()) for t in dataset["text"]]
        dataset = Dataset.from_dict({"text": [t for t in texts if t]})
    elif (
        source.suffix.lower() == ".json"
        and len(dataset) == 1
        and all(isinstance(v, list) for v in dataset[0].values())
    ):
        dataset = _json_columns(dataset[0], source, flag)  # {"data": [...]} or a dict of columns
    elif builder == "csv" and "__index_level_0__" in dataset.column_names:  # pandas' reading of ragged rows
        raise DataFileError(f"{flag}: {str(source)!r} has rows with more fields than the header")
    if len(dataset) == 0:
        raise DataFileError(f"{flag}: {str(source)!r} holds no examples")
    return dataset


def _json_columns(row: dict[str, list], source: Path, flag: str):
    from datasets import Dataset

    (only, *rest) = row.values()
    if not rest and only and all(isinstance(item, dict) for item in only):
        return Dataset.from_list(only)
    lengths = sorted({len(v) for v in row.values()})
    if len(lengths) != 1:
        raise DataFileError(
            f"{flag}: {str(source)!r} is a dict of columns of different lengths {lengths}; expected equally long "
            "lists or a list of records"
        )
    return Dataset.from_dict(row)


def _load_saved_dataset(source: Path, flag: str):
    from datasets import DatasetDict, load_from_disk

    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((source / name).is_file() for name in markers):
        raise DataFileError(
            f"{flag}: {str(source)!r} is a directory but not a saved dataset (none of {', '.join(markers)}); pass a "
            f"data file ({', '.join(DATA_BUILDERS)}) or a directory written by Dataset.save_to_disk"
        )
    try:
        loaded = load_from_disk(str(source))
    except Exception as err:
        raise DataFileError(f"{flag}: cannot load the saved dataset {str(source)!r}: {one_line(err)}") from err
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise DataFileError(
                f"{flag}: {str(source)!r} is a DatasetDict with splits {sorted(loaded)} and no 'train' split; save "
                "the split you mean with dataset[split].save_to_disk(...)"
            )
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    if len(loaded) == 0:
        raise DataFileError(f"{flag}: {str(source)!r} holds no examples")
    return loaded


def check_columns(dataset: Any, flag: str, path: str | os.PathLike[str]) -> str:
    """Check that a dataset is in one of the formats the trainer reads (`peft_unlearn.trainer.formats`).

    Args:
        dataset: A `datasets.Dataset`.
        flag: The flag the data came from, for the error message.
        path: The file the data came from, for the error message.

    Returns:
        The detected format, e.g. `"prompt_completion"`.

    Raises:
        DataFileError: No recognised column.

    Examples:
        >>> from datasets import Dataset
        >>> check_columns(Dataset.from_dict({"text": ["a"]}), "--forget", "f.jsonl")
        'language_modeling'
    """
    from peft_unlearn.trainer.formats import detect_format

    fmt = detect_format(dataset.column_names, dataset[0] if len(dataset) else None)
    if fmt is None:
        raise DataFileError(
            f"{flag}: {str(path)!r} has columns {sorted(dataset.column_names)} but needs one of: 'text' | 'prompt' "
            "+ 'completion' | 'messages' | 'input_ids'; rename a column (e.g. to 'text')"
        )
    return fmt
