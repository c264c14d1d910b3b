"""Stage ``mine``: hard negatives for the train queries from an upstream retriever.

ANCE (Xiong et al., ICLR 2021) and RocketQA / Tevatron / SimLM's ``Retriever2`` train a second
retriever on negatives retrieved by the first. With ``source: dense`` the corpus is encoded by
the newest upstream checkpoint (``retriever1``, ``pretrain``; ``model.encoder`` as configured
when the chain has none) and searched (:class:`retrievers.mining.DenseMiner`); with ``source:
bm25`` the bm25 stage's train run is used. ``auto``: dense with an upstream checkpoint, else bm25.
:func:`retrievers.mining.select_negatives` keeps ranks ``window`` (positives removed) and samples
``n_per_query``; with ``teacher_scores`` likely false negatives are dropped.

Reads ``data``, ``pipeline.mine``, ``seed`` and, for a dense source, ``model.encoder``. Uses the
newest checkpoint (dense) or ``bm25``. Writes ``negatives.jsonl`` (``qid``, ``pos``, ``neg``
[{id, rank, score}] in rank order), ``runs/<train_split>.trec`` and ``mine_stats.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

from pipelines.executor import Context, Stage, newest_checkpoint
from retrievers.errors import ConfigError

log = logging.getLogger("drlab")


def source_of(cfg, before: list[str]) -> str:
    source = str(cfg.pipeline.mine.source)
    if source not in ("auto", "dense", "bm25"):
        raise ConfigError(f"pipeline.mine.source='{source}'; valid choices: auto, dense, bm25")
    if source == "auto":  # a trained upstream retriever, else the bm25 run, else the family's encoder as configured
        source = "bm25" if not newest_checkpoint(before) and "bm25" in before else "dense"
    if source == "bm25" and "bm25" not in before:
        raise ConfigError("pipeline.mine.source=bm25 needs a bm25 stage before mine in model.chain")
    return source


def uses(cfg, before: list[str]) -> tuple[str, ...]:
    return ("bm25",) if source_of(cfg, before) == "bm25" else newest_checkpoint(before)


def reads(cfg, before: list[str]) -> tuple[str, ...]:
    base = ("data", "pipeline.mine", "seed")
    return base if source_of(cfg, before) == "bm25" else base + ("model.encoder", "precision")


def run(ctx: Context) -> dict[str, float]:
    import torch

    from retrievers.data import load_dataset, train_split_of
    from retrievers.encoder import instantiate_encoder
    from retrievers.evaluation import read_trec, trec_order
    from retrievers.mining import (
        NEGATIVES_FILE,
        miner_from_config,
        peak_rss_mb,
        read_teacher_scores,
        select_negatives,
        write_negatives,
        write_trec,
    )

    p = ctx.get("pipeline.mine")
    data = ctx.get("data")
    torch.set_num_threads(int(ctx.runtime.threads))
    split = train_split_of(data, "mine")
    ds = load_dataset(data, [split])
    ckpt = ctx.checkpoint()
    source = "bm25" if "bm25" in ctx.upstream else "dense"

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    if source == "bm25":
        run_file = ctx.upstream["bm25"] / "runs" / f"{split}.trec"
        if not run_file.exists():
            raise ConfigError(f"{run_file} is missing: the bm25 stage did not search the '{split}' queries")
        positives = ds.positives(split)
        ranked = {q: trec_order(docs)[: int(p["depth"])] for q, docs in read_trec(run_file).items() if q in positives}
        negs, stats = select_negatives(
            ranked, positives, p["window"], None if p["n_per_query"] is None else int(p["n_per_query"]),
            int(ctx.cfg.seed), read_teacher_scores(p["teacher_scores"]) if p["teacher_scores"] else None,
            float(p["fn_margin"]),
        )
        stats["source"] = f"bm25 ({run_file.parent.parent.name})"
    else:
        encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=ckpt)
        rss0 = peak_rss_mb()  # the model's own memory is not the miner's
        miner = miner_from_config(ds, split, encoder, p, int(ctx.cfg.seed), ctx.get("runtime"),
                                  precision=str(ctx.get("precision")))
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
        window=list(p["window"]),
        n_per_query=p["n_per_query"],
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


STAGE = Stage(name="mine", version="1", reads=reads, run=run, uses=uses)
