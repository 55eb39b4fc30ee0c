"""What peft_unlearn may write and delete in a folder: only its own files, never a user's.

The policy (applied by `UnlearningTrainer`'s save, checkpoint, push and model-card paths, FILA's portable save,
and the CLI's `--output`):

1. **Record what is written.** Every save records the files it wrote (size and SHA-256 of the whole file, so an
   edit anywhere in a file, even one that keeps its size, makes it the user's) in a small JSON record kept **outside** the save folder, under
   `$PEFT_UNLEARN_CACHE/save_records/` (default `~/.cache/peft_unlearn/save_records/`), keyed by the folder's
   absolute path. The save folder holds exactly what PEFT / transformers write, so no push path uploads any
   bookkeeping. A file counts as *ours* only while it still matches its record: a file the user edited
   afterwards is theirs again, and a copied or moved folder is treated as the user's.
2. **Refuse to overwrite a file that is not ours.** Saving stages the new files in a temporary folder inside
   the target, then checks each one: if the target already holds a file of that name that peft_unlearn did not
   write, nothing is moved and [`SaveConflictError`][peft_unlearn.save_policy.SaveConflictError] names the
   files and the switch that allows it (`UnlearningConfig(overwrite_output=True)`, `--overwrite_output` on the
   command line, `overwrite=True` on the functions here).
3. **Keep a user's README.md.** The model card is written only when `README.md` is absent or ours, even with
   the overwrite switch; otherwise the user's file stays and an info line says so.
4. **Do not turn a model's folder into an adapter folder.** Saving an adapter into a folder holding a model
   (`config.json` plus weights) is refused, whoever wrote that model (a user, or peft_unlearn itself, e.g. an
   earlier full fine-tuning run into the same `output_dir`): `from_pretrained` on that folder would afterwards
   load the model plus the adapter instead of the model. The overwrite switch allows it.
5. **Delete only what we wrote.** A stale `_fila_init/` or any other folder is removed only if every file in it
   is ours; otherwise it is left in place with a warning.

Examples:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with staged_save(folder) as stage:
    ...     _ = (stage / "adapter_config.json").write_text("{}")
    >>> is_ours(folder, "adapter_config.json")
    True
    >>> _ = (folder / "notes.txt").write_text("mine")
    >>> is_ours(folder, "notes.txt")
    False
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "FILA_OVERWRITE_SWITCH",
    "OVERWRITE_SWITCH",
    "SaveConflictError",
    "check_save_folder",
    "is_ours",
    "policy_write",
    "record_written",
    "records_dir",
    "remove_if_ours",
    "staged_save",
    "write_model_card",
]

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "PEFT_UNLEARN_CACHE"

OVERWRITE_SWITCH = "UnlearningConfig(overwrite_output=True) (command line: --overwrite_output True)"
"""How the trainer and the CLI allow overwriting files peft_unlearn did not write."""

FILA_OVERWRITE_SWITCH = "save_pretrained(..., overwrite_output=True)"
"""How a FILA model's `save_pretrained` allows overwriting files peft_unlearn did not write."""

