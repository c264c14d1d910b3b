"""TREC run files, ranx metrics that equal trec_eval, reports and plots.

ranx orders a query's documents with an unstable sort on score, so on tied scores
(common with BM25) its order can differ from trec_eval's, which sorts by score
descending, then document id descending. :func:`evaluate` therefore hands ranx a
copy of the run whose scores are replaced by ranks in trec_eval's order: every
rank-based metric (nDCG, MRR, Recall, MAP, P) then equals trec_eval's exactly.
Queries in the qrels without results count as zero (trec_eval ``-c``); results for
queries not in the qrels are ignored.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger("drlab")

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def write_trec(run: Run, path: Path, tag: str = "drlab", depth: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        for qid, docs in run.items():
            ranked = trec_order(docs)[:depth] if depth else trec_order(docs)
            for rank, (did, score) in enumerate(ranked, 1):
                fh.write(f"{qid} Q0 {did} {rank} {score:.6f} {tag}\n")
    tmp.replace(path)


def read_trec(path: Path) -> Run:
    run: Run = {}
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) != 6:
                raise ValueError(f"{path}:{lineno}: a TREC run line has 6 columns, got {len(cols)}")
            run.setdefault(cols[0], {})[cols[2]] = float(cols[4])
    return run


def trec_order(docs: dict[str, float]) -> list[tuple[str, float]]:
    """trec_eval's order: score descending, then document id descending."""
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def _ranked(run: Run) -> Run:
    out: Run = {}
    for qid, docs in run.items():
        ordered = trec_order(docs)
        n = len(ordered)
        out[qid] = {did: float(n - i) for i, (did, _) in enumerate(ordered)}
    return out


def evaluate(qrels: Qrels, run: Run, metrics: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query values of ranx ``metrics`` (e.g. ``ndcg@10``, ``mrr@10``, ``recall@100``)."""
    import warnings

    import ranx

    if not any(qrels.values()):
        raise ValueError("evaluate() got qrels with no judged query")
    warnings.filterwarnings("ignore", message=".*unsafe cast from uint64 to int64.*")  # ranx/numba, harmless
    q = ranx.Qrels({k: dict(v) for k, v in qrels.items() if v})
    r = ranx.Run({k: v for k, v in _ranked(run).items() if v} or {next(iter(qrels)): {"__none__": 0.0}})
    per_query: dict[str, dict[str, float]] = {}
    means: dict[str, float] = {}
    scores = ranx.evaluate(q, r, metrics, return_mean=False, make_comparable=True)
    if len(metrics) == 1:
        scores = {metrics[0]: scores}
    qids = list(r.run.keys())
    for m in metrics:
        vals = np.asarray(scores[m], dtype=float)
        means[m] = float(vals.mean()) if len(vals) else 0.0
        for qid, v in zip(qids, vals):
            per_query.setdefault(qid, {})[m] = float(v)
    return means, per_query


def recall_curve(qrels: Qrels, run: Run, ks=(1, 5, 10, 20, 50, 100, 200, 500, 1000)) -> dict[int, float]:
    means, _ = evaluate(qrels, run, [f"recall@{k}" for k in ks])
    return {k: means[f"recall@{k}"] for k in ks}


def plot_report(curves: dict[str, dict[int, float]], per_query: dict[str, dict[str, float]], metric: str, path: Path,
                title: str = ""):
    """Recall@k curves (left) and the per-query distribution of ``metric`` (right), under ``title``
    (the system, dataset and split: a figure copied out of its directory still says what it shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, curve in curves.items():
        ks = sorted(curve)
        a.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    a.set_xscale("log")
    a.set_xlabel("k")
    a.set_ylabel("recall@k")
    a.set_ylim(0, 1.02)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    vals = [v[metric] for v in per_query.values() if metric in v]
    b.hist(vals, bins=20, range=(0, 1), color="#4c72b0")
    b.set_xlabel(f"per-query {metric}")
    b.set_ylabel("queries")
    b.set_title(f"mean {np.mean(vals):.4f} over {len(vals)} queries" if vals else "no queries")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: dict[str, dict[str, float]], metrics: list[str]) -> str:
    head = "| run | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    body = ""
    for name, vals in rows.items():
        cells = [f"{vals[m]:.4f}" if m in vals and not math.isnan(vals[m]) else "-" for m in metrics]
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


def save_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def unseen_queries(eval_qrels, train_qrels) -> list[str]:
    """Eval queries none of whose relevant documents is relevant for some train query."""
    seen = {d for docs in train_qrels.values() for d, r in docs.items() if r > 0}
    return [q for q, docs in eval_qrels.items() if not any(d in seen for d, r in docs.items() if r > 0)]


def fuse(runs: dict[str, dict], method: str, weights: list[float] | None = None) -> dict:
    """ranx fusion of runs (``rrf`` or ``wsum`` on min-max normalised scores)."""
    from ranx import Run
    from ranx import fuse as ranx_fuse

    if method not in ("rrf", "wsum"):
        raise ValueError(f"pipeline.eval.fusion '{method}' unknown; valid choices: rrf, wsum (or null)")
    # ranx requires the same query ids in every run: a query one run has no hits for gets an empty list
    qids = sorted({q for r in runs.values() for q, d in r.items() if d})
    rs = [Run({q: dict(r.get(q) or {}) for q in qids}, name=n) for n, r in runs.items()]
    if method == "wsum":  # ranx's wsum has no default weights: equal weights unless given
        weights = [float(w) for w in weights] if weights else [1.0 / len(rs)] * len(rs)
        if len(weights) != len(rs):
            raise ValueError(f"pipeline.eval.fusion_weights has {len(weights)} weights for {len(rs)} runs {list(runs)}")
    params = {"weights": weights} if method == "wsum" else None
    norm = "min-max" if method == "wsum" else None
    fused = ranx_fuse(runs=rs, method=method, norm=norm, params=params)
    return {q: dict(d) for q, d in fused.to_dict().items()}
