"""`peft-unlearn eval`: memorization (MA, EL_n, NLL, perplexity) of a base model, or a base model plus an
adapter, on forget / retain / held-out data files."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..utils import one_line
from . import EXIT_FAILURE, CLIError, ModelDataArguments, arg, info, load_model, load_sets, parse

__all__ = ["EvalArguments", "parse_eval_args", "run_eval"]


@dataclass
class EvalArguments(ModelDataArguments):
    """Options of `peft-unlearn eval`."""

    _argument_group_name = "evaluation options"
    _positive = ("batch_size", "el_prefix_stride", "max_samples")

    adapter: str | None = arg("PEFT adapter directory (with adapter_config.json), e.g. a train output.", None, "DIR")
    el_n: list[int] = arg("n-gram sizes of the extraction likelihood EL_n.", [10], "N")
    no_el: bool = arg("Skip EL_n (it needs greedy generation, the slow part).", False)
    el_prefix_stride: int = arg("Score EL_n on every k-th prefix only (1 = every prefix, exact).", 1, "K")
    batch_size: int = arg("Sequences per forward pass.", 8, "B")
    max_length: int = arg("Truncate every example to this many tokens.", 128, "T")
    max_samples: int | None = arg("Use only the first N examples of each set.", None, "N")
    completion_only: bool = arg(
        "Score only the completion / assistant tokens of prompt-completion and chat data, as the trainer does.", True
    )
    output: str | None = arg("Write the results as JSON to this file.", None, "FILE.json")
    plot: str | None = arg("Save a bar chart of MA/EL per set to this image (needs matplotlib).", None, "FILE.png")
    robustness: list[str] | None = arg(
        "Also attack the forgetting (needs --adapter): any of quantization relearning export prompt, or all. See "
        "docs/guides/robustness.md.",
        None,
        "ATTACK",
    )
    related: str | None = arg("Related text for the relearning attack (same formats as --forget).", None, "FILE")
    relearn_steps: list[int] = arg("Relearning attack: steps at which it is measured.", [1, 5, 15, 50], "K")
    quantization_modes: list[str] = arg("Quantization attack: bitsandbytes formats.", ["nf4", "fp4", "int8"], "MODE")
    robustness_report: str | None = arg("Write the robustness tables as markdown to this file.", None, "FILE.md")
    robustness_plot: str | None = arg(
        "Save forget MA vs relearning steps (unlearned vs base) to this image (needs matplotlib).", None, "FILE.png"
    )
    device: str | None = arg("Device such as cpu or cuda:0 (default: cuda when available, else cpu).", None, "DEVICE")
    no_progress: bool = arg("Hide progress bars.", False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.el_n or any(n < 1 for n in self.el_n):
            raise ValueError(f"--el_n: expected positive integers, got {self.el_n}")
        if self.max_length < 2:
            raise ValueError(f"--max_length: must be at least 2 tokens, got {self.max_length}")


_DESCRIPTION = """\
Score memorization of a model (plus an adapter) on forget / retain / held-out sets: memorization
accuracy (ma), extraction likelihood (el<n>), token NLL and perplexity; lower ma/el on the forget
set means more forgotten. Prints a table; --output writes JSON, --plot a chart. --robustness also runs quantization, relearning,
export and prompt attacks on the forgetting (docs/guides/robustness.md). See docs/cli.md."""


def parse_eval_args(argv: Sequence[str]) -> EvalArguments:
    """Parse and check `peft-unlearn eval` arguments without loading anything.

    Args:
        argv: The arguments after `eval`.

    Returns:
        The `EvalArguments`.

    Raises:
        CLIError: (exit 2) an unknown flag, a bad value or an adapter directory without `adapter_config.json`.

    Examples:
        >>> parse_eval_args(["--model", "m", "--forget", "f.jsonl", "--el-n", "5", "10"]).el_n
        [5, 10]
    """
    from peft_unlearn.models import read_adapter_config

    _, (args,) = parse("eval", [EvalArguments], list(argv), description=_DESCRIPTION)
    if args.adapter is not None:
        try:
            read_adapter_config(args.adapter)
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(f"--adapter: {one_line(err)}") from err
    if args.device is not None:
        import torch

        try:
            torch.device(args.device)
        except (RuntimeError, ValueError) as err:
            raise CLIError(f"--device: invalid device {args.device!r}: {one_line(err)}") from err
    for name in ("plot", "robustness_plot"):
        if getattr(args, name) is not None and importlib.util.find_spec("matplotlib") is None:
            raise CLIError(f"--{name} needs matplotlib: pip install 'peft-unlearn[plot]'")
    _check_robustness(args)
    for name in ("output", "plot", "robustness_report", "robustness_plot"):
        if getattr(args, name) is not None and Path(getattr(args, name)).expanduser().is_dir():
            raise CLIError(f"--{name}: {getattr(args, name)!r} is a directory; pass a file name")
    return args


def _check_robustness(args: EvalArguments) -> None:
    """The robustness options: known attacks, an adapter to compare with its base, options that need an attack."""
    from peft_unlearn.metrics import ROBUSTNESS_ATTACKS
    from peft_unlearn.metrics.robustness import QUANTIZATION_MODES

    if args.robustness is None:
        needing = [
            f"--{n}" for n in ("related", "robustness_report", "robustness_plot") if getattr(args, n) is not None
        ]
        if needing:
            raise CLIError(f"{', '.join(needing)} only apply with --robustness; add e.g. --robustness all")
        return
    if args.robustness == ["all"]:
        args.robustness = list(ROBUSTNESS_ATTACKS)
    unknown = [a for a in args.robustness if a not in ROBUSTNESS_ATTACKS]
    if unknown or not args.robustness:
        raise CLIError(
            f"--robustness: unknown attack(s) {unknown}; expected 'all' or any of {', '.join(ROBUSTNESS_ATTACKS)}"
        )
    if args.adapter is None:
        raise CLIError(
            "--robustness needs --adapter: the attacks compare the unlearned model with its base (the model "
            "without the adapter)"
        )
    bad = [m for m in args.quantization_modes if m not in QUANTIZATION_MODES]
    if bad:
        raise CLIError(
            f"--quantization_modes: unknown format(s) {bad}; expected any of {', '.join(QUANTIZATION_MODES)}"
        )
    if "quantization" in args.robustness and importlib.util.find_spec("bitsandbytes") is None:
        raise CLIError("--robustness quantization needs bitsandbytes: pip install bitsandbytes")
    steps = args.relearn_steps
    if not steps or any(k < 1 for k in steps) or steps != sorted(set(steps)):
        raise CLIError(f"--relearn_steps: expected increasing positive step counts such as 1 5 15 50, got {steps}")


def _run_robustness(args: EvalArguments, model, tokenizer, tokenized: dict[str, list]) -> dict:
    """Run the attacks of --robustness, print the tables, write --robustness_report / --robustness_plot."""
    from peft_unlearn.data_files import load_data_file
    from peft_unlearn.metrics import evaluate_robustness
    from peft_unlearn.trainer.formats import tokenize_dataset

    related = None
    if args.related is not None:
        dataset = load_data_file(args.related, "--related", args.text_split, None)
        related = tokenize_dataset(
            dataset, tokenizer, max_length=args.max_length, completion_only_loss=args.completion_only, name="related"
        )
    info(f"Running robustness attacks: {', '.join(args.robustness)} (on copies of the model)...")
    try:
        report = evaluate_robustness(
            model,
            tokenizer,
            tokenized["forget"],
            retain=tokenized.get("retain"),
            heldout=tokenized.get("heldout"),
            attacks=args.robustness,
            related=related,
            relearn_steps=args.relearn_steps,
            quantization_modes=args.quantization_modes,
            el_n=args.el_n[0],
            el_prefix_stride=args.el_prefix_stride,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except (ValueError, TypeError) as err:
        raise CLIError(f"--robustness: {one_line(err)}") from err
    print()
    print(report.to_markdown())
    if args.robustness_report is not None:
        path = Path(args.robustness_report).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.to_markdown(), encoding="utf-8")
        print(f"Wrote the robustness report to {path}")
    if args.robustness_plot is not None:
        if "relearning" not in args.robustness:
            info("--robustness_plot: no relearning attack was run, so there is no curve to plot")
        else:
            from peft_unlearn.plotting import plot_relearning

            path = Path(args.robustness_plot).expanduser()
            plot_relearning({Path(args.adapter).name: report}, title=args.model, path=path)
            print(f"Wrote the relearning plot to {path}")
    return report.to_dict()


def run_eval(argv: list[str]) -> None:
    """Run `peft-unlearn eval ARGV` (errors raise `CLIError`)."""
    import torch

    from peft_unlearn.metrics import evaluate_memorization, format_results_table, write_results_json
    from peft_unlearn.models import load_adapter
    from peft_unlearn.trainer.formats import tokenize_dataset

    args = parse_eval_args(argv)
    sets = load_sets(args, forget=args.max_samples, retain=args.max_samples, heldout=args.max_samples)
    info(f"Loading model {args.model!r}" + (f" with adapter {args.adapter!r}" if args.adapter else "") + "...")
    model, tokenizer = load_model(args, show_progress=not args.no_progress)
    if args.adapter is not None:
        try:
            model = load_adapter(model, args.adapter)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CLIError(f"--adapter: cannot load {args.adapter!r} onto the model: {one_line(err)}") from err
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model.to(device).eval()
    except (RuntimeError, AssertionError, ValueError) as err:
        raise CLIError(f"--device: cannot use {device!r}: {one_line(err)}") from err

    memorization = {
        "batch_size": args.batch_size,
        "el_n": tuple(args.el_n),
        "el_prefix_stride": args.el_prefix_stride,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "compute_el": not args.no_el,
        "show_progress": not args.no_progress,
    }
    results: dict[str, dict[str, float]] = {}
    tokenized: dict[str, list] = {}
    for name, dataset in sets.items():
        try:
            sequences = tokenize_dataset(
                dataset, tokenizer, max_length=args.max_length, completion_only_loss=args.completion_only, name=name
            )
        except (ValueError, TypeError) as err:
            raise CLIError(f"--{name}: {one_line(err)}") from err
        tokenized[name] = sequences
        info(f"Scoring the {name} set ({len(sequences)} examples)...")
        try:
            scores = evaluate_memorization(model, sequences, **memorization)
        except (ValueError, TypeError) as err:
            raise CLIError(f"evaluating the {name} set failed: {one_line(err)}", EXIT_FAILURE) from err
        results[name] = {**{key: float(value) for key, value in scores.items()}, "num_examples": len(sequences)}

    print(format_results_table(results))
    robustness = _run_robustness(args, model, tokenizer, tokenized) if args.robustness else None
    undefined = [f"{name}/{key}" for name, sc in results.items() for key, v in sc.items() if not math.isfinite(v)]
    if undefined:  # EL_n when every sequence has n tokens or fewer
        info(f"not finite: {', '.join(undefined)} (EL_n needs more than n tokens); written as null in the JSON")
    if args.output is not None:
        settings = ("el_prefix_stride", "max_length", "batch_size", "max_samples", "completion_only")
        settings = {"el_n": [] if args.no_el else list(args.el_n), **{k: getattr(args, k) for k in settings}}
        data = {name: getattr(args, name) for name in sets}
        extra = {"robustness": robustness} if robustness is not None else {}
        out = write_results_json(
            args.output, results, model=args.model, adapter=args.adapter, data=data, settings=settings, **extra
        )
        print(f"Wrote results to {out}")
    if args.plot is not None:
        from peft_unlearn.plotting import plot_method_comparison

        metrics = [key for key in next(iter(results.values())) if key not in ("num_examples", "nll", "ppl")]
        title = args.model + (f" + {Path(args.adapter).name}" if args.adapter else "")
        ylabel, path = "score (lower on forget = more forgotten)", Path(args.plot).expanduser()
        plot_method_comparison(results, metrics, title=title, ylabel=ylabel, path=path)
        print(f"Wrote plot to {path}")
