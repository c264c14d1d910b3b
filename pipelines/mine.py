"""Stage ``mine``: hard negatives for the train queries from an upstream retriever.

ANCE (Xiong et al., ICLR 2021, "Approximate Nearest Neighbor Negative Contrastive
Learning for Dense Text Retrieval") and RocketQA / Tevatron / SimLM's ``Retriever2``
all train a second retriever on negatives retrieved by the first one. This stage:

1. encodes the corpus with the newest upstream checkpoint (``retriever1``, ``pretrain``;
   the family's ``model.encoder`` when the chain has none) using the *index stage's*
   code (:func:`pipelines.index.encode_corpus`: resumable fp16 shards in the work dir,
   :func:`pipelines.index.build_index`, :func:`pipelines.index.search`) -- or, with
   ``source: bm25``, takes the upstream bm25 stage's train run;
2. searches the train queries to ``depth`` (``search_batch_size`` queries per FAISS call,
   so memory is bounded by ``search_batch_size x corpus`` scores, never a full
   query x corpus matrix);
3. keeps the non-positive candidates ranked inside ``window: [lo, hi]`` (1-based,
   inclusive; ranks counted *before* positives are removed) and samples ``n_per_query``
   of them with a seeded generator (``n_per_query: null`` keeps the whole window);
4. optionally drops likely false negatives: with ``teacher_scores`` (a JSONL file of
   ``{"qid": ..., "scores": {docid: score}}``, what the ``rerank`` stage writes), a
   candidate whose teacher score is >= the query's lowest-scored positive minus
   ``fn_margin`` is removed (RocketQA's denoising, with the positive as reference).

Writes ``negatives.jsonl`` (one line per train query: ``qid``, ``pos`` [ids], ``neg``
[{id, rank, score}] in rank order), ``runs/<train_split>.trec`` (the full train run,
what ``retriever2`` and the teachers read) and ``mine_stats.json`` (pool sizes,
filtered counts, timings, peak RSS).

:class:`DenseMiner` is the same search + selection, callable with any encoder: the
ANCE refresh (``retrievers/ance.py``) calls it with the weights being trained.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import OmegaConf

from pipelines.executor import ConfigError, Context, Stage

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
    bf16: bool = False
    progress: bool = True
    teacher_scores: str | None = None
    fn_margin: float = 0.0
    last_stats: dict[str, Any] = field(default_factory=dict)
    # the previous call's candidate windows: each call reports how much of its window is new
    prev_window: dict[str, set[str]] | None = None

    def search(self, encoder, work_dir: Path) -> dict[str, list[tuple[str, float]]]:
        import torch

        from pipelines.index import build_index, encode_corpus, search

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
            enc = encode_corpus(
                encoder, self.doc_texts, self.doc_ids, work_dir, shard_size=self.shard_size, dtype="float16",
                batch_size=self.encode_batch_size, device=device, bf16=self.bf16, progress=self.progress,
                unit_norm=cos_unnorm,
            )
            qids = sorted(self.queries)
            q = encoder.encode([self.queries[x] for x in qids], "query", batch_size=self.encode_batch_size,
                               device=device, bf16=self.bf16, progress=self.progress and len(qids) > 1000)
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


def miner_from_config(ds, split: str, encoder, p: dict, seed: int, runtime, doc_max_len=None) -> DenseMiner:
    """A :class:`DenseMiner` over ``ds``'s corpus and ``split``'s train queries, from ``pipeline.mine``."""
    from retrievers.encoder import resolve_device

    from pipelines.retriever1 import train_positives

    positives = train_positives(ds, split)
    doc_ids = list(ds.corpus)
    texts = encoder.doc_texts([ds.corpus[d] for d in doc_ids])
    return DenseMiner(
        doc_ids=doc_ids,
        doc_texts=texts,
        queries={q: ds.queries[q] for q in positives},
        positives=positives,
        depth=int(p.get("depth", 200)),
        window=tuple(p.get("window") or (3, 200)),
        n_per_query=None if p.get("n_per_query") is None else int(p["n_per_query"]),
        seed=int(seed),
        factory=str(p.get("factory", "Flat")),
        search_batch_size=int(p.get("search_batch_size", 256)),
        encode_batch_size=int(runtime.encode_batch_size),
        doc_max_len=doc_max_len if doc_max_len is not None else p.get("doc_max_len"),
        device=str(resolve_device(str(runtime.device))),
        bf16=bool(runtime.bf16),
        progress=bool(runtime.get("progress", True)),
        teacher_scores=p.get("teacher_scores"),
        fn_margin=float(p.get("fn_margin", 0.0)),
    )


# --------------------------------------------------------------------------- stage


def run(ctx: Context) -> dict[str, float]:
    import torch

    from pipelines.data import load_dataset
    from pipelines.evaluation import read_trec, trec_order
    from pipelines.retriever1 import train_positives, train_split_of
    from retrievers.encoder import instantiate_encoder, latest_checkpoint

    p = OmegaConf.to_container(ctx.cfg.pipeline.mine, resolve=True)
    data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    torch.set_num_threads(int(ctx.runtime.threads))
    split = train_split_of(data)
    ds = load_dataset(data, [split])
    ckpt = latest_checkpoint(ctx.upstream)
    source = str(p.get("source", "auto"))
    if source == "auto":
        # a trained upstream retriever, else the bm25 run, else the family's encoder as configured
        source = "bm25" if ckpt is None and "bm25" in ctx.upstream else "dense"
    if source not in ("dense", "bm25"):
        raise ConfigError(f"pipeline.mine.source='{source}'; valid choices: auto, dense, bm25")

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    if source == "bm25":
        if "bm25" not in ctx.upstream:
            raise ConfigError("pipeline.mine.source=bm25 needs a bm25 stage before mine in model.chain")
        run_file = ctx.upstream["bm25"] / "runs" / f"{split}.trec"
        if not run_file.exists():
            raise ConfigError(f"{run_file} is missing: the bm25 stage did not search the '{split}' queries")
        encoder = None
        miner = None
        positives = train_positives(ds, split)
        ranked = {q: trec_order(docs)[: int(p.get("depth", 200))] for q, docs in read_trec(run_file).items()
                  if q in positives}
        negs, stats = select_negatives(
            ranked, positives, p.get("window") or (3, 200),
            None if p.get("n_per_query") is None else int(p["n_per_query"]), int(ctx.cfg.seed),
            read_teacher_scores(p["teacher_scores"]) if p.get("teacher_scores") else None,
            float(p.get("fn_margin", 0.0)),
        )
        stats["source"] = f"bm25 ({run_file})"
    else:
        encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=ckpt)
        rss0 = peak_rss_mb()  # the model's own memory is not the miner's
        miner = miner_from_config(ds, split, encoder, p, int(ctx.cfg.seed), ctx.runtime)
        positives = miner.positives
        log.info(
            "[mine] %d train queries x %d docs, depth %d, window %s, %s per query, encoder %s",
            len(miner.queries), len(miner.doc_ids), miner.depth, list(miner.window), miner.n_per_query,
            ckpt or "model.encoder",
        )
        ranked, negs, stats = miner(encoder, ctx.work)
        stats["source"] = f"dense ({ckpt or 'model.encoder'})"
    del ds
    write_negatives(ctx.out / NEGATIVES_FILE, negs, positives)
    write_trec(ctx.out / "runs" / f"{split}.trec", ranked, f"drlab-mine-{source}")
    stats.update(
        seconds=round(time.perf_counter() - t0, 2),
        peak_rss_mb=round(peak_rss_mb(), 1),
        peak_rss_mb_before_search=round(rss0, 1),
        window=list(p.get("window") or (3, 200)),
        n_per_query=p.get("n_per_query"),
    )
    (ctx.out / "mine_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    shutil.rmtree(ctx.work / "embeddings", ignore_errors=True)
    log.info(
        "[mine] %.1f negatives/query (window mean %.1f), %d teacher-filtered, %.1fs, peak RSS %.0f MiB "
        "(%.0f MiB before the search)",
        stats["negatives_mean"], stats["window_candidates_mean"], stats["teacher_filtered"], stats["seconds"],
        stats["peak_rss_mb"], rss0,
    )
    return {
        "negatives_per_query": round(stats["negatives_mean"], 3),
        "queries": float(stats["queries"]),
        "teacher_filtered": float(stats["teacher_filtered"]),
        "seconds": stats["seconds"],
        "peak_rss_mb": stats["peak_rss_mb"],
    }


STAGE = Stage(name="mine", version="1", reads=("data", "model", "pipeline.mine", "seed"), run=run)
