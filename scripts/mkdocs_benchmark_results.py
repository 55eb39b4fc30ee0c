"""MkDocs hook: serve the benchmark plots from ``benchmarks/results/`` without copying them into ``docs/``.

Each ``benchmarks/results/*.png`` appears in the site as ``results/<name>.png``, so the benchmark page
shows the plots the scripts wrote last.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files
