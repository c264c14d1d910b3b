"""How spread out are a checkpoint's document vectors? (mean pairwise cosine; near 1 = collapsed)

    python -m scripts.embedding_spread pt-simlm-scifact pt-contriever-scifact [--stage pretrain] [--data DIR]

For each experiment name (or run directory / summary.json), loads the checkpoint its ``--stage``
wrote (``pretrain``: before fine-tuning; ``retriever1``: after) and prints the mean pairwise
cosine of 256 passages of the run's dataset (:func:`retrievers.pretrain_loop.embedding_spread`; the
pretrain stage records the same number as ``doc_mean_cosine`` since it was added).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from scripts.compare import find_summary

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from retrievers.encoder import BiEncoder
    from retrievers.pretrain_loop import corpus_texts, embedding_spread

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--stage", default="pretrain", help="stage whose checkpoint/ to load (pretrain, retriever1, ...)")
    ap.add_argument("--data", default=os.environ.get("DRLAB_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args(argv)
    for run in args.runs:
        summary = json.loads(find_summary(run, REPO / "outputs").read_text())
        stage = summary["stages"].get(args.stage) or {}
        if not stage.get("dir"):
            raise SystemExit(f"error: '{run}' has no {args.stage} stage")
        ckpt = Path(stage["dir"]) / "checkpoint"
        name = summary.get("data", "scifact")
        texts, _ = corpus_texts({"name": name, "path": str(Path(args.data) / name), "format": "beir"}, [])
        spread = embedding_spread(BiEncoder.load(ckpt), texts, n=args.n)
        print(f"{run}\t{args.stage}\tmean pairwise cosine {spread:.4f}\t{ckpt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
