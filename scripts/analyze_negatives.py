"""Where do mined negatives sit, and how hard / how risky are they? (JSON + a plot)

    python -m scripts.analyze_negatives outputs/cache/mine/<key> --data-dir ../shared/data --data scifact \
        [--bm25 outputs/cache/bm25/<key>] [--refresh outputs/cache/retriever2/<key>/refresh_log.jsonl]

Reports, for the train queries of the mine stage:

* where the judged positives rank in the miner's own train run (rank 1 = the retriever
  already solves the query, so its negatives give little gradient);
* the rank histogram of the sampled negatives and their score gap to the positive;
* "relevant elsewhere": the fraction of mined negatives that are judged relevant for some
  *other* query (train or test) -- documents on the topic of the collection's judged set,
  a weak proxy for unjudged false negatives;
* the overlap with the BM25 negatives of the same window, when ``--bm25`` is given.

Writes ``outputs/analysis/<mine key>.json`` (never into the cached stage dir) unless
``--out`` is given, and prints it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from retrievers.data import read_qrels
    from retrievers.evaluation import read_trec, trec_order

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mine_dir", type=Path)
    ap.add_argument("--data", default="scifact")
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--bm25", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    qdir = args.data_dir / args.data / "qrels"
    read_qrels(qdir / f"{args.train_split}.tsv")  # fails early (DataError) when the train split's qrels are missing
    relevant_for: dict[str, set[str]] = {}
    for f in qdir.glob("*.tsv"):
        for q, docs in read_qrels(f).items():
            for d, r in docs.items():
                if r > 0:
                    relevant_for.setdefault(d, set()).add(q)
    negs = [json.loads(x) for x in (args.mine_dir / "negatives.jsonl").read_text().splitlines()]
    run = read_trec(next((args.mine_dir / "runs").glob("*.trec")))
    pos_rank, gaps, neg_ranks, elsewhere, n_neg = [], [], [], 0, 0
    for row in negs:
        q = row["qid"]
        ranked = [d for d, _ in trec_order(run.get(q, {}))]
        scores = run.get(q, {})
        pos = [d for d in row["pos"]]
        ranks = [ranked.index(d) + 1 for d in pos if d in ranked]
        pos_rank.append(min(ranks) if ranks else len(ranked) + 1)
        best_pos = max((scores[d] for d in pos if d in scores), default=None)
        for c in row["neg"]:
            n_neg += 1
            neg_ranks.append(c["rank"])
            if best_pos is not None:
                gaps.append(best_pos - c["score"])
            if relevant_for.get(c["id"], set()) - {q}:
                elsewhere += 1
    pr = np.array(pos_rank)
    out = {
        "mine_dir": str(args.mine_dir),
        "train_queries": len(negs),
        "positive_rank1_fraction": round(float(np.mean(pr == 1)), 4),
        "positive_in_top10_fraction": round(float(np.mean(pr <= 10)), 4),
        "positive_rank_median": float(np.median(pr)),
        "negatives": n_neg,
        "negative_rank_quartiles": [float(x) for x in np.percentile(neg_ranks, [25, 50, 75])] if neg_ranks else [],
        "score_gap_to_best_positive_mean": round(float(np.mean(gaps)), 4) if gaps else None,
        "negatives_above_best_positive_fraction": round(float(np.mean(np.array(gaps) < 0)), 4) if gaps else None,
        "relevant_elsewhere_fraction": round(elsewhere / max(1, n_neg), 4),
    }
    if args.bm25 is not None:
        bm = read_trec(args.bm25 / "runs" / f"{args.train_split}.trec")
        ov = []
        for row in negs:
            ranked = [d for d, _ in trec_order(bm.get(row["qid"], {}))][:200]
            if row["neg"]:
                ov.append(len({c["id"] for c in row["neg"]} & set(ranked)) / len(row["neg"]))
        out["in_bm25_top200_fraction"] = round(float(np.mean(ov)), 4) if ov else None
    dest = args.out or REPO / "outputs" / "analysis" / f"{args.mine_dir.resolve().name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