_FORMAT = "peft_unlearn.save_record/1"
_PRUNE_ABOVE = 256
_BLOCK = 1 << 20
_STAGE_PREFIX = "_peft_unlearn_staging-"
_README = "README.md"
_CONFIG = "config.json"
_BASE_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ADAPTER_CONFIG = "adapter_config.json"
# Names an unlearning save writes at the top of its folder (checked before training, so a run that would be
# refused at save time fails before it trains).
SAVE_FILE_NAMES: tuple[str, ...] = (
    _ADAPTER_CONFIG,
    "adapter_model.safetensors",
    "adapter_model.bin",
    _CONFIG,
    "generation_config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "training_args.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class SaveConflictError(FileExistsError):
    """A save would overwrite, or hijack, files that peft_unlearn did not write; nothing was written."""


# ----------------------------------------------------------------------------------------------------------------
# save records (kept outside the save folder)
# ----------------------------------------------------------------------------------------------------------------


def records_dir() -> Path:
    """Folder of the save records: ``$PEFT_UNLEARN_CACHE/save_records`` (default ``~/.cache/peft_unlearn``)."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "peft_unlearn"
    for path in (base, base / "save_records"):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(
                f"The save-record cache {str(path)!r} is an existing file, but peft_unlearn keeps its save records in "
                f"a folder there; point ${CACHE_ENV_VAR} at a writable folder (or unset it for "
                "~/.cache/peft_unlearn). Nothing was saved."
            )
    return base / "save_records"


def _record_path(directory: Path) -> Path:
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:40]
    return records_dir() / f"{key}.json"


def _read_record(directory: Path) -> dict[str, dict[str, Any]]:
    path = _record_path(directory)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning(
            "Ignoring the unreadable save record %s; the files of %s are treated as not ours.", path, directory
        )
        return {}
    valid = isinstance(data, dict) and data.get("format") == _FORMAT and data.get("folder") == str(directory.resolve())
    files = data.get("files") if valid else None
    return files if isinstance(files, dict) else {}


def _prune_records(folder: Path) -> None:
    records = list(folder.glob("*.json"))
    if len(records) <= _PRUNE_ABOVE:
        return
    for record in records:  # drop the records of folders that no longer exist (temporary saves)
        try:
            if not Path(json.loads(record.read_text(encoding="utf-8")).get("folder", "")).is_dir():
                record.unlink()
        except (OSError, ValueError, AttributeError):
            record.unlink(missing_ok=True)


def _write_record(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    if directory.name.startswith(_STAGE_PREFIX):
        return  # a staging folder: its files are recorded where they are moved to
    path = _record_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"format": _FORMAT, "folder": str(directory.resolve()), "files": dict(sorted(files.items()))})
    fd, tmp = tempfile.mkstemp(prefix=".record-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(payload)
    os.replace(tmp, path)
    _prune_records(path.parent)


def _digest(path: Path) -> str:
    """SHA-256 of the whole file (exact: an edit anywhere, even one that keeps the size, changes it)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    return {"size": size, "sha256": _digest(path)}


def _matches(path: Path, record: dict[str, Any]) -> bool:
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if not path.is_file() or size != record.get("size"):
        return False
    return _digest(path) == record.get("sha256")


def _rel(relpath: str | os.PathLike[str]) -> str:
    return Path(relpath).as_posix()


def is_ours(directory: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> bool:
    """Whether `directory/relpath` is a file peft_unlearn wrote and nobody changed since.

    Args:
        directory: The save folder.
        relpath: Path of the file inside it.

    Returns:
        True for a recorded, unchanged file; False otherwise (including a missing file).
    """
    root = Path(directory)
    record = _read_record(root).get(_rel(relpath))
    return record is not None and _matches(root / relpath, record)


def record_written(directory: str | os.PathLike[str], relpaths: Iterable[str | os.PathLike[str]]) -> None:
    """Add files that peft_unlearn just wrote in `directory` to its save record (missing paths are skipped).

    Args:
        directory: The save folder.
        relpaths: Paths of the written files, relative to `directory`; folders are recorded file by file.
    """
    root = Path(directory)
    files = _read_record(root)
    for relpath in relpaths:
        path = root / relpath
        targets = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for target in targets:
            if target.is_file():
                files[target.relative_to(root).as_posix()] = _fingerprint(target)
    if files:
        root.mkdir(parents=True, exist_ok=True)
        _write_record(root, files)


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------


def _holds_model(root: Path) -> bool:
    """Whether `root` holds a model (`config.json` plus weights), whoever wrote it."""
    if not (root / _CONFIG).is_file():
        return False
    weights = [root / name for name in _BASE_WEIGHTS] + list(root.glob("model-*-of-*.safetensors"))
    return any(path.is_file() for path in weights)


def _conflict_message(root: Path, names: list[str], switch: str) -> str:
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"Refusing to save into {str(root)!r}: it already holds {shown}, which peft_unlearn did not write, and the "
        f"save would overwrite {'it' if len(names) == 1 else 'them'}. Save to a new or empty folder, or allow "
        f"overwriting with {switch}."
    )


def _base_model_message(root: Path, switch: str) -> str:
    writer = (
        "peft_unlearn wrote (e.g. an earlier full fine-tuning run)"
        if is_ours(root, _CONFIG)
        else "peft_unlearn did not write"
    )
    return (
        f"Refusing to save an adapter into {str(root)!r}: the folder holds a model (config.json and weights) that "
        f"{writer}, and from_pretrained() on it would afterwards load the adapter instead of that "
        f"model. Save the adapter to its own folder (another output_dir), or allow it with {switch}."
    )


def check_save_folder(
    directory: str | os.PathLike[str],
    *,
    names: Iterable[str] = SAVE_FILE_NAMES,
    adapter: bool = True,
    overwrite: bool = False,
    switch: str = OVERWRITE_SWITCH,
) -> None:
    """Check, before anything is written, that a save into `directory` would not overwrite a user's files.

    Used before training (so a run is not refused only after it trained) and by the CLI for `--output`.

    Args:
        directory: The save folder (need not exist).
        names: File names the save may write at the top of the folder.
        adapter: The save writes an adapter (then a folder holding a model, whoever wrote it, is refused too).
        overwrite: Allow overwriting (the check passes).
        switch: How the caller allows overwriting, quoted in the error.

    Raises:
        SaveConflictError: If a listed file exists and is not ours, or an adapter would go into a base model's
            folder.
        NotADirectoryError: If `directory` is an existing file.
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"The save folder {str(root)!r} is an existing file; pass a folder path.")
    records_dir()  # an unusable record cache is refused before any work
    if overwrite or not root.is_dir():
        return
    if adapter and _holds_model(root):
        raise SaveConflictError(_base_model_message(root, switch))
    conflicts = [name for name in names if (root / name).exists() and not is_ours(root, name)]
    if conflicts:
        raise SaveConflictError(_conflict_message(root, conflicts, switch))


def _staged_files(stage: Path) -> list[str]:
    return sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())


@contextlib.contextmanager
def staged_save(
    directory: str | os.PathLike[str], *, overwrite: bool = False, switch: str = OVERWRITE_SWITCH
) -> Iterator[Path]:
    """Write a save into a staging folder, then move it into `directory` if that loses no user file.

    The body writes into the yielded folder (inside `directory`, so the final move is a rename). On exit each
    staged file is checked against `directory`: a file of the same name that is not ours is a conflict (unless
    `overwrite`), a user's `README.md` is kept (the staged card is dropped, even with `overwrite`), and a staged
    adapter next to a model (whoever wrote it) is refused (unless `overwrite`). Without conflicts the files
    are moved and recorded; with conflicts nothing is moved. The staging folder is removed in
    every case.

    Args:
        directory: The save folder (created if needed).
        overwrite: Allow replacing files peft_unlearn did not write (never a user's README.md).
        switch: How the caller allows overwriting, quoted in the error.

    Yields:
        The staging folder to write into.

    Raises:
        SaveConflictError: If the save would overwrite a user's file or hijack a base model's folder.
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"The save folder {str(root)!r} is an existing file; pass a folder path.")
    records_dir()  # refused before anything is written
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=root))
    try:
        yield stage
        staged = _staged_files(stage)
        if _README in staged and (root / _README).exists() and not is_ours(root, _README):
            logger.info("Keeping the existing %s in %s (not written by peft_unlearn).", _README, root)
            staged.remove(_README)
        folders = [rel for rel in staged if (root / rel).is_dir()]
        if folders:  # never delete a folder to make room for a file, not even with overwrite
            raise SaveConflictError(
                f"Refusing to save into {str(root)!r}: {folders[0]!r} is a folder there, but the save writes a file of "
                "that name. Move the folder away or save elsewhere."
            )
        if not overwrite:
            if _ADAPTER_CONFIG in staged and _holds_model(root):
                raise SaveConflictError(_base_model_message(root, switch))
            conflicts = [rel for rel in staged if (root / rel).exists() and not is_ours(root, rel)]
            if conflicts:
                raise SaveConflictError(_conflict_message(root, conflicts, switch))
        for rel in staged:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, target)
        record_written(root, staged)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def policy_write(
    directory: str | os.PathLike[str],
    write: Callable[[Path], Any],
    *,
    is_main_process: bool = True,
    overwrite: bool = False,
    switch: str = OVERWRITE_SWITCH,
) -> None:
    """Run ``write(folder)`` under the policy: staged and checked on the main process, as is elsewhere.

    The hook for save functions that write several files (e.g. FILA's `save_pretrained`): the main process
    writes into a staging folder that [`staged_save`][peft_unlearn.save_policy.staged_save] checks and moves
    into `directory`; other processes (which write nothing in a DDP save) call ``write(directory)`` directly.

    Args:
        directory: The save folder.
        write: Writes the save into the folder it is given.
        is_main_process: Whether this process writes files.
        overwrite: Allow replacing files peft_unlearn did not write (never a user's README.md).
        switch: How the caller allows overwriting, quoted in the error.

    Raises:
        SaveConflictError: As `staged_save`.
    """
    if not is_main_process:
        write(Path(directory))
        return
    with staged_save(directory, overwrite=overwrite, switch=switch) as stage:
        write(stage)


