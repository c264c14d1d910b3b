"""Stage ``retriever2``: the retriever1 trainer on negatives mined by an upstream retriever.

RocketQA / Tevatron / SimLM call it the second retriever; ANCE (Xiong et al., ICLR 2021) adds
the periodic refresh. Initialised from the newest upstream checkpoint (retriever1), it trains
like ``retriever1``, but each example's ``n_negatives`` hard negatives are sampled per epoch
from the mine stage's ``negatives.jsonl``, plus ``bm25_negatives`` from the BM25 ranks
``bm25_window`` (Tevatron users found mixing BM25 negatives back in stabilises training).

With ``refresh_every: N > 0`` (the ANCE family) the negatives are re-mined every N optimizer
steps with the weights being trained (:class:`retrievers.ance.AnnRefresher`, calling
:class:`retrievers.mining.DenseMiner` with ``pipeline.mine``'s depth, window and sample size):
``refresh_mode: sync`` stops, encodes, mines and resumes; ``async`` hands the weights to a
worker process. Each refresh is a line of ``refresh_log.jsonl`` (plotted into ``refresh.png``).

Reads ``data``, ``model.encoder``, ``pipeline.retriever2``, ``seed`` and, only when refreshing,
``pipeline.mine``. Uses ``mine``, the newest checkpoint and ``bm25`` (with ``bm25_negatives``).
"""

from __future__ import annotations

import json
import shutil

from pipelines.executor import Context, Stage, newest_checkpoint
from retrievers.errors import ConfigError


def reads(cfg, before: list[str]) -> tuple[str, ...]:
    base = ("data", "model.encoder", "pipeline.retriever2", "seed")
    return base + (("pipeline.mine", "precision") if int(cfg.pipeline.retriever2.refresh_every or 0) > 0 else ())


def uses(cfg, before: list[str]) -> tuple[str, ...]:
    if "mine" not in before:
        raise ConfigError(
            "stage retriever2 trains on mined negatives, but model.chain has no enabled mine stage before it. "
            "Fix: put mine before retriever2 in model.chain (and pipeline.mine.enabled=true)."
        )
    n_bm25 = int(cfg.pipeline.retriever2.bm25_negatives or 0)
    if n_bm25 > 0 and "bm25" not in before:
        raise ConfigError(f"pipeline.retriever2.bm25_negatives={n_bm25} needs a bm25 stage in model.chain; add it "
                          f"or set pipeline.retriever2.bm25_negatives=0")
    return ("mine",) + (("bm25",) if n_bm25 > 0 else ()) + newest_checkpoint(before)


def run(ctx: Context) -> dict[str, float]:
    from retrievers.contrastive import ContrastiveData
    from retrievers.mining import NEGATIVES_FILE, read_negatives, run_window_pool
    from retrievers.train_biencoder import train_biencoder

    p = ctx.get("pipeline.retriever2")
    neg_file = ctx.upstream["mine"] / NEGATIVES_FILE

    def negatives(split, positives, doc_text, encoder, ds, index_doc_len):
        mined = read_negatives(neg_file)
        n_neg, n_bm25 = int(p["n_negatives"] or 0), int(p["bm25_negatives"] or 0)
        mix = None
        if n_bm25 > 0:
            mix = run_window_pool(ctx.upstream["bm25"] / "runs" / f"{split}.trec", positives, p["bm25_window"],
                                  "retriever2")
        data = ContrastiveData({q: ds.queries[q] for q in positives}, positives, doc_text, mined, n_neg, mix, n_bm25)
        refresher = None
        every = int(p["refresh_every"] or 0)
        if every > 0:
            from retrievers.ance import refresher_for

            refresher = refresher_for(
                ds, split, encoder, ctx.get("pipeline.mine"), int(ctx.cfg.seed), ctx.get("runtime"), every=every,
                work=ctx.work, initial_pool=mined, mine_run=ctx.upstream["mine"] / "runs" / f"{split}.trec",
                encoder_cfg=ctx.get("model.encoder"), checkpoint=ctx.checkpoint(), mode=p["refresh_mode"],
                device=p["refresh_device"], max_lag=p["refresh_max_lag"], doc_max_len=index_doc_len,
                precision=str(ctx.get("precision")),
            )
        stats = {"n_negatives": n_neg, "bm25_negatives": n_bm25, "mined_from": neg_file.parent.name,
                 "refresh_every": every, "refresh_mode": p["refresh_mode"]}
        return data, refresher, stats

    metrics = train_biencoder("retriever2", ctx.cfg.model.encoder, ctx.checkpoint(), ctx.get("data"), p,
                              int(ctx.cfg.seed), ctx.get("runtime"), ctx.out, ctx.work, negatives)
    log_file = ctx.work / "refresh_log.jsonl"
    if log_file.exists():
        from retrievers.ance import plot_refresh

        shutil.copyfile(log_file, ctx.out / "refresh_log.jsonl")
        recs = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
        metrics["refreshes"] = float(len(recs))
        if recs:
            metrics["refresh_seconds"] = round(sum(r["seconds"] for r in recs), 2)
            metrics["refresh_overlap_mean"] = round(sum(r["overlap_with_previous"] for r in recs) / len(recs), 4)
            plot_refresh(recs, ctx.out / "refresh.png")
    return metrics


STAGE = Stage(name="retriever2", version="2", reads=reads, run=run, uses=uses, distributed=True)
