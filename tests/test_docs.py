"""The documentation site builds with ``mkdocs build --strict`` (no warning: broken links, bad docstrings...)."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MKDOCS_YML = REPO / "mkdocs.yml"


RAW_MARKUP = (":class:", ":func:", ":meth:", ":mod:", ":data:", ":attr:", "[~", "[!NOTE]", "*optional*")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs / mkdocstrings not installed (pip install mkdocs mkdocs-material 'mkdocstrings[python]')")
    """The site built once with `mkdocs build --strict`."""
    return _build(tmp_path_factory.mktemp("docs"))


def _build(tmp_path):
    assert MKDOCS_YML.is_file(), f"{MKDOCS_YML} not found"
    tmp_path = Path(tmp_path)
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
    return tmp_path / "site"


def test_mkdocs_build_strict(site):
    assert (site / "contributing" / "index.html").is_file()


def _raw_markup(page: Path) -> list[str]:
    text = re.sub(r"<(script|style)\b.*?</\1>", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return [
        f"{page.parent.name}: {token!r} near {text[max(0, m.start() - 60) : m.start() + 60]!r}"
        for token in RAW_MARKUP
        for m in re.finditer(re.escape(token), text)
    ]


CLEAN_PAGES = ("fila", "losses", "metrics", "trainer", "utils")


@pytest.mark.parametrize("name", CLEAN_PAGES)
def test_api_pages_have_no_raw_markup(site, name):
    """Docstrings are Markdown for mkdocstrings: no Sphinx roles or HF doc-builder syntax reaches the pages."""
    assert set(CLEAN_PAGES) == {p.parent.name for p in (site / "api").glob("*/index.html")}
    found = _raw_markup(site / "api" / name / "index.html")
    assert not found, "\n".join(found[:30]) + f"\n({len(found)} in all)"


def test_api_headings_are_short_and_public(site):
    """Headings show names, not full internal paths, and private helpers are not documented."""
    text = (site / "api" / "losses" / "index.html").read_text(encoding="utf-8")
    headings = re.findall(r"<h[2-4][^>]*>(.*?)</h[2-4]>", text, flags=re.S)
    plain = [html.unescape(re.sub(r"<[^>]+>", "", h)).strip() for h in headings]
    assert any("inverted_hinge_loss" in h for h in plain), plain
    assert not any(h.startswith("peft_unlearn.losses.functions.") for h in plain), plain
    assert not any(re.search(r"(^|\W)_[a-z]", h) for h in plain), plain


def test_math_is_rendered_by_mathjax(site):
    text = (site / "concepts" / "ihl" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in text and "mathjax" in text.lower()


def test_home_page_example_runs(tmp_path, monkeypatch):
    """The home page starts with an install line and its Python example runs as written."""
    text = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)
    assert blocks[0][0] == "bash" and blocks[0][1].startswith("pip install")
    code = next(body for lang, body in blocks if lang == "python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/index.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 10
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_drop_in_guide_changes_exactly_two_lines():
    text = (REPO / "docs" / "guides" / "drop-in.md").read_text(encoding="utf-8")
    diff = re.search(r"```diff\n(.*?)```", text, flags=re.S).group(1).splitlines()
    removed = [line[1:] for line in diff if line.startswith("-")]
    added = [line[1:] for line in diff if line.startswith("+")]
    assert len(removed) == len(added) == 2
    # the new script is valid Python and uses the unlearning classes under the familiar names
    new = "\n".join(line[1:] for line in diff if not line.startswith("-"))
    compile(new, "drop-in.md", "exec")
    assert "UnlearningTrainer as Trainer" in added[0] and "forget_dataset=forget" in added[1]


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines of a Markdown file outside fenced code blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


@pytest.mark.parametrize("page", sorted((REPO / "docs").rglob("*.md")), ids=lambda p: p.relative_to(REPO).as_posix())
def test_lists_render_as_lists(page):
    """Python-Markdown (mkdocs) nests a list only at 4 spaces, and starts one only after a blank line."""
    problems, previous = [], ""
    for number, line in _prose_lines(page):
        item = re.match(r"^( *)(?:[-*+]|\d+\.) ", line)
        if item and 0 < len(item.group(1)) < 4:
            problems.append(f"line {number}: nested item indented {len(item.group(1))} spaces (needs 4)")
        if item and not item.group(1) and previous.strip() and not previous.startswith((" ", "-", "*", "#", "|")):
            if not re.match(r"^(?:[-*+]|\d+\.) ", previous):
                problems.append(f"line {number}: a list right after a paragraph line (add a blank line before it)")
        previous = line
    assert not problems, f"{page.relative_to(REPO)}:\n" + "\n".join(problems)
