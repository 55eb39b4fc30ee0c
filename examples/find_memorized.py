"""Find passages a causal LM has memorised verbatim, and build the demo's forget set from them.

For every passage the script runs ONE teacher-forced forward pass and measures the memorisation
accuracy (MA, Tirumala et al. 2022; used by arXiv 2408.06621): the fraction of positions where the
greedy next-token prediction equals the true next token. The passage is tokenized the way the
trainer and ``peft_unlearn.metrics`` tokenize it (with the tokenizer's BOS); every token after the
first input token is a target, i.e. each text token is predicted from BOS + the preceding text.
``ma_skip_first`` additionally leaves out the first text token (predicted from BOS alone).

Inputs (JSON lines with at least ``text`` and ``title``):

* ``--candidates``: famous public-domain / permissively licensed texts, written out verbatim;
* ``--retain``: original encyclopedic paragraphs we want the model to keep;
* ``--heldout``: original, never-published passages (the "not memorised" reference level).

Outputs: a JSON report (per-passage MA / NLL / token count, per-set means) and, with
``--write-forget``, the ``--top-k`` candidates with the highest MA split in two: the first
``top_k - n_memorized_heldout`` become the forget set, the last ``--n-memorized-heldout`` the
memorized-heldout set (memorized as well, never trained on: the knowledge an unlearning run must keep),
written next to the forget file as ``memorized_heldout.jsonl`` (or ``--write-memorized-heldout``).

Example:
    python examples/find_memorized.py --model gemma3-270m --cache-dir /work/cache \\
        --write-forget examples/data/forget.jsonl

Cost: one forward pass per passage (<= 128 tokens); ~1 s each for Gemma-3 270M on 2 CPU threads.
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

DATA_DIR = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parent.parent


def display_path(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (portable reports), else absolute."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return resolved.as_posix()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file of passages.

    Args:
        path: File with one JSON object per line, each with a non-empty ``"text"``.

    Returns:
        The records, in file order.
    """
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("text"), str) or not record["text"].strip():
                raise ValueError(f"{path}:{line_no}: expected a non-empty string field 'text', got {record!r}")
            records.append(record)
    return records


