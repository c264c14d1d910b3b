"""Hard-negative mining: search train queries with a retriever, keep ranked non-positives.

ANCE (Xiong et al., ICLR 2021) and RocketQA / Tevatron / SimLM's ``Retriever2`` train a second
retriever on negatives retrieved by the first. :class:`DenseMiner` encodes a corpus
(:func:`retrievers.embeddings.encode_corpus`: resumable fp16 shards), indexes it with FAISS,
searches the train queries to ``depth`` (``search_batch_size`` queries per call, so memory is
bounded by ``search_batch_size x corpus`` scores) and :func:`select_negatives` keeps the
non-positive candidates ranked inside ``window: [lo, hi]`` (1-based, inclusive, ranks counted
*before* positives are removed), sampling ``n_per_query`` with a seeded generator. With teacher
scores (``{"qid", "scores": {docid: score}}`` lines), a candidate scored >= the query's lowest
positive minus ``fn_margin`` is dropped (RocketQA's denoising, the positive as reference).

``negatives.jsonl``: one line per train query, ``qid``, ``pos`` [ids], ``neg`` [{id, rank, score}]
in rank order. The mine stage, the ANCE refresh and the rerank stage's re-mining all call this.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrievers.errors import ConfigError
from retrievers.precision import choose, precision_metrics

log = logging.getLogger("drlab")

NEGATIVES_FILE = "negatives.jsonl"


# --------------------------------------------------------------------------- selection


def select_negatives(
    ranked: dict[str, list[tuple[str, float]]],
    positives: dict[str, Sequence[str]],
    window: Sequence[int],
    n: int | None,
    seed: int,
    teacher: dict[str, dict[str, float]] | None = None,
    fn_margin: float = 0.0,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Per query, ``n`` sampled non-positives from ranks ``window`` of ``ranked`` (best first).

    Returns ``({qid: [{"id", "rank", "score"}, ...]}, stats)``; each list is in rank
    order. Sampling uses ``numpy.random.default_rng([seed, i])`` for the i-th query in
    sorted qid order, so the choice for one query does not depend on the others.
    """
    lo, hi = int(window[0]), int(window[1])
    if lo < 1 or hi < lo:
        raise ConfigError(f"pipeline.mine.window must be [lo, hi] with 1 <= lo <= hi, got {list(window)}")
    out: dict[str, list[dict[str, Any]]] = {}
    n_window = n_filtered = n_unscored = 0
    for i, qid in enumerate(sorted(ranked)):
        pos = set(positives.get(qid, ()))
        cands = [
            {"id": d, "rank": r, "score": round(float(s), 6)}
            for r, (d, s) in enumerate(ranked[qid], start=1)
            if lo <= r <= hi and d not in pos
        ]
        n_window += len(cands)
        if teacher is not None and pos:
            ts = teacher.get(qid, {})
            ref = [ts[d] for d in pos if d in ts]
            if ref:
                bar = min(ref) - float(fn_margin)
                kept = []
                for c in cands:
                    if c["id"] not in ts:
                        n_unscored += 1
                        kept.append(c)
                    elif ts[c["id"]] < bar:
                        kept.append(c)
                n_filtered += len(cands) - len(kept)
                cands = kept
        if n is not None and len(cands) > int(n):
            rng = np.random.default_rng([int(seed), i])
            keep = np.sort(rng.choice(len(cands), size=int(n), replace=False))
            cands = [cands[j] for j in keep]
        out[qid] = cands
    sizes = [len(v) for v in out.values()]
    stats = {
        "queries": len(out),
        "window_candidates_mean": n_window / max(1, len(out)),
        "negatives_mean": float(np.mean(sizes)) if sizes else 0.0,
        "queries_without_negatives": sum(1 for s in sizes if s == 0),
        "teacher_filtered": n_filtered,
        "teacher_unscored": n_unscored,
    }
    return out, stats


