"""Stage ``retriever1``: contrastive bi-encoder training with in-batch and BM25 hard negatives.

The DPR recipe (Karpukhin et al. 2020, "Dense Passage Retrieval for Open-Domain
Question Answering"): one example per (train query, judged positive), InfoNCE
(van den Oord et al. 2018) over every passage of the batch, plus ``n_negatives``
BM25 hard negatives per example taken from the upstream ``bm25`` stage's train
run (``runs/<train_split>.trec``), sampled each epoch from the rank window
``neg_window: [lo, hi]`` after removing all positives of the query. Optional
GradCache (Gao et al. 2021) for large batches under a memory limit, gradient
checkpointing, bf16/fp16 autocast, gradient accumulation and torch.distributed
(in-batch negatives gathered across ranks). The trainer lives in
``retrievers/training.py``; see its docstring for what differs from the papers.

Reads ``data`` (train split, optional dev split), ``model`` (the encoder to build;
an upstream ``pretrain`` checkpoint is used when the chain has one), ``seed`` and
``pipeline.retriever1``. Writes ``checkpoint/`` (:meth:`BiEncoder.save`: Hugging
Face directories, ``drlab_encoder.json`` and sentence-transformers files),
``train_log.jsonl`` (step, loss, lr, grad norm, examples/s; dev metrics when
``eval_every`` > 0), ``loss.png`` and ``train_stats.json``. A killed run resumes
from the last ``trainer_state.pt`` in its work dir (every ``save_every`` steps).

Distributed: ``torchrun --nproc_per_node N run.py ...`` runs the stage on every rank
(``distributed=True``; the runner joins the process group, nccl on GPU, else gloo);
every rank trains on its slice of each global batch, in-batch negatives are gathered
across ranks, and only rank 0 writes checkpoints and artifacts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import torch
from omegaconf import OmegaConf

from pipelines.data import DataError, load_dataset
from pipelines.evaluation import read_trec
from pipelines.executor import ConfigError, Context, Stage
from retrievers.encoder import instantiate_encoder, latest_checkpoint, resolve_device
from retrievers.training import (
    LOG_FILE,
    ContrastiveData,
    TrainArgs,
    Trainer,
    brute_force_eval,
    dist_info,
    init_distributed,
    plot_loss,
    window_negatives,
)

log = logging.getLogger("drlab")


def train_split_of(data: dict) -> str:
    split = data.get("train_split")
    if not split:
        raise ConfigError(
            f"stage retriever1 trains on data.train_split, but data '{data.get('name')}' has train_split=null. "
            f"Fix: use a dataset with training judgments (e.g. data=scifact, data=nfcorpus), set "
            f"data.train_split=<split> if qrels/<split>.tsv exists, or pick a family without training "
            f"(model=pretrained, model=bm25)."
        )
    return split


def train_positives(ds, split: str) -> dict[str, list[str]]:
    """Judged positives (relevance > 0) of each ``split`` query that has some and is in the queries file."""
    out = {q: [d for d, r in docs.items() if r > 0] for q, docs in ds.qrels[split].items()}
    return {q: v for q, v in out.items() if v and q in ds.queries}


def _holdout(positives: dict[str, list[str]], n: int, seed: int) -> tuple[dict, list[str]]:
    """Split ``n`` queries off the training positives for dev evaluation."""
    import numpy as np

    qids = sorted(positives)
    rng = np.random.default_rng([int(seed), 7])
    dev = sorted(rng.choice(len(qids), size=min(n, len(qids) // 5), replace=False).tolist())
    dev_q = [qids[i] for i in dev]
    return {q: d for q, d in positives.items() if q not in set(dev_q)}, dev_q


def bm25_pool(ctx: Context, split: str, positives: dict, window, who: str) -> dict[str, list[str]]:
    """BM25 hard-negative pool of the train queries: ranks ``window`` of the upstream bm25 train run."""
    run_file = ctx.upstream["bm25"] / "runs" / f"{split}.trec"
    if not run_file.exists():
        raise ConfigError(f"{run_file} is missing: the bm25 stage did not search the '{split}' queries")
    pool = window_negatives(read_trec(run_file), positives, tuple(window or (1, 100)))
    sizes = [len(pool.get(q, ())) for q in positives]
    log.info(
        "[%s] BM25 negatives from ranks %s of %s: mean pool %.1f per query",
        who, list(window or (1, 100)), run_file.name, sum(sizes) / max(1, len(sizes)),
    )
    return pool


def run(ctx: Context) -> dict[str, float]:
    p = OmegaConf.to_container(ctx.cfg.pipeline.retriever1, resolve=True)

    def negatives(split, positives, doc_text, encoder, ds, index_doc_len):
        n_neg = int(p.get("n_negatives") or 0)
        if n_neg <= 0:
            return ContrastiveData({q: ds.queries[q] for q in positives}, positives, doc_text), None, {}
        if "bm25" not in ctx.upstream:
            raise ConfigError(
                f"pipeline.retriever1.n_negatives={n_neg} takes BM25 hard negatives, but model "
                f"'{ctx.cfg.model.name}' has no bm25 stage before retriever1 in its chain. "
                f"Fix: add bm25 to model.chain or set pipeline.retriever1.n_negatives=0 (in-batch negatives only)."
            )
        pool = bm25_pool(ctx, split, positives, p.get("neg_window"), "retriever1")
        data = ContrastiveData({q: ds.queries[q] for q in positives}, positives, doc_text, pool, n_neg)
        return data, None, {"n_negatives": n_neg, "neg_window": p.get("neg_window")}

    return train_stage(ctx, "retriever1", p, negatives)


def train_stage(ctx: Context, name: str, p: dict, negatives, loss_fn=None) -> dict[str, float]:
    """Shared body of the bi-encoder training stages (retriever1, retriever2).

    ``negatives(split, positives, doc_text, encoder, ds, index_doc_len) -> (ContrastiveData,
    refresher or None, stats)`` decides where hard negatives come from (``index_doc_len``:
    the encoder's indexing length; its ``cfg`` holds the training length meanwhile).
    ``loss_fn(scores, batch)``: None for InfoNCE, else e.g. a distillation loss.
    """
    data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    torch.set_num_threads(int(ctx.runtime.threads))
    device = resolve_device(str(ctx.runtime.device))
    init_distributed(device)
    rank, world = dist_info()
    if device.type == "cuda" and world > 1:
        import os

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)

    split = train_split_of(data)
    dev_split = data.get("dev_split") if int(p.get("eval_every") or 0) > 0 else None
    ds = load_dataset(data, [split] + ([dev_split] if dev_split and dev_split != split else []))
    positives = train_positives(ds, split)
    if not positives:
        raise DataError(f"data '{data['name']}': qrels/{split} has no positive judgment (relevance > 0)")

    init = latest_checkpoint(ctx.upstream)
    encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=init)
    if init:
        log.info("[%s] starting from upstream checkpoint %s", name, init)
    saved_doc_len = encoder.cfg["doc_max_len"]
    if p.get("train_doc_max_len"):
        encoder.cfg["doc_max_len"] = int(p["train_doc_max_len"])
    saved_query_len = encoder.cfg["query_max_len"]
    if p.get("train_query_max_len"):
        encoder.cfg["query_max_len"] = int(p["train_query_max_len"])

    doc_ids = list(ds.corpus)
    texts = encoder.doc_texts([ds.corpus[d] for d in doc_ids])
    doc_text = dict(zip(doc_ids, texts))

    # dev evaluation: the dataset's dev split, else a held-out slice of the train queries
    evaluator = None
    n_eval_q = 0
    if int(p.get("eval_every") or 0) > 0:
        if dev_split:
            dev_qrels = ds.qrels[dev_split]
        else:
            positives, dev_q = _holdout(positives, int(p.get("dev_queries", 50)), int(ctx.cfg.seed))
            dev_qrels = {q: ds.qrels[split][q] for q in dev_q}
            log.info("[%s] no data.dev_split: %d train queries held out for dev evaluation", name, len(dev_q))
        dev_queries = {q: ds.queries[q] for q in dev_qrels if q in ds.queries}
        n_eval_q = len(dev_queries)

    if n_eval_q == 0 and int(p.get("eval_every") or 0) > 0:
        log.warning("[%s] eval_every=%s but no dev queries (too few train queries to hold out "
                    "and no data.dev_split): dev evaluation is off", name, p.get("eval_every"))
    elif n_eval_q:

        def evaluator(enc):
            return brute_force_eval(
                enc, doc_ids, texts, dev_queries, dev_qrels, device=device,
                batch_size=int(ctx.runtime.encode_batch_size), metrics=("ndcg@10", "recall@100"),
            )

    train_data, refresher, neg_stats = negatives(split, positives, doc_text, encoder, ds, saved_doc_len)
    progress = bool(ctx.runtime.get("progress", True))  # +runtime.progress=false: no bar (not hashed)
    args = TrainArgs.from_dict({**p, "seed": int(ctx.cfg.seed), "progress": progress})
    trainer = Trainer(encoder, train_data, args, ctx.work, device=device, evaluator=evaluator, name=name,
                      refresher=refresher, loss_fn=loss_fn)
    result = trainer.train()

    metrics: dict[str, float] = {
        "steps": float(result.step),
        "examples": float(len(train_data)),
        "train_seconds": round(result.seconds, 2),
        "train_seconds_total": round(result.seconds_total, 2),
    }
    losses = [r for r in result.log if "loss" in r]
    if losses:
        metrics["final_loss"] = losses[-1]["loss"]
    evals = [r for r in result.log if "eval" in r]
    if evals:
        metrics.update({f"dev/{k}": v for k, v in evals[-1]["eval"].items()})
    if rank == 0:
        encoder.cfg["doc_max_len"], encoder.cfg["query_max_len"] = saved_doc_len, saved_query_len
        encoder.to("cpu")
        encoder.save(ctx.out / "checkpoint")
        shutil.copyfile(ctx.work / LOG_FILE, ctx.out / LOG_FILE)
        plot_loss(result.log, ctx.out / "loss.png", title=f"{name} on {data['name']}")
        stats = {
            **train_data.stats,
            **neg_stats,
            "dev_queries": n_eval_q,
            "world_size": world,
            "device": str(device),
            "resumed_from_step": result.resumed_from,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (ctx.out / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return metrics


STAGE = Stage(
    name="retriever1", version="1", reads=("data", "model", "pipeline.retriever1", "seed"), run=run, distributed=True
)
