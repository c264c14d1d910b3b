"""Memory and time of hard-negative mining (retrievers/mining.py) on a real dataset.

    python -m scripts.bench_mine                                   # SciFact, all-MiniLM-L6-v2
    python -m scripts.bench_mine --data nfcorpus --checkpoint outputs/cache/retriever1/<key>/checkpoint

Each configuration runs in its own process, so its peak RSS (``ru_maxrss``) is its own:

* ``model``: load the dataset and the encoder, nothing else (the baseline: "the model's own");
* ``mine``: the same, then :class:`retrievers.mining.DenseMiner` (corpus encoding to fp16 shards,
  FAISS Flat, chunked search of the train queries to ``--depth``, window + sampling);
* ``dense-matrix``: the peer, the same encodings scored as one full query x corpus matrix
  with numpy and ``argpartition`` -- what mining without a chunked index costs.

Writes ``outputs/bench/mine_<data>.json`` with, per configuration, peak RSS, its excess over
``model`` and seconds; the ratio of the miner's excess to the peer's is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import tempfile

    import numpy as np
    import torch

    from retrievers.data import load_dataset
    from retrievers.encoder import build_biencoder
    from retrievers.mining import DenseMiner

    torch.set_num_threads(args.threads)
    data = {"name": args.data, "format": "beir", "path": str(Path(args.data_dir) / args.data), "url": None,
            "train_split": "train", "eval_split": "test", "strict": False}
    ds = load_dataset(data, ["train"])
    if (Path(args.checkpoint) / "drlab_encoder.json").exists():
        enc = build_biencoder(args.checkpoint)
    else:
        enc = build_biencoder(args.checkpoint, pooling="mean", normalize=True, similarity="cos", doc_max_len=256)
    positives = ds.positives("train")
    doc_ids = list(ds.corpus)
    miner = DenseMiner(
        doc_ids=doc_ids, doc_texts=enc.doc_texts([ds.corpus[d] for d in doc_ids]),
        queries={q: ds.queries[q] for q in positives}, positives=positives, depth=args.depth,
        window=(3, args.depth), n_per_query=30, progress=False, search_batch_size=args.search_batch_size,
        encode_batch_size=args.batch_size,
    )
    del ds
    base = _peak_mb()
    t0 = time.perf_counter()
    out = {"config": args.child, "docs": len(doc_ids), "queries": len(miner.queries), "depth": args.depth}
    if args.child == "mine":
        with tempfile.TemporaryDirectory() as tmp:
            _, negs, stats = miner(enc, Path(tmp))
        out["negatives_mean"] = stats["negatives_mean"]
    elif args.child == "dense-matrix":
        d = enc.encode(miner.doc_texts, "doc", batch_size=args.batch_size, progress=False)
        qids = sorted(miner.queries)
        q = enc.encode([miner.queries[x] for x in qids], "query", batch_size=args.batch_size, progress=False)
        scores = q @ d.T  # the full matrix
        top = np.argpartition(-scores, args.depth, axis=1)[:, : args.depth]
        out["matrix_mb"] = scores.nbytes / 2**20
        del top
    out.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(_peak_mb(), 1),
               rss_before_mb=round(base, 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="scifact")
    ap.add_argument("--data-dir", default=os.environ.get("DRLAB_DATA_DIR", str(REPO / "data")))
    ap.add_argument("--checkpoint", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--depth", type=int, default=200)
    ap.add_argument("--search-batch-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = {}
    for cfg in ("model", "mine", "dense-matrix"):
        cmd = [sys.executable, "-m", "scripts.bench_mine", "--child", cfg] + [a for a in sys.argv[1:] if a != "--child"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.exit(f"{cfg} failed:\n{res.stderr[-3000:]}")
        rows[cfg] = json.loads(res.stdout.strip().splitlines()[-1])
        print(cfg, rows[cfg], flush=True)
    base = rows["model"]["peak_rss_mb"]
    for r in rows.values():
        r["excess_over_model_mb"] = round(r["peak_rss_mb"] - base, 1)
    peer = max(rows["dense-matrix"]["excess_over_model_mb"], 1e-9)
    result = {
        "data": args.data, "checkpoint": args.checkpoint, "depth": args.depth,
        "search_batch_size": args.search_batch_size, "threads": args.threads, "rows": rows,
        "mine_excess_mb": rows["mine"]["excess_over_model_mb"],
        "mine_vs_dense_matrix_excess_ratio": round(rows["mine"]["excess_over_model_mb"] / peer, 3),
        "mine_vs_dense_matrix_seconds_ratio": round(rows["mine"]["seconds"] / rows["dense-matrix"]["seconds"], 3),
    }
    out = Path(args.out or REPO / "outputs" / "bench" / f"mine_{args.data}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