@torch.no_grad()
def score_passage(model: torch.nn.Module, input_ids: list[int]) -> dict[str, float]:
    """Teacher-forced greedy next-token accuracy and mean NLL of one tokenized passage.

    Memory: one ``[T, V]`` float32 logits tensor (T <= 128, V = 262144 for Gemma-3: ~134 MB).

    Args:
        model: A causal LM returning unshifted ``logits``.
        input_ids: Token ids including the tokenizer's BOS (if it adds one); length >= 3.

    Returns:
        ``ma`` (targets = tokens 1..T-1), ``ma_skip_first`` (targets = tokens 2..T-1) and ``nll``
        (mean token negative log-likelihood over the ``ma`` targets, in nats).
    """
    ids = torch.tensor([input_ids], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    targets = ids[0, 1:]
    hits = (logits.argmax(dim=-1) == targets).float()
    return {
        "ma": hits.mean().item(),
        "ma_skip_first": hits[1:].mean().item(),
        "nll": F.cross_entropy(logits, targets).item(),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean / min / max MA, mean NLL and token statistics of a list of scored passages."""
    mas = [row["ma"] for row in rows]
    return {
        "n": len(rows),
        "ma_mean": round(statistics.fmean(mas), 4),
        "ma_median": round(statistics.median(mas), 4),
        "ma_min": round(min(mas), 4),
        "ma_max": round(max(mas), 4),
        "ma_skip_first_mean": round(statistics.fmean(row["ma_skip_first"] for row in rows), 4),
        "nll_mean": round(statistics.fmean(row["nll"] for row in rows), 4),
        "tokens_mean": round(statistics.fmean(row["n_tokens"] for row in rows), 1),
        "tokens_max": max(row["n_tokens"] for row in rows),
    }


def score_set(model, tokenizer, records: list[dict[str, Any]], name: str, max_tokens: int) -> list[dict[str, Any]]:
    """Score every passage of one set; passages longer than ``max_tokens`` are rejected."""
    rows = []
    for index, record in enumerate(records):
        input_ids = tokenizer(record["text"])["input_ids"]
        if len(input_ids) > max_tokens:
            raise ValueError(
                f"{name}[{index}] ({record.get('title')!r}) has {len(input_ids)} tokens, more than "
                f"--max-tokens={max_tokens}; shorten the passage or raise --max-tokens."
            )
        scores = score_passage(model, input_ids)
        rows.append({"title": record.get("title", f"{name}-{index}"), "n_tokens": len(input_ids), **scores})
        print(f"  {name:10s} MA={scores['ma']:.3f} NLL={scores['nll']:.3f} T={len(input_ids):3d}  {rows[-1]['title']}")
    return rows


@dataclass
class FindArguments:
    """Options of this script (every field is a `--flag`, also spelled with dashes)."""

    model: str = field(default="gemma3-270m", metadata={"help": "Alias, local directory or Hub id."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache directory holding gemma3-270m/."})
    candidates: Path = DATA_DIR / "candidates.jsonl"
    retain: Path = DATA_DIR / "retain.jsonl"
    heldout: Path = DATA_DIR / "heldout.jsonl"
    output: Path = DATA_DIR / "memorization_report.json"
    write_forget: Path | None = field(default=None, metadata={"help": "Write the top-k candidates here."})
    top_k: int = field(default=16, metadata={"help": "Memorized passages selected."})
    n_memorized_heldout: int = field(
        default=8, metadata={"help": "How many of the top-k (the lowest MA) are held out instead of forgotten."}
    )
    write_memorized_heldout: Path | None = field(
        default=None, metadata={"help": "Default: memorized_heldout.jsonl next to the forget file."}
    )
    min_ma: float = field(default=0.6, metadata={"help": "Warn when a selected passage is below this MA."})
    max_tokens: int = field(default=128, metadata={"help": "Longest allowed passage, BOS included."})
    threads: int = field(default=2, metadata={"help": "Torch CPU threads (the machine may be shared)."})


def parse_args(argv: list[str] | None = None) -> FindArguments:
    parser = HfArgumentParser(FindArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the measurement; returns the report that is also written to ``--output``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO_ROOT))
    import transformers

    from peft_unlearn.models import load_model_and_tokenizer

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32, cache_dir=args.cache_dir)
    sets = {"candidates": args.candidates, "retain": args.retain, "heldout": args.heldout}
    records = {name: read_jsonl(path) for name, path in sets.items() if path is not None and path.exists()}
    passages = {name: score_set(model, tokenizer, recs, name, args.max_tokens) for name, recs in records.items()}

    report: dict[str, Any] = {
        "command": "python examples/find_memorized.py "
        + " ".join(shlex.quote(arg) for arg in (sys.argv[1:] if argv is None else argv)),
        "model": args.model,
        "dtype": "float32",
        "device": f"cpu, {args.threads} torch threads",
        "metric": (
            "MA = teacher-forced greedy next-token accuracy; input = tokenizer(text) (BOS + text tokens), "
            "targets = every token after the first input token. ma_skip_first also drops the first text token."
        ),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "files": {name: display_path(path) for name, path in sets.items() if name in records},
    }
    if "candidates" in passages:
        ranked = sorted(
            zip(records["candidates"], passages["candidates"]), key=lambda pair: pair[1]["ma"], reverse=True
        )
        chosen = ranked[: args.top_k]
        low = [row["title"] for _, row in chosen if row["ma"] < args.min_ma]
        if low:
            print(f"WARNING: {len(low)} selected passages have MA < {args.min_ma}: {low}")
        n_kept = args.n_memorized_heldout if 0 <= args.n_memorized_heldout < len(chosen) else 0
        passages["forget"] = [row for _, row in chosen[: len(chosen) - n_kept]]
        passages["memorized_heldout"] = [row for _, row in chosen[len(chosen) - n_kept :]]
        report["forget_selection"] = {"top_k": args.top_k, "min_ma": args.min_ma, "below_min_ma": low}
        if not 0 <= args.n_memorized_heldout < len(chosen):
            raise SystemExit(
                f"--n-memorized-heldout must be in [0, {len(chosen)}) (fewer than the selected passages), "
                f"got {args.n_memorized_heldout}"
            )
        n_forget = len(chosen) - args.n_memorized_heldout
        report["forget_selection"]["n_forget"] = n_forget
        report["forget_selection"]["n_memorized_heldout"] = args.n_memorized_heldout
        if args.write_forget is not None:
            kept_path = args.write_memorized_heldout or args.write_forget.with_name("memorized_heldout.jsonl")
            keys = ("text", "title", "source", "license")
            for path, part in ((args.write_forget, chosen[:n_forget]), (kept_path, chosen[n_forget:])):
                with open(path, "w", encoding="utf-8") as handle:
                    for record, _ in part:
                        handle.write(
                            json.dumps({k: record[k] for k in keys if k in record}, ensure_ascii=False) + "\n"
                        )
                print(f"wrote {len(part)} passages to {path}")
    report["summary"] = {name: summarize(rows) for name, rows in passages.items()}
    report["passages"] = {
        name: [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
        for name, rows in passages.items()
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, stats in report["summary"].items():
        print(
            f"{name:10s} n={stats['n']:2d} MA mean={stats['ma_mean']:.3f} (min {stats['ma_min']:.3f}, max {stats['ma_max']:.3f})"
        )
    print(f"report written to {args.output}")
    return report


if __name__ == "__main__":
    main()