def write_model_card(directory: str | os.PathLike[str], text: str) -> bool:
    """Write `README.md` unless the folder holds a README that peft_unlearn did not write.

    Args:
        directory: The save folder (created if needed).
        text: The card.

    Returns:
        True if the card was written, False if the user's README.md was kept.
    """
    root = Path(directory)
    readme = root / _README
    if readme.exists() and not is_ours(root, _README):
        logger.info(
            "Keeping the existing %s in %s (not written by peft_unlearn); no model card written.", _README, root
        )
        return False
    root.mkdir(parents=True, exist_ok=True)
    readme.write_text(text, encoding="utf-8")
    record_written(root, [_README])
    return True


def remove_if_ours(directory: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> bool:
    """Delete `directory/relpath` (a file or a folder) only if every file in it was written by peft_unlearn.

    Args:
        directory: The save folder.
        relpath: The file or folder to remove, relative to `directory`.

    Returns:
        True if it was removed, False if it was absent or kept (a warning names the foreign files).
    """
    root = Path(directory)
    path = root / relpath
    if not path.exists():
        return False
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    foreign = [p.relative_to(root).as_posix() for p in files if not is_ours(root, p.relative_to(root))]
    if foreign:
        warnings.warn(
            f"Leaving {str(path)!r} in place: it holds files peft_unlearn did not write ({', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}). Delete it yourself if it is stale.",
            UserWarning,
            stacklevel=2,
        )
        return False
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    files_left = {
        k: v for k, v in _read_record(root).items() if not (k == _rel(relpath) or k.startswith(_rel(relpath) + "/"))
    }
    _write_record(root, files_left)
    return True
