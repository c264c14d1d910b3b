"""Semantic textual similarity: sentence pairs with gold scores, and their SentEval-style evaluation.

Data (``data.format: sts``, ``conf/data/{stsb,sickr,sts12..16,sts}.yaml``): ``<path>/<set>/<split>.tsv``
with a header ``sentence1<TAB>sentence2<TAB>score`` and one pair per line (the layout of
``../shared/data/sts``). ``data.sets`` lists the sets the eval scores; ``data.subsets`` gives, per
set, line ranges of its subsets (STS12-16: MSRpar, headlines, ...; the header is line 1);
``data.text`` (``{path, split}``) is where the pretrain stage reads unlabeled sentences.

Evaluation, as SentEval and sentence-transformers' ``EmbeddingSimilarityEvaluator``: both sentences
are encoded by the same encoder (the query side, as MTEB does for symmetric tasks), scored by the
cosine of their vectors, and compared with the gold scores by Spearman's and Pearson's correlation.
Per set: over all its pairs pooled (``spearman``, SimCSE's "all" setting), and with subsets also per
subset, their mean (``spearman_mean``) and pair-weighted mean (``spearman_wmean``, SentEval's "wmean").
Correlations are fractions (0.7723, not 77.23), as every other dr-lab metric.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("drlab")

HEADER = ["sentence1", "sentence2", "score"]


def is_sts(data: dict[str, Any]) -> bool:
    return data.get("format") == "sts"


def set_file(data: dict[str, Any], name: str, split: str) -> Path:
    return Path(data["path"]) / name / f"{split}.tsv"


def expected_files(data: dict[str, Any]) -> list[Path]:
    files = [set_file(data, s, data["eval_split"]) for s in data.get("sets") or []]
    text = data.get("text") or {}
    if text.get("path"):
        files.append(Path(text["path"]) / f"{text['split']}.tsv")
    return files


def read_pairs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(sentences 1, sentences 2, gold scores) of an STS file; a DataError names the file, line and fix."""
    from retrievers.data import DataError

    if not path.exists():
        raise DataError(f"{path} does not exist; an STS set is <data.path>/<set>/<split>.tsv (data.sets, data.eval_split)")
    a, b, y = [], [], []
    with open(path, encoding="utf-8", newline="") as fh:
        rows = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header != HEADER:
            raise DataError(f"{path}:1: header is {header}; expected {HEADER} (tab-separated)")
        for n, row in enumerate(rows, start=2):
            if not row or row == [""]:
                continue
            if len(row) != 3:
                raise DataError(f"{path}:{n}: {len(row)} tab-separated fields; expected 3 (sentence1, sentence2, score)")
            try:
                score = float(row[2])
            except ValueError:
                raise DataError(f"{path}:{n}: score '{row[2]}' is not a number") from None
            if not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}:{n}: an empty sentence")
            a.append(row[0])
            b.append(row[1])
            y.append(score)
    if not y:
        raise DataError(f"{path}: no sentence pairs")
    return a, b, np.asarray(y, dtype=np.float64)


def text_sentences(text: dict[str, Any]) -> list[str]:
    """The unlabeled pre-training sentences of ``data.text``: both sides of every pair, in file order."""
    a, b, _ = read_pairs(Path(text["path"]) / f"{text['split']}.tsv")
    return [s for pair in zip(a, b) for s in pair]


def correlations(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    return {"spearman": float(spearmanr(pred, gold)[0]), "pearson": float(pearsonr(pred, gold)[0])}


def score_set(pred: np.ndarray, gold: np.ndarray, subsets: dict[str, list[int]] | None) -> dict[str, Any]:
    """Correlations over all pairs, and per subset (line ranges, header = line 1) with mean and weighted mean."""
    out: dict[str, Any] = {"pairs": len(gold), **correlations(pred, gold), "subsets": {}}
    if subsets:
        for name, (first, last) in subsets.items():
            sl = slice(int(first) - 2, int(last) - 1)
            out["subsets"][name] = {"pairs": len(gold[sl]), **correlations(pred[sl], gold[sl])}
        covered = sum(s["pairs"] for s in out["subsets"].values())
        if covered != len(gold):
            from retrievers.data import DataError

            raise DataError(f"data.subsets cover {covered} pairs, the file has {len(gold)}: fix the line ranges")
        w = np.array([s["pairs"] for s in out["subsets"].values()], dtype=float)
        for m in ("spearman", "pearson"):
            v = np.array([s[m] for s in out["subsets"].values()])
            out[f"{m}_mean"], out[f"{m}_wmean"] = float(v.mean()), float((v * w).sum() / w.sum())
    return out


def evaluate_sts(encoder, data: dict[str, Any], *, batch_size: int, device, bf16: bool = False,
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """Each of ``data.sets`` scored with ``encoder``: {set: score_set(...) + cosines and gold}."""
    results: dict[str, dict[str, Any]] = {}
    for name in data["sets"]:
        a, b, gold = read_pairs(set_file(data, name, data["eval_split"]))
        uniq = list(dict.fromkeys(a + b))
        where = {s: i for i, s in enumerate(uniq)}
        v = encoder.encode(uniq, "query", batch_size=batch_size, device=device, bf16=bf16, progress=progress)
        v = v.astype(np.float64)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        cos = np.einsum("ij,ij->i", v[[where[s] for s in a]], v[[where[s] for s in b]])
        results[name] = {**score_set(cos, gold, (data.get("subsets") or {}).get(name)), "cosine": cos, "gold": gold}
        log.info("[eval] %s %s: Spearman %.4f, Pearson %.4f (%d pairs)", name, data["eval_split"],
                 results[name]["spearman"], results[name]["pearson"], len(gold))
    return results


def flat_metrics(results: dict[str, dict[str, Any]], split: str) -> dict[str, float]:
    """``<split>/spearman`` etc. for the first set (the headline), ``<set>/<metric>`` and
    ``<set>/<subset>/<metric>`` for every set."""
    out: dict[str, float] = {}
    for i, (name, r) in enumerate(results.items()):
        scalars = {k: v for k, v in r.items() if isinstance(v, float)}
        if i == 0:
            out.update({f"{split}/{k}": v for k, v in scalars.items()})
        out.update({f"{name}/{k}": v for k, v in scalars.items()})
        for sub, s in r["subsets"].items():
            out.update({f"{name}/{sub}/{m}": s[m] for m in ("spearman", "pearson")})
    return out


def markdown(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| set | subset | pairs | Spearman x100 | Pearson x100 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for sub, s in r["subsets"].items():
            rows.append(f"| {name} | {sub} | {s['pairs']} | {100 * s['spearman']:.2f} | {100 * s['pearson']:.2f} |")
        if r["subsets"]:
            rows.append(f"| {name} | wmean (SentEval) | {r['pairs']} | {100 * r['spearman_wmean']:.2f} | "
                        f"{100 * r['pearson_wmean']:.2f} |")
        label = "all pairs" if r["subsets"] else ""
        rows.append(f"| **{name}** | {label} | {r['pairs']} | **{100 * r['spearman']:.2f}** | {100 * r['pearson']:.2f} |")
    return "\n".join(rows)


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Cosine against gold score, one panel per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        ax.scatter(r["gold"], r["cosine"], s=3, alpha=0.3)
        ax.set_title(f"{name}: Spearman {100 * r['spearman']:.1f}", fontsize=9)
        ax.set_xlabel("gold score")
        ax.set_ylabel("cosine")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
