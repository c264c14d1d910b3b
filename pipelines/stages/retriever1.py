"""Stage ``retriever1``: contrastive bi-encoder training with in-batch and BM25 hard negatives.

The DPR recipe (Karpukhin et al. 2020, "Dense Passage Retrieval for Open-Domain Question
Answering"): one example per (train query, judged positive), InfoNCE over every passage of the
batch, plus ``n_negatives`` BM25 hard negatives per example sampled each epoch from ranks
``neg_window`` of the bm25 stage's train run, positives removed. The trainer (GradCache,
gradient checkpointing, bf16/fp16, accumulation, torchrun with gathered negatives) is
:mod:`retrievers.training`; its docstring says what differs from the papers.

Reads ``data``, ``model.encoder``, ``pipeline.retriever1``, ``seed``. Uses ``bm25`` (only with
``n_negatives > 0``) and the newest upstream encoder checkpoint (``pretrain``), if any. Writes
``checkpoint/`` (Hugging Face + sentence-transformers files), ``train_log.jsonl``, ``loss.png``,
``train_stats.json``. A killed run resumes from the work dir's last ``trainer_state.pt``.
"""

from __future__ import annotations

from pipelines.executor import Context, Stage, newest_checkpoint
from retrievers.errors import ConfigError


def uses(cfg, before: list[str]) -> tuple[str, ...]:
    bm25 = ("bm25",) if int(cfg.pipeline.retriever1.n_negatives or 0) > 0 else ()
    if bm25 and "bm25" not in before:
        raise ConfigError(
            f"pipeline.retriever1.n_negatives={cfg.pipeline.retriever1.n_negatives} takes BM25 hard negatives, but "
            f"model.chain has no bm25 stage before retriever1. Fix: add bm25 to model.chain or set "
            f"pipeline.retriever1.n_negatives=0 (in-batch negatives only)."
        )
    return bm25 + newest_checkpoint(before)


def run(ctx: Context) -> dict[str, float]:
    from retrievers.contrastive import ContrastiveData
    from retrievers.mining import run_window_pool
    from retrievers.train_biencoder import train_biencoder

    p = ctx.get("pipeline.retriever1")

    def negatives(split, positives, doc_text, encoder, ds, index_doc_len):
        queries = {q: ds.queries[q] for q in positives}
        n_neg = int(p["n_negatives"] or 0)
        if n_neg <= 0:
            return ContrastiveData(queries, positives, doc_text), None, {}
        run_file = ctx.upstream["bm25"] / "runs" / f"{split}.trec"
        pool = run_window_pool(run_file, positives, p["neg_window"], "retriever1")
        data = ContrastiveData(queries, positives, doc_text, pool, n_neg)
        return data, None, {"n_negatives": n_neg, "neg_window": p["neg_window"]}

    return train_biencoder("retriever1", ctx.cfg.model.encoder, ctx.checkpoint(), ctx.get("data"), p,
                           int(ctx.cfg.seed), ctx.get("runtime"), ctx.out, ctx.work, negatives)


STAGE = Stage(
    name="retriever1", version="1", reads=("data", "model.encoder", "pipeline.retriever1", "seed"), run=run,
    uses=uses, distributed=True,
)
