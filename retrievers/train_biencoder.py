"""The bi-encoder training recipe shared by the retriever1, retriever2 and distill stages.

Builds the encoder, loads the train split, sets the training lengths, optionally holds out dev
queries, runs :class:`retrievers.training.Trainer` and saves a Hugging Face checkpoint with its
log, loss plot and statistics. Where the negatives come from and which loss is used are the
caller's (``negatives`` and ``loss_fn``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from retrievers.data import DataError, load_dataset, train_split_of
from retrievers.distributed import dist_info, init_distributed
from retrievers.encoder import instantiate_encoder, resolve_device
from retrievers.train_utils import brute_force_eval, plot_loss
from retrievers.training import LOG_FILE, TrainArgs, Trainer

log = logging.getLogger("drlab")


def _holdout(positives: dict[str, list[str]], n: int, seed: int) -> tuple[dict, list[str]]:
    """Split ``n`` queries off the training positives for dev evaluation."""
    import numpy as np

    qids = sorted(positives)
    rng = np.random.default_rng([int(seed), 7])
    dev = sorted(rng.choice(len(qids), size=min(n, len(qids) // 5), replace=False).tolist())
    dev_q = [qids[i] for i in dev]
    return {q: d for q, d in positives.items() if q not in set(dev_q)}, dev_q


def train_biencoder(name: str, encoder_cfg, init: Path | None, data: dict, p: dict, seed: int, runtime: dict,
                    out: Path, work: Path, negatives, loss_fn=None) -> dict[str, float]:
    """Train a bi-encoder (``encoder_cfg`` builder, from checkpoint ``init`` if given) and save it to ``out``.

    The shared body of the retriever1, retriever2 and distill stages. ``p``: the stage's trainer
    section (``conf/pipeline/trainer.yaml`` + the stage's own keys); ``runtime``: device,
    threads, encode batch size, progress. ``negatives(split, positives, doc_text, encoder, ds,
    index_doc_len) -> (ContrastiveData, refresher or None, stats)`` decides where hard negatives
    come from (``index_doc_len``: the encoder's indexing length; its ``cfg`` holds the training
    length meanwhile). ``loss_fn(scores, batch)``: None for InfoNCE, else a distillation loss.
    Writes ``checkpoint/``, ``train_log.jsonl``, ``loss.png``, ``train_stats.json``.
    """
    torch.set_num_threads(int(runtime["threads"]))
    device = resolve_device(str(runtime["device"]))
    init_distributed(device)
    rank, world = dist_info()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)

    split = train_split_of(data, name)
    dev_split = data.get("dev_split") if int(p["eval_every"] or 0) > 0 else None
    ds = load_dataset(data, [split] + ([dev_split] if dev_split and dev_split != split else []))
    positives = ds.positives(split)
    if not positives:
        raise DataError(f"data '{data['name']}': qrels/{split} has no positive judgment (relevance > 0)")

    encoder = instantiate_encoder(encoder_cfg, checkpoint=init)
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
    if int(p["eval_every"] or 0) > 0:
        if dev_split:
            dev_qrels = ds.qrels[dev_split]
        else:
            positives, dev_q = _holdout(positives, int(p["dev_queries"]), int(seed))
            dev_qrels = {q: ds.qrels[split][q] for q in dev_q}
            log.info("[%s] no data.dev_split: %d train queries held out for dev evaluation", name, len(dev_q))
        dev_queries = {q: ds.queries[q] for q in dev_qrels if q in ds.queries}
        n_eval_q = len(dev_queries)

    if n_eval_q == 0 and int(p["eval_every"] or 0) > 0:
        log.warning("[%s] eval_every=%s but no dev queries (too few train queries to hold out "
                    "and no data.dev_split): dev evaluation is off", name, p.get("eval_every"))
    elif n_eval_q:

        def evaluator(enc):
            return brute_force_eval(
                enc, doc_ids, texts, dev_queries, dev_qrels, device=device,
                batch_size=int(runtime["encode_batch_size"]), metrics=("ndcg@10", "recall@100"),
            )

    train_data, refresher, neg_stats = negatives(split, positives, doc_text, encoder, ds, saved_doc_len)
    progress = bool(runtime.get("progress", True))  # runtime.progress=false: no bar (not hashed)
    prec: dict = {}
    if p["precision"] == "auto":  # bf16 autocast if the hardware is fast at it and the forward agrees with fp32
        from retrievers.precision import choose

        encoder.to(device)
        sample = [doc_text[ids[0]] for _, ids in sorted(positives.items())[:64]]
        bf16, prec = choose("auto", encoder, sample, "doc", device=device,
                            batch_size=int(runtime["encode_batch_size"]), who=name)
        p = {**p, "precision": "bf16" if bf16 else "fp32"}
    args = TrainArgs.from_dict({**p, "seed": int(seed), "progress": progress})
    trainer = Trainer(encoder, train_data, args, work, device=device, evaluator=evaluator, name=name,
                      refresher=refresher, loss_fn=loss_fn)
    result = trainer.train()

    metrics: dict[str, float] = {
        "steps": float(result.step),
        "examples": float(len(train_data)),
        "train_seconds": round(result.seconds, 2),
        "train_seconds_total": round(result.seconds_total, 2),
    }
    pad = trainer.padding
    if pad["tokens"]:  # what the forwards computed against real tokens (length_sort: sorted chunks)
        metrics["padded_per_token"] = round(pad["padded"] / pad["tokens"], 4)
        metrics["padded_per_token_unsorted"] = round(pad["padded_unsorted"] / pad["tokens"], 4)
    if prec:
        from retrievers.precision import precision_metrics

        metrics.update(precision_metrics(prec))
    losses = [r for r in result.log if "loss" in r]
    if losses:
        metrics["final_loss"] = losses[-1]["loss"]
    evals = [r for r in result.log if "eval" in r]
    if evals:
        metrics.update({f"dev/{k}": v for k, v in evals[-1]["eval"].items()})
    if rank == 0:
        encoder.cfg["doc_max_len"], encoder.cfg["query_max_len"] = saved_doc_len, saved_query_len
        encoder.to("cpu")
        encoder.save(out / "checkpoint")
        shutil.copyfile(work / LOG_FILE, out / LOG_FILE)
        plot_loss(result.log, out / "loss.png", title=f"{name} on {data['name']}")
        stats = {
            **train_data.stats,
            **neg_stats,
            "dev_queries": n_eval_q,
            "world_size": world,
            "device": str(device),
            "resumed_from_step": result.resumed_from,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (out / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return metrics
