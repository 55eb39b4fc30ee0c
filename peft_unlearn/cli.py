"""`peft-unlearn train | eval | env | version` (reference: `docs/cli.md`), built like TRL's scripts on `trl.TrlParser`.

Exit codes: 0 success, 1 runtime failure (including a run that trained no step), 2 usage error (bad flag or value,
missing or unreadable input, a model or adapter that does not exist), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from collections.abc import Sequence

from .commands import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, CLIError, Parser
from .commands.evaluate import EvalArguments, parse_eval_args, run_eval
from .commands.train import TrainArguments, parse_train_args, run_train
from .data_files import DataFileError
from .utils import one_line

__all__ = ["CLIError", "EvalArguments", "TrainArguments", "main", "parse_eval_args", "parse_train_args"]

_TRACEBACK_ENV = "PEFT_UNLEARN_TRACEBACK"


def _cmd_env(argv: list[str]) -> None:
    from trl.scripts.env import print_env

    from peft_unlearn import __version__

    Parser(prog=f"{PROG} env", description="Print versions of the ML stack for bug reports.").parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()) as report:
        print_env()  # what `trl env` prints: platform, torch, accelerators, transformers, peft, bitsandbytes, ...
    print(f"{report.getvalue().rstrip()}\n- peft_unlearn version: {__version__}\n")


def _cmd_version(argv: list[str]) -> None:
    from peft_unlearn import __version__

    Parser(prog=f"{PROG} version", description="Print the peft_unlearn version.").parse_args(argv)
    print(f"{PROG} {__version__}")


_COMMANDS = {
    "train": (run_train, "unlearn a forget set (LoRA with FILA, VILA or default init, or full fine-tuning)"),
    "eval": (run_eval, "measure memorization (MA, EL_n, NLL, perplexity) on forget/retain/held-out sets"),
    "env": (_cmd_env, "print versions of torch, transformers, peft, trl, ... for bug reports"),
    "version": (_cmd_version, "print the peft_unlearn version"),
}


def _help() -> str:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Parameter-efficient knowledge unlearning for LLMs (Inverted Hinge Loss + FILA, arXiv 2408.06621).",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command. Exit codes: 0 ok, 1 failure, 2 usage error.",
    )
    parser.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (_, text) in _COMMANDS.items():
        commands.add_parser(name, help=text)
    return parser.format_help()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `peft-unlearn` command line on `argv` (default `sys.argv[1:]`, without the program name).

    Returns `EXIT_OK`; a failure prints one line to stderr (`PEFT_UNLEARN_TRACEBACK=1` shows the traceback of an
    unexpected error) and raises `SystemExit` with `EXIT_USAGE` (2), `EXIT_FAILURE` (1) or `EXIT_INTERRUPTED` (130).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_help(), file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    if args[0] in ("-h", "--help"):
        print(_help())
        return EXIT_OK
    command, rest = ("version" if args[0] in ("--version", "-V") else args[0]), args[1:]
    if command not in _COMMANDS:
        expected = f"expected one of {', '.join(_COMMANDS)} (see '{PROG} --help')"
        print(f"{PROG}: error: unknown command {command!r}; {expected}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            _COMMANDS[command][0](rest)
        return EXIT_OK
    except (CLIError, DataFileError, FileExistsError, NotADirectoryError) as err:
        # a bad data file is a usage error; the save policy refusing --output (FileExistsError) is a failure
        code = getattr(err, "exit_code", EXIT_USAGE if isinstance(err, DataFileError) else EXIT_FAILURE)
        print(f"{PROG} {command}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(code) from None
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as err:
        if os.environ.get(_TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise
        hint = f"(set {_TRACEBACK_ENV}=1 for the traceback)"
        print(f"{PROG} {command}: error: {type(err).__name__}: {one_line(err)} {hint}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


if __name__ == "__main__":
    sys.exit(main())
