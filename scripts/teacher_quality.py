"""How good is a finished rerank stage's teacher on the train candidates it scored?

    python -m scripts.teacher_quality outputs/cache/rerank/<key> [more stage dirs or experiment names]

Reads ``teacher_scores.jsonl`` and the dataset's train qrels (from the stage's manifest) and prints,
per stage, ``retrievers.reranking.teacher_quality``: top-1-is-positive next to its chance rate, and the
mean per-query AUC of positives against the other candidates (0.5 = chance). New rerank runs
record the same numbers in their metrics (``train_auc``, ...); this reads runs made before that.
A run directory, summary.json or experiment name takes that run's rerank stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrievers.reranking import teacher_quality
from scripts.compare import find_summary

REPO = Path(__file__).resolve().parent.parent


def stage_dir(arg: str) -> Path:
    """A rerank stage directory as given, or the rerank stage of a run / summary / experiment (compare.py's lookup)."""
    if (Path(arg) / "teacher_scores.jsonl").exists():
        return Path(arg)
    summary = json.loads(find_summary(arg, REPO / "outputs").read_text())
    d = (summary["stages"].get("rerank") or {}).get("dir")
    if not d:
        raise SystemExit(f"error: '{arg}' has no rerank stage")
    return Path(d)


def train_positives(manifest: dict, data_dir: str | None) -> dict[str, set[str]]:
    """Judged-relevant train passages per query, from ``<data_dir or $DRLAB_DATA_DIR/<name>>/qrels``."""
    import os

    from retrievers.data import read_qrels

    data = manifest["reads"]["data"]
    root = Path(data_dir) if data_dir else Path(os.environ.get("DRLAB_DATA_DIR", REPO / "data")) / data["name"]
    path = root / "qrels" / f"{data.get('train_split') or 'train'}.tsv"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist. Fix: --data-dir /path/to/{data['name']} or set DRLAB_DATA_DIR")
    return {q: {d for d, r in docs.items() if r > 0} for q, docs in read_qrels(path).items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="+", help="rerank stage directories or experiment names")
    ap.add_argument("--data-dir", help="the BEIR dataset folder (default: from the manifest / DRLAB_DATA_DIR)")
    args = ap.parse_args(argv)
    for arg in args.stages:
        d = stage_dir(arg)
        manifest = json.loads((d / "manifest.json").read_text())
        pos = train_positives(manifest, args.data_dir)
        scores = {}
        with open(d / "teacher_scores.jsonl", encoding="utf-8") as fh:
            for line in fh:
                o = json.loads(line)
                scores[o["qid"]] = o["scores"]
        print(json.dumps({"stage": d.name, "queries": len(scores), **teacher_quality(scores, pos)}))


if __name__ == "__main__":
    main()