def write_negatives(path: Path, negs: dict[str, list[dict]], positives: dict[str, Sequence[str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for qid in sorted(negs):
            fh.write(json.dumps({"qid": qid, "pos": list(positives.get(qid, ())), "neg": negs[qid]}) + "\n")
    os.replace(tmp, path)


def read_negatives(path: Path) -> dict[str, list[str]]:
    """``{qid: [negative doc ids in rank order]}`` from a ``negatives.jsonl``."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            try:
                o = json.loads(line)
                out[str(o["qid"])] = [str(c["id"]) for c in o["neg"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{i}: not a negatives line ({e}); re-run the mine stage") from None
    return out


def read_teacher_scores(path: str | Path) -> dict[str, dict[str, float]]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"pipeline.mine.teacher_scores: {path} does not exist")
    out: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            try:
                o = json.loads(line)
                out[str(o["qid"])] = {str(d): float(s) for d, s in o["scores"].items()}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise ConfigError(
                    f"{path}:{i}: expected {{\"qid\": ..., \"scores\": {{docid: score}}}} ({e})"
                ) from None
    return out


def window_sets(ranked: dict[str, list[tuple[str, float]]], positives: dict[str, Sequence[str]],
                window: Sequence[int]) -> dict[str, set[str]]:
    """Per query, the set of non-positive candidates ranked inside ``window`` (before sampling)."""
    lo, hi = int(window[0]), int(window[1])
    return {q: {d for r, (d, _) in enumerate(docs, start=1) if lo <= r <= hi and d not in set(positives.get(q, ()))}
            for q, docs in ranked.items()}


def overlap(old: dict[str, list[str]], new: dict[str, list[str]]) -> float:
    """Mean over queries of |new ∩ old| / |new|: how much of the new negatives were already there."""
    vals = [len(set(v) & set(old.get(q, ()))) / len(v) for q, v in new.items() if v]
    return float(np.mean(vals)) if vals else 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_trec(path: Path, ranked: dict[str, list[tuple[str, float]]], tag: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for qid in ranked:
            for r, (d, s) in enumerate(ranked[qid], start=1):
                fh.write(f"{qid} Q0 {d} {r} {s:.6f} {tag}\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- dense search


@dataclass
class DenseMiner:
    """Encode a corpus, index it, search queries to ``depth`` and select negatives.

    Picklable (plain lists and dicts), so the ANCE asynchronous refresh can hand it to
    a worker process. ``__call__(encoder, work_dir)`` returns ``(ranked, negatives,
    stats)``; ``work_dir`` receives the embedding shards (delete it afterwards).
    """

    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]
    positives: dict[str, list[str]]
    depth: int = 200
    window: tuple[int, int] = (3, 200)
    n_per_query: int | None = 30
    seed: int = 42
    factory: str = "Flat"
    search_batch_size: int = 256
    encode_batch_size: int = 128
    doc_max_len: int | None = None
    shard_size: int = 100000
    device: str = "cpu"
    precision: str = "fp32"  # auto | fp32 | bf16 (retrievers.precision; auto is checked at every search)
    progress: bool = True
    teacher_scores: str | None = None
    fn_margin: float = 0.0
    last_stats: dict[str, Any] = field(default_factory=dict)
    # the previous call's candidate windows: each call reports how much of its window is new
    prev_window: dict[str, set[str]] | None = None

    def search(self, encoder, work_dir: Path) -> dict[str, list[tuple[str, float]]]:
        import torch

        from retrievers.embeddings import encode_corpus
        from retrievers.faiss_index import build_index, search

        device = torch.device(self.device)
        encoder.to(device)
        was_training = encoder.training
        encoder.eval()
        saved = encoder.cfg["doc_max_len"]
        if self.doc_max_len:
            encoder.cfg["doc_max_len"] = int(self.doc_max_len)
        cos_unnorm = encoder.cfg["similarity"] == "cos" and not encoder.cfg["normalize"]
        t0 = time.perf_counter()
        try:
            bf16, prec = choose(self.precision, encoder, self.doc_texts, "doc", device=device,
                                batch_size=self.encode_batch_size, who="mine")
            self.last_stats.update(precision_metrics(prec))
            enc = encode_corpus(
                encoder, self.doc_texts, self.doc_ids, work_dir, shard_size=self.shard_size, dtype="float16",
                batch_size=self.encode_batch_size, device=device, bf16=bf16, progress=self.progress,
                unit_norm=cos_unnorm,
            )
            qids = sorted(self.queries)
            q = encoder.encode([self.queries[x] for x in qids], "query", batch_size=self.encode_batch_size,
                               device=device, bf16=bf16, progress=self.progress and len(qids) > 1000)
        finally:
            encoder.cfg["doc_max_len"] = saved
            encoder.train(was_training)
        encode_s = time.perf_counter() - t0
        if cos_unnorm:
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        shards = [np.load(Path(work_dir) / "embeddings" / s, mmap_mode="r") for s in enc["shards"]]
        t1 = time.perf_counter()
        index, _ = build_index(shards, self.factory, use_gpu=device.type == "cuda", progress=False, seed=self.seed)
        D, I = search(index, q, self.depth, chunk=self.search_batch_size, progress=self.progress and len(qids) > 5000)
        del index, shards
        ranked = {
            qid: [(self.doc_ids[i], float(s)) for s, i in zip(D[r], I[r]) if i >= 0] for r, qid in enumerate(qids)
        }
        self.last_stats = {
            "encode_seconds": round(encode_s, 2),
            "search_seconds": round(time.perf_counter() - t1, 2),
            "docs": len(self.doc_ids),
            "train_queries": len(qids),
            "depth": int(self.depth),
        }
        return ranked

    def select(self, ranked):
        teacher = read_teacher_scores(self.teacher_scores) if self.teacher_scores else None
        negs, stats = select_negatives(
            ranked, self.positives, self.window, self.n_per_query, self.seed, teacher, self.fn_margin
        )
        self.last_stats.update(stats)
        return negs

    def __call__(self, encoder, work_dir: Path):
        ranked = self.search(encoder, Path(work_dir))
        negs = self.select(ranked)
        win = window_sets(ranked, self.positives, self.window)
        if self.prev_window is not None:
            self.last_stats["window_overlap_with_previous"] = round(overlap(
                {q: list(v) for q, v in self.prev_window.items()}, {q: list(v) for q, v in win.items()}), 4)
        self.prev_window = win
        return ranked, negs, dict(self.last_stats)


def miner_from_config(ds, split: str, encoder, p: dict, seed: int, runtime: dict, doc_max_len=None,
                      precision: str = "fp32") -> DenseMiner:
    """A :class:`DenseMiner` over ``ds``'s corpus and ``split``'s train queries, from ``pipeline.mine``."""
    from retrievers.encoder import resolve_device

    positives = ds.positives(split)
    doc_ids = list(ds.corpus)
    texts = encoder.doc_texts([ds.corpus[d] for d in doc_ids])
    return DenseMiner(
        doc_ids=doc_ids,
        doc_texts=texts,
        queries={q: ds.queries[q] for q in positives},
        positives=positives,
        depth=int(p["depth"]),
        window=tuple(p["window"]),
        n_per_query=None if p["n_per_query"] is None else int(p["n_per_query"]),
        seed=int(seed),
        factory=str(p["factory"]),
        search_batch_size=int(p["search_batch_size"]),
        encode_batch_size=int(runtime["encode_batch_size"]),
        doc_max_len=doc_max_len if doc_max_len is not None else p["doc_max_len"],
        device=str(resolve_device(str(runtime["device"]))),
        precision=str(precision),
        progress=bool(runtime.get("progress", True)),
        teacher_scores=p["teacher_scores"],
        fn_margin=float(p["fn_margin"]),
    )


def run_window_pool(run_file: Path, positives: dict[str, list[str]], window: Sequence[int], who: str) -> dict[str, list[str]]:
    """Hard-negative pool from a TREC run (the bm25 stage's train run): ranks ``window``, positives removed."""
    from retrievers.contrastive import window_negatives
    from retrievers.evaluation import read_trec

    if not Path(run_file).exists():
        raise ConfigError(f"{run_file} is missing: the bm25 stage did not search these train queries")
    pool = window_negatives(read_trec(run_file), positives, tuple(window))
    sizes = [len(pool.get(q, ())) for q in positives]
    log.info(
        "[%s] negatives from ranks %s of %s: mean pool %.1f per query",
        who, list(window), Path(run_file).name, sum(sizes) / max(1, len(sizes)),
    )
    return pool
