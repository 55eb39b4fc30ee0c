"""Helpers shared by the test modules (fixtures live in `conftest.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def run_python(
    args: Sequence[str | Path],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    expect: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `python *args` in a fresh interpreter (offline, one thread) and assert that it succeeded.

    Args:
        args: Arguments after the interpreter, e.g. `["-m", "peft_unlearn.cli", "train", ...]` or a script path.
        cwd: Working directory of the subprocess.
        env: Extra environment variables (on top of the current environment and the offline defaults).
        timeout: Seconds before the subprocess is killed.
        expect: A string that must appear in its standard output (a marker printed at the end of a script).

    Returns:
        The completed process (text-mode `stdout` / `stderr`).
    """
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    shown = [str(a)[:80] for a in args[:3]]
    assert proc.returncode == 0, (
        f"python {shown} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    assert expect is None or expect in proc.stdout, (
        f"python {shown}: {expect!r} not in its output:\n{proc.stdout[-2000:]}"
    )
    return proc


def quick_cpu_config(output_dir: str | os.PathLike[str], **overrides):
    """An `UnlearningConfig` for a few CPU steps on a tiny model: no saving, reporting or progress bars.

    Defaults: 2 examples per batch, lr 1e-2, a log line every step; `overrides` replace or add fields.
    """
    from peft_unlearn import UnlearningConfig

    defaults = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    return UnlearningConfig(**{**defaults, **overrides})


def backward_token_nll(model, batch: Mapping[str, Any]) -> int:
    """Brute-force reference: backpropagate the float64 token-mean NLL of `batch`; return its supervised tokens.

    The loss is the next-token cross-entropy over the positions whose (unshifted) label is not -100, computed in
    float64 from the model's logits, so the gradients are a reference for the Fisher and VILA statistics.
    """
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    loss.backward()
    return int((labels != -100).sum())
