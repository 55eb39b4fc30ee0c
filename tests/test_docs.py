"""The documentation site builds with ``mkdocs build --strict`` (no warning: broken links, bad docstrings...)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MKDOCS_YML = REPO / "mkdocs.yml"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings not installed (pip install mkdocs mkdocs-material 'mkdocstrings[python]')",
)


def test_mkdocs_build_strict(tmp_path):
    assert MKDOCS_YML.is_file(), f"{MKDOCS_YML} not found"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(MKDOCS_YML), "-d", str(tmp_path / "site")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`mkdocs build --strict` failed (exit code {proc.returncode}):\n{output}"
    assert (tmp_path / "site" / "index.html").is_file(), f"no index.html in the built site:\n{output}"
    assert (tmp_path / "site" / "api" / "losses" / "index.html").is_file(), f"API pages not built:\n{output}"
