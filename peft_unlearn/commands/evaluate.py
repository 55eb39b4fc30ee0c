"""`peft-unlearn eval`: memorization (MA, EL_n, NLL, perplexity) of a base model, or a base model plus an
adapter, on forget / retain / held-out data files.

Examples:
    >>> print(format_results_table({"forget": {"ma": 0.5}}))
    set         ma
    forget  0.5000
"""

from __future__ import annotations

import json
import math
import warnings
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
    CLIError,
    DType,
    _arg,
    _info,
    _load_model,
    _load_set,
    _one_line,
    _parse,
)

__all__ = ["EVAL_SETS", "EvalArguments", "format_results_table", "parse_eval_args", "run_eval"]

EVAL_SETS: tuple[str, ...] = ("forget", "retain", "heldout")


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
            "holding its initial factors; pass the portable adapter that 'peft-unlearn train' saves instead"
        )
    return path


def _load_adapter(model: Any, adapter: str) -> Any:
    """`PeftModel.from_pretrained`; a raw FILA checkpoint gets its frozen initial factors from `_fila_init/`."""
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


def run_eval(argv: list[str]) -> int:
    """Run `peft-unlearn eval ARGV`; returns the exit code (errors raise `CLIError`)."""
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
