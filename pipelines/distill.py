"""Stage ``distill``: a bi-encoder student learns from the ``rerank`` stage's teacher.

The student starts from the newest upstream checkpoint (``retriever2`` in SimLM's chain),
else from ``model.encoder`` (TCT-ColBERT's student), and trains with the retriever1
trainer (``retrievers/training.py``: batches, GradCache, resume, torchrun) and one of
three losses (:mod:`retrievers.losses`), ``pipeline.distill.loss``:

* ``kl`` -- SimLM's Retriever_distill (Wang et al. 2023): each example's group is its
  positive + ``n_negatives`` candidates sampled per epoch from the teacher-scored pool
  (``teacher_scores.jsonl``); loss ``KL(teacher || student)`` over the group with the
  teacher's scores divided by ``teacher_temperature``, plus ``alpha`` x InfoNCE over the
  batch (paper: alpha 0.2, student temperature 0.02 on cosine: ``temperature``);
* ``margin_mse`` -- Hofstätter et al. 2020: the same groups, margins regressed;
* ``tct`` -- TCT-ColBERT (Lin et al. 2021): the ColBERT teacher (the rerank stage's
  checkpoint) scores every query x passage pair of the batch on the fly (N x N*group,
  no gradient); KL over each row at ``teacher_temperature`` + ``gamma`` x the student's
  cross-entropy. ``n_negatives: 0`` is the paper's in-batch KD; ``n_negatives > 0`` puts
  hard negatives (from the mine stage, else the BM25 window) into the batch: the HN
  variant; HN+ is the same with a teacher trained on those negatives (the rerank stage
  trains on the same pool).

Reads ``data``, ``model``, ``pipeline.distill``, ``seed``. Writes what retriever1 writes.
"""

from __future__ import annotations

import json
import logging

import torch
from omegaconf import OmegaConf

from pipelines.executor import ConfigError, Context, Stage
from pipelines.mine import read_teacher_scores
from pipelines.retriever1 import bm25_pool, train_stage
from retrievers.training import ContrastiveData

log = logging.getLogger("drlab")

LOSSES = ("kl", "margin_mse", "tct")


def run(ctx: Context) -> dict[str, float]:
    from retrievers.losses import group_scores, margin_mse, simlm_loss, tct_inbatch_kd

    p = OmegaConf.to_container(ctx.cfg.pipeline.distill, resolve=True)
    kind = str(p.get("loss", "kl"))
    if kind not in LOSSES:
        raise ConfigError(f"pipeline.distill.loss='{kind}'; valid choices: {', '.join(LOSSES)}")
    if "rerank" not in ctx.upstream:
        raise ConfigError(
            f"stage distill learns from a teacher, but model '{ctx.cfg.model.name}' has no rerank stage before it. "
            f"Fix: put rerank before distill in model.chain."
        )
    scores_file = ctx.upstream["rerank"] / "teacher_scores.jsonl"
    t_temp = float(p.get("teacher_temperature", 1.0))
    n_neg = int(p.get("n_negatives") or 0)

    def negatives(split, positives, doc_text, encoder, ds, index_doc_len):
        queries = {q: ds.queries[q] for q in positives}
        if kind in ("kl", "margin_mse"):
            teacher = read_teacher_scores(scores_file)
            missing = [q for q in positives if q not in teacher]
            if missing:
                log.warning("[distill] %d train queries have no teacher scores (e.g. %s): dropped",
                            len(missing), missing[:3])
            pos = {q: v for q, v in positives.items() if q in teacher and all(d in teacher[q] for d in v)}
            pool = {q: sorted((d for d in teacher[q] if d not in set(pos[q])), key=lambda d: -teacher[q][d])
                    for q in pos}
            if n_neg < 1:
                raise ConfigError(f"pipeline.distill.loss={kind} needs n_negatives >= 1 (a group to distil over)")
            # sampled negatives must be teacher-scored: no random fill-ins
            short = [q for q in pos if len(pool[q]) < n_neg]
            if short:
                raise ConfigError(
                    f"{len(short)} train queries have fewer than n_negatives={n_neg} teacher-scored candidates "
                    f"(e.g. {short[0]}: {len(pool[short[0]])}); lower pipeline.distill.n_negatives or raise "
                    f"pipeline.rerank.score_depth"
                )
            data = ContrastiveData({q: queries[q] for q in pos}, pos, doc_text, pool, n_neg)
            return data, None, {"loss": kind, "n_negatives": n_neg, "teacher_scores": str(scores_file)}
        # tct: in-batch KD, optionally with hard negatives in the batch
        pool = None
        if n_neg > 0:
            if "mine" in ctx.upstream:
                from pipelines.mine import NEGATIVES_FILE, read_negatives

                pool = read_negatives(ctx.upstream["mine"] / NEGATIVES_FILE)
            elif "bm25" in ctx.upstream:
                pool = bm25_pool(ctx, split, positives, p.get("neg_window") or (1, 100), "distill")
            else:
                raise ConfigError("pipeline.distill.n_negatives > 0 needs a mine or bm25 stage in model.chain")
        data = ContrastiveData(queries, positives, doc_text, pool, n_neg)
        return data, None, {"loss": kind, "n_negatives": n_neg}

    if kind == "tct":
        from pipelines.rerank import load_teacher
        from retrievers.encoder import resolve_device

        teacher = load_teacher(ctx.cfg.model.teacher, ctx.upstream["rerank"] / "checkpoint")
        if not hasattr(teacher, "score_all"):
            raise ConfigError("pipeline.distill.loss=tct needs a ColBERT teacher (model.teacher: retrievers.colbert.build)")
        teacher.to(resolve_device(str(ctx.runtime.device))).eval()
        for prm in teacher.parameters():
            prm.requires_grad_(False)
        gamma = float(p.get("gamma", 0.0))

        def loss_fn(scores, batch):
            with torch.no_grad():
                t = teacher.score_all(batch.queries, batch.docs).to(scores.device)
            return tct_inbatch_kd(scores, t, t_temp, gamma, batch.group)

    else:
        teacher_scores = read_teacher_scores(scores_file)
        alpha = float(p.get("alpha", 0.2))

        def teacher_group(batch):
            g = batch.group
            rows = [[teacher_scores[q][d] for d in batch.doc_ids[i * g:(i + 1) * g]] for i, q in enumerate(batch.qids)]
            return torch.tensor(rows, dtype=torch.float32)

        def loss_fn(scores, batch):
            t = teacher_group(batch).to(scores.device)
            if kind == "kl":
                return simlm_loss(scores, t, batch.group, alpha, t_temp, batch.mask(scores.device))
            return margin_mse(group_scores(scores, batch.group), t)

    metrics = train_stage(ctx, "distill", p, negatives, loss_fn=loss_fn)
    (ctx.out / "distill.json").write_text(json.dumps({"loss": kind, "teacher": str(ctx.upstream["rerank"])}) + "\n")
    return metrics


STAGE = Stage(
    name="distill", version="1", reads=("data", "model", "pipeline.distill", "seed"), run=run, distributed=True
)
