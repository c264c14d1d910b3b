"""Stage ``rerank``: train a teacher reranker on hard negatives; score the train candidates.

The teacher is ``model.teacher`` (``conf/teacher/``: a cross-encoder, SimLM's re-ranker, or
ColBERT, TCT-ColBERT's teacher), trained by :func:`retrievers.reranking.train_reranker` (grouped
softmax cross-entropy). The candidate pool is the mine stage's ``negatives.jsonl`` when the
chain has one, else ranks ``neg_window`` of the bm25 train run. With ``remine`` (``auto``: when a
``retriever2`` is in the chain, as in SimLM, whose re-ranker learns from Retriever2's negatives)
the train queries are mined again with the newest checkpoint and ``pipeline.mine``'s settings.

Then every train query's positives and first ``score_depth`` pool candidates (a seeded sample of
``score_queries`` queries, or all) are scored into ``teacher_scores.jsonl`` (``{"qid", "scores":
{docid: score}}``: what ``distill`` learns from), and :func:`retrievers.reranking.teacher_quality`
goes into the metrics (``train_auc``, ``train_top1_is_positive`` next to its chance rate).

Reads ``data``, ``model.teacher``, ``pipeline.rerank``, ``seed`` (+ ``model.encoder`` and
``pipeline.mine`` when re-mining). Writes ``checkpoint/``, ``teacher_scores.jsonl``,
``train_log.jsonl``, ``loss.png``. The eval stage reranks with this checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time

from pipelines.executor import Context, Stage, newest_checkpoint
from retrievers.errors import ConfigError

log = logging.getLogger("drlab")


def remines(cfg, before: list[str]) -> bool:
    remine = cfg.pipeline.rerank.remine
    return "retriever2" in before if remine == "auto" else bool(remine)


def uses(cfg, before: list[str]) -> tuple[str, ...]:
    if remines(cfg, before):
        return newest_checkpoint(before)
    if "mine" in before:
        return ("mine",)
    if "bm25" in before:
        return ("bm25",)
    raise ConfigError("stage rerank trains on hard negatives from a mine or bm25 stage, but model.chain has neither "
                      "before rerank. Fix: add bm25 (or mine) to model.chain.")


def reads(cfg, before: list[str]) -> tuple[str, ...]:
    base = ("data", "model.teacher", "pipeline.rerank", "seed")
    return base + (("model.encoder", "pipeline.mine") if remines(cfg, before) else ())


def candidate_pool(ctx: Context, ds, split: str, positives: dict[str, list[str]], p: dict) -> tuple[dict, str]:
    from retrievers.encoder import instantiate_encoder
    from retrievers.mining import NEGATIVES_FILE, miner_from_config, read_negatives, run_window_pool

    if "mine" in ctx.upstream:
        return read_negatives(ctx.upstream["mine"] / NEGATIVES_FILE), "the mine stage"
    if "bm25" in ctx.upstream:
        return run_window_pool(ctx.upstream["bm25"] / "runs" / f"{split}.trec", positives, p["neg_window"],
                               "rerank"), "bm25 train run"
    # SimLM: the re-ranker trains on the negatives of the newest retriever (Retriever2), mined here
    # with the mine stage's settings and code
    ckpt = ctx.checkpoint()
    encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=ckpt)
    miner = miner_from_config(ds, split, encoder, ctx.get("pipeline.mine"), int(ctx.cfg.seed), ctx.get("runtime"))
    log.info("[rerank] mining the train queries with %s for the teacher's negatives", ckpt)
    _, negs, _ = miner(encoder, ctx.work / "remine")
    return {q: [c["id"] for c in v] for q, v in negs.items()}, f"re-mined with {ckpt}"


def run(ctx: Context) -> dict[str, float]:
    import torch

    from retrievers.data import load_dataset, train_split_of
    from retrievers.encoder import resolve_device
    from retrievers.reranking import (
        load_teacher,
        score_pairs_batched,
        score_query_sample,
        teacher_quality,
        train_reranker,
    )
    from retrievers.train_utils import plot_loss

    p = ctx.get("pipeline.rerank")
    data = ctx.get("data")
    torch.set_num_threads(int(ctx.runtime.threads))
    device = resolve_device(str(ctx.runtime.device))
    split = train_split_of(data, "rerank")
    ds = load_dataset(data, [split])
    positives = ds.positives(split)
    doc_text = {d: ds.doc_text(d) for d in ds.corpus}
    pool, source = candidate_pool(ctx, ds, split, positives, p)
    model = load_teacher(ctx.cfg.model.teacher).to(device)
    examples = [(q, d) for q, ds_ in positives.items() for d in ds_ if d in doc_text]
    torch.manual_seed(int(ctx.cfg.seed))
    progress = bool(ctx.runtime.get("progress", True))
    t0 = time.perf_counter()
    history: list[dict] = []
    if p["train"]:
        log.info("[rerank] training %s on %d groups (1 positive + %d negatives from %s)",
                 type(model).__name__, len(examples), int(p["n_negatives"]), source)
        history = train_reranker(
            model, examples, pool, ds.queries, doc_text, batch_size=p["batch_size"], n_negatives=p["n_negatives"],
            epochs=p["epochs"], max_steps=p["max_steps"], lr=p["lr"], weight_decay=p["weight_decay"],
            warmup_ratio=p["warmup_ratio"], max_grad_norm=p["max_grad_norm"], log_every=p["log_every"],
            save_every=p["save_every"], seed=int(ctx.cfg.seed), work=ctx.work, progress=progress,
        )
    train_s = time.perf_counter() - t0
    model.to("cpu").save(ctx.out / "checkpoint")
    model.to(device)
    (ctx.out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if history:
        plot_loss(history, ctx.out / "loss.png", title=f"rerank ({type(model).__name__}) on {data['name']}")

    scored = score_query_sample(sorted(positives), p["score_queries"], int(ctx.cfg.seed))
    if len(scored) < len(positives):
        log.info("[rerank] scoring %d of %d train queries (pipeline.rerank.score_queries)", len(scored), len(positives))
    pairs, keys = [], []
    for q in scored:
        for d in list(dict.fromkeys(positives[q] + list(pool.get(q, ()))[: int(p["score_depth"])])):
            if d in doc_text:
                pairs.append((ds.queries[q], doc_text[d]))
                keys.append((q, d))
    t1 = time.perf_counter()
    scores = score_pairs_batched(model, pairs, int(p["score_batch_size"]), progress=progress)
    by_q: dict[str, dict[str, float]] = {}
    for (q, d), s in zip(keys, scores):
        by_q.setdefault(q, {})[d] = round(float(s), 5)
    tmp = ctx.out / "teacher_scores.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for q in sorted(by_q):
            fh.write(json.dumps({"qid": q, "scores": by_q[q]}) + "\n")
    os.replace(tmp, ctx.out / "teacher_scores.jsonl")
    quality = teacher_quality(by_q, {q: set(v) for q, v in positives.items()})
    metrics = {"train_seconds": round(train_s, 2), "score_seconds": round(time.perf_counter() - t1, 2),
               "pairs_scored": float(len(pairs)), **{f"train_{k}": v for k, v in quality.items()}}
    if history:
        metrics["final_loss"] = history[-1]["loss"]
        metrics["steps"] = float(history[-1]["step"])
    return metrics


STAGE = Stage(name="rerank", version="1", reads=reads, run=run, uses=uses)
