"""Compare the eval runs of several experiments in one table, with paired significance tests.

    python -m scripts.compare bm25-scifact pretrained-scifact dpr-scifact
    python -m scripts.compare outputs/runs/2026-..._dpr_scifact  --metrics ndcg@10 recall@100 --test student
    python -m scripts.compare A B C --out outputs/tables/quickstart.md

Each argument is an experiment name (``outputs/experiments/<name>.json``), a run
directory, or a ``summary.json``; a suffix ``:rerank`` or ``:colbert_e2e`` takes that run's
second-stage row instead (the teacher reranking the retriever's top-k, ColBERT end to end):

    python -m scripts.compare simlm-scifact simlm-scifact:rerank tct-scifact:colbert_e2e

``--fuse A,B`` adds a row that fuses the runs of ``A`` and ``B`` with ranx (``--fusion rrf``, or
``wsum`` on min-max normalised scores), e.g. LLM-expanded BM25 with a dense retriever:

    python -m scripts.compare bm25-scifact lamer-scifact pretrained-scifact --fuse lamer-scifact,pretrained-scifact

The runs must be on the same dataset and split.
Significance: ranx's paired test (Student's t by default; ``fisher`` for a
randomisation test), superscripts name the rows a system beats at p < ``--max-p``.
Runs are given to ranx in trec_eval's document order (see retrievers/evaluation.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from retrievers.data import load_dataset
from retrievers.evaluation import _ranked, fuse, read_trec

REPO = Path(__file__).resolve().parent.parent


def find_summary(arg: str, outputs: Path) -> Path:
    p = Path(arg)
    if p.is_file() and p.name == "summary.json":
        return p
    if p.is_dir() and (p / "summary.json").exists():
        return p / "summary.json"
    pointer = outputs / "experiments" / f"{arg}.json"
    if pointer.exists():
        return Path(json.loads(pointer.read_text())["summary"])
    known = sorted(x.stem for x in (outputs / "experiments").glob("*.json"))
    raise SystemExit(f"error: '{arg}' is not a run dir, a summary.json, or an experiment; known experiments: {known}")


VARIANTS = ("rerank", "colbert_e2e")  # eval's extra rows: runs/<split>.<variant>.trec


def split_variant(arg: str) -> tuple[str, str | None]:
    """``name:rerank`` -> (``name``, ``rerank``); a plain name or path -> (arg, None)."""
    head, sep, tail = arg.rpartition(":")
    if sep and tail in VARIANTS:
        return head, tail
    return arg, None


def load(summary_path: Path, variant: str | None = None) -> tuple[str, dict, dict, str]:
    s = json.loads(summary_path.read_text())
    ev = s["stages"].get("eval")
    if not ev or not ev.get("dir"):
        raise SystemExit(f"error: {summary_path} has no finished eval stage")
    data = s["config"]["data"]
    split = data["eval_split"]
    name = s.get("name") or f"{s['model']}-{s['data']}"
    trec = Path(ev["dir"]) / "runs" / (f"{split}.{variant}.trec" if variant else f"{split}.trec")
    if not trec.exists():
        raise SystemExit(
            f"error: {summary_path}: no {trec.name} in {trec.parent} (was pipeline.eval."
            f"{'rerank_depth' if variant == 'rerank' else 'colbert_e2e'} on for that run?)"
        )
    return (f"{name}:{variant}" if variant else name), read_trec(trec), data, split


def to_markdown(rep: dict, metrics: list[str], max_p: float) -> str:
    """Rows = runs, a letter each; a cell's superscript letters = runs it beats at p < max_p."""
    names = rep["model_names"]
    letters = {n: chr(ord("a") + i) for i, n in enumerate(names)}
    lines = ["| | run | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for n in names:
        cells = []
        for m in metrics:
            beats = "".join(
                letters[o]
                for o in names
                if o != n and rep[n]["comparisons"][o][m] < max_p and rep[n]["scores"][m] > rep[o]["scores"][m]
            )
            cells.append(f"{rep[n]['scores'][m]:.4f}" + (f"<sup>{beats}</sup>" if beats else ""))
        lines.append(f"| {letters[n]} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--metrics", nargs="+", default=["ndcg@10", "mrr@10", "recall@100", "recall@1000"])
    ap.add_argument("--test", default="student", choices=["student", "fisher", "tukey"])
    ap.add_argument("--max-p", type=float, default=0.05)
    ap.add_argument("--outputs", default=os.environ.get("DRLAB_OUTPUT_DIR", str(REPO / "outputs")),
                    help="dr-lab's output directory (default: $DRLAB_OUTPUT_DIR, else ./outputs)")
    ap.add_argument("--out", help="also write the Markdown table here")
    ap.add_argument("--fuse", action="append", default=[], metavar="A,B",
                    help="add a row fusing these runs (names as the positional arguments; repeatable)")
    ap.add_argument("--fusion", default="rrf", choices=["rrf", "wsum"])
    args = ap.parse_args(argv)

    import warnings

    import ranx

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # scipy on identical per-query scores
    loaded = []
    for a in args.runs:
        base, variant = split_variant(a)
        loaded.append(load(find_summary(base, Path(args.outputs)), variant))
    parts_seen = []
    for group in args.fuse:
        parts = [load(find_summary(b, Path(args.outputs)), v) for b, v in map(split_variant, group.split(","))]
        parts_seen += parts
        fused = fuse({name: run for name, run, _, _ in parts}, args.fusion)
        loaded.append((" + ".join(n for n, _, _, _ in parts) + f" ({args.fusion})", fused, parts[0][2], parts[0][3]))
    datasets = {(d["name"], d.get("format", "beir"), d["path"], split) for _, _, d, split in loaded + parts_seen}
    if len(datasets) > 1:
        raise SystemExit(f"error: the runs are on different datasets/splits: {sorted(datasets)}")
    data, split = loaded[0][2], loaded[0][3]
    # the dataset loader, as eval: any format; judgments of queries absent from the queries file are dropped
    qrels = load_dataset(data, [split], with_corpus=False).qrels[split]
    runs = []
    for name, run, _, _ in loaded:
        runs.append(ranx.Run({q: d for q, d in _ranked(run).items() if d}, name=name))
    report = ranx.compare(
        qrels=ranx.Qrels(qrels), runs=runs, metrics=args.metrics, max_p=args.max_p, stat_test=args.test,
        make_comparable=True,  # a query a run has no hit for scores 0 (trec_eval -c), as in eval
    )
    table = to_markdown(report.to_dict(), args.metrics, args.max_p)
    text = (
        f"{table}\n\nPaired {args.test} test, p < {args.max_p}; "
        "superscripts: rows this run is significantly better than.\n"
    )
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
