"""Stage ``retriever2``: the retriever1 trainer on negatives mined by an upstream retriever.

RocketQA / Tevatron / SimLM call it the second retriever; ANCE (Xiong et al., ICLR 2021)
adds the periodic refresh. Initialised from the newest upstream checkpoint (retriever1),
it trains exactly like ``retriever1`` (``retrievers/training.py``: InfoNCE over in-batch
+ hard negatives, GradCache, resume, torchrun), but each example's ``n_negatives`` hard
negatives are sampled per epoch from the upstream ``mine`` stage's ``negatives.jsonl``,
plus ``bm25_negatives`` from the BM25 rank window ``bm25_window`` (Tevatron users found
mixing BM25 negatives back in stabilises training on mined ones).

With ``refresh_every: N > 0`` (the ANCE family) the negatives are re-mined every N
optimizer steps with the weights being trained (:class:`retrievers.ance.AnnRefresher`,
which calls the mine stage's :class:`pipelines.mine.DenseMiner` with ``pipeline.mine``'s
depth, window and sample size): ``refresh_mode: sync`` stops, encodes, mines and
resumes; ``async`` hands the weights to a worker process (``refresh_device``). Each
refresh is a line of ``refresh_log.jsonl`` (copied to the stage dir, also plotted into
``refresh.png``).

Reads ``data``, ``model``, ``pipeline.retriever2``, ``pipeline.mine`` (the refresh
mines like the mine stage) and ``seed``. Writes what retriever1 writes.
"""

from __future__ import annotations

import json
import logging
import shutil

from omegaconf import OmegaConf

from pipelines.executor import ConfigError, Context, Stage
from pipelines.mine import NEGATIVES_FILE, miner_from_config, read_negatives
from pipelines.retriever1 import bm25_pool, train_stage
from retrievers.training import ContrastiveData

log = logging.getLogger("drlab")


def run(ctx: Context) -> dict[str, float]:
    p = OmegaConf.to_container(ctx.cfg.pipeline.retriever2, resolve=True)
    pm = OmegaConf.to_container(ctx.cfg.pipeline.mine, resolve=True)
    if "mine" not in ctx.upstream:
        raise ConfigError(
            f"stage retriever2 trains on mined negatives, but model '{ctx.cfg.model.name}' has no enabled mine "
            f"stage before it. Fix: put mine before retriever2 in model.chain (and pipeline.mine.enabled=true)."
        )
    neg_file = ctx.upstream["mine"] / NEGATIVES_FILE
    if not neg_file.exists():
        raise ConfigError(f"{neg_file} is missing: re-run the mine stage (force=[mine])")

    def negatives(split, positives, doc_text, encoder, ds, index_doc_len):
        mined = read_negatives(neg_file)
        n_neg = int(p.get("n_negatives") or 0)
        n_bm25 = int(p.get("bm25_negatives") or 0)
        mix = None
        if n_bm25 > 0:
            if "bm25" not in ctx.upstream:
                raise ConfigError(
                    f"pipeline.retriever2.bm25_negatives={n_bm25} needs a bm25 stage in model.chain; "
                    f"add it or set pipeline.retriever2.bm25_negatives=0"
                )
            mix = bm25_pool(ctx, split, positives, p.get("bm25_window"), "retriever2")
        sizes = [len(mined.get(q, ())) for q in positives]
        log.info("[retriever2] mined negatives from %s: mean %.1f per query; %d per example (+%d BM25)",
                 neg_file, sum(sizes) / max(1, len(sizes)), n_neg, n_bm25)
        data = ContrastiveData({q: ds.queries[q] for q in positives}, positives, doc_text, mined, n_neg, mix, n_bm25)
        refresher = None
        every = int(p.get("refresh_every") or 0)
        if every > 0:
            from retrievers.ance import AnnRefresher

            miner = miner_from_config(ds, split, encoder, pm, int(ctx.cfg.seed), ctx.runtime,
                                      doc_max_len=pm.get("doc_max_len") or index_doc_len)
            # the mine stage's candidate windows: the first refresh reports how many of its candidates are new
            # (after a resume the comparison is with these again, not with the last refresh before the kill)
            run_file = ctx.upstream["mine"] / "runs" / f"{split}.trec"
            if run_file.exists():
                from pipelines.evaluation import read_trec, trec_order
                from pipelines.mine import window_sets

                ranked = {q: trec_order(d) for q, d in read_trec(run_file).items() if q in miner.positives}
                miner.prev_window = window_sets(ranked, miner.positives, miner.window)
            from retrievers.encoder import latest_checkpoint, resolve_device

            ckpt = latest_checkpoint(ctx.upstream)
            refresher = AnnRefresher(
                miner, every, ctx.work, initial_pool=mined, mode=str(p.get("refresh_mode", "sync")),
                encoder_spec=(OmegaConf.to_container(ctx.cfg.model.encoder, resolve=True),
                              str(ckpt) if ckpt else None),
                device=str(resolve_device(str(p.get("refresh_device") or ctx.runtime.device))),
                max_lag=p.get("refresh_max_lag"),
            )
        stats = {"n_negatives": n_neg, "bm25_negatives": n_bm25, "mined_from": str(neg_file),
                 "refresh_every": every, "refresh_mode": p.get("refresh_mode", "sync")}
        return data, refresher, stats

    metrics = train_stage(ctx, "retriever2", p, negatives)
    log_file = ctx.work / "refresh_log.jsonl"
    if log_file.exists():
        shutil.copyfile(log_file, ctx.out / "refresh_log.jsonl")
        recs = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
        metrics["refreshes"] = float(len(recs))
        if recs:
            metrics["refresh_seconds"] = round(sum(r["seconds"] for r in recs), 2)
            metrics["refresh_overlap_mean"] = round(sum(r["overlap_with_previous"] for r in recs) / len(recs), 4)
            plot_refresh(recs, ctx.out / "refresh.png")
    return metrics


def plot_refresh(recs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    steps = [r["step"] for r in recs]
    ax.plot(steps, [r["overlap_with_previous"] for r in recs], marker="o")
    ax.set_xlabel("optimizer step of the refresh")
    ax.set_ylabel("overlap with previous negatives")
    ax.set_ylim(0, 1)
    ax.set_title("ANCE refresh")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


STAGE = Stage(
    name="retriever2",
    version="1",
    reads=("data", "model", "pipeline.retriever2", "pipeline.mine", "seed"),
    run=run,
    distributed=True,
)
