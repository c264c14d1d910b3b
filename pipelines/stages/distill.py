"""Stage ``distill``: a bi-encoder student learns from the ``rerank`` stage's teacher.

The student starts from the newest upstream checkpoint (``retriever2`` in SimLM's chain), else
from ``model.encoder`` (TCT-ColBERT's student), and trains with the retriever1 trainer
(:func:`retrievers.train_biencoder.train_biencoder`) and the loss ``pipeline.distill.loss``, a
``_target_`` from ``conf/loss/`` (:mod:`retrievers.losses`):

* ``GroupKL`` -- SimLM's Retriever_distill (Wang et al. 2023): each example's group is its
  positive + ``n_negatives`` candidates sampled per epoch from the teacher-scored pool
  (``teacher_scores.jsonl``); ``KL(teacher || student)`` over the group + ``alpha`` x InfoNCE;
* ``MarginMSE`` -- Hofstätter et al. 2020: the same groups, margins regressed;
* ``InBatchKD`` -- TCT-ColBERT (Lin et al. 2021): the ColBERT teacher (the rerank stage's
  checkpoint) scores every query x passage pair of the batch on the fly; ``n_negatives: 0``: only
  the batch's positives; ``n_negatives: 1``: one hard negative per query in the batch (from the mine
  stage, else the BM25 window): the (q, p+, p-) triples the paper trains on.

Reads ``data``, ``model.encoder``, ``model.teacher``, ``pipeline.distill``, ``seed``. Uses
``rerank``, the newest checkpoint and, for in-batch KD with hard negatives, ``mine`` or ``bm25``.
"""

from __future__ import annotations

import json
import logging

from pipelines.executor import Context, Stage, newest_checkpoint
from retrievers.errors import ConfigError, GateError

log = logging.getLogger("drlab")


def _batch_teacher(cfg) -> bool:
    from hydra.utils import get_class

    return get_class(cfg.pipeline.distill.loss._target_).teacher_input == "batch"


def uses(cfg, before: list[str]) -> tuple[str, ...]:
    if "rerank" not in before:
        raise ConfigError("stage distill learns from a teacher, but model.chain has no rerank stage before it. "
                          "Fix: put rerank before distill in model.chain.")
    hard = ()
    if _batch_teacher(cfg) and int(cfg.pipeline.distill.n_negatives or 0) > 0:
        hard = ("mine",) if "mine" in before else ("bm25",) if "bm25" in before else None
        if hard is None:
            raise ConfigError("pipeline.distill.n_negatives > 0 with in-batch KD needs a mine or bm25 stage in model.chain")
    return ("rerank",) + hard + newest_checkpoint(before)


def teacher_gate(ctx: Context) -> None:
    """Stop before distilling from a teacher that does not separate its own train positives (``gates``)."""
    floor = ctx.cfg.gates.get("teacher_min_auc")
    if floor is None:
        return
    auc = ctx.upstream_metrics("rerank").get("train_auc")
    if auc is None or auc != auc:  # NaN: no query had both a positive and another candidate
        log.warning("[distill] the rerank stage recorded no train_auc; gates.teacher_min_auc not checked")
        return
    if auc < floor:
        raise GateError(
            f"distill stopped by gates.teacher_min_auc={floor}: the teacher ({ctx.upstream['rerank'].name}) ranks its "
            f"own train positives above the other scored candidates with AUC {auc:.3f} (0.5 = chance), so a student "
            f"distilled from it would learn noise. Try: a longer or better-fed teacher (pipeline.rerank.epochs, "
            f"pipeline.rerank.neg_window, pipeline.rerank.lr), a different teacher (teacher@model.teacher=...), or "
            f"inspect it with `python -m scripts.teacher_quality`. To distil anyway: gates.teacher_min_auc=null. "
            f"The rerank stage stays cached; nothing is lost.")
    log.info("[distill] teacher gate passed: train_auc %.3f >= gates.teacher_min_auc %s", auc, floor)


def run(ctx: Context) -> dict[str, float]:
    import torch
    from hydra.utils import instantiate

    from retrievers.contrastive import ContrastiveData
    from retrievers.encoder import resolve_device
    from retrievers.mining import NEGATIVES_FILE, read_negatives, read_teacher_scores, run_window_pool
    from retrievers.reranking import load_teacher
    from retrievers.train_biencoder import train_biencoder

    teacher_gate(ctx)
    p = ctx.get("pipeline.distill")
    loss = instantiate(ctx.cfg.pipeline.distill.loss)
    scores_file = ctx.upstream["rerank"] / "teacher_scores.jsonl"
    n_neg = int(p["n_negatives"] or 0)
    group_teacher = loss.teacher_input == "group"
    if group_teacher and n_neg < 1:
        raise ConfigError(f"pipeline.distill.loss {type(loss).__name__} needs pipeline.distill.n_negatives >= 1 "
                          f"(a group of teacher-scored candidates to distil over)")
    teacher_scores = read_teacher_scores(scores_file) if group_teacher else None

    def negatives(split, positives, doc_text, encoder, ds, index_doc_len):
        queries = {q: ds.queries[q] for q in positives}
        if group_teacher:
            missing = [q for q in positives if q not in teacher_scores]
            if missing:
                log.warning("[distill] %d train queries have no teacher scores (e.g. %s): dropped",
                            len(missing), missing[:3])
            pos = {q: v for q, v in positives.items() if q in teacher_scores and all(d in teacher_scores[q] for d in v)}
            pool = {q: sorted((d for d in teacher_scores[q] if d not in set(pos[q])), key=lambda d: -teacher_scores[q][d])
                    for q in pos}
            short = [q for q in pos if len(pool[q]) < n_neg]  # sampled negatives must be teacher-scored
            if short:
                raise ConfigError(
                    f"{len(short)} train queries have fewer than n_negatives={n_neg} teacher-scored candidates "
                    f"(e.g. {short[0]}: {len(pool[short[0]])}); lower pipeline.distill.n_negatives or raise "
                    f"pipeline.rerank.score_depth"
                )
            data = ContrastiveData({q: queries[q] for q in pos}, pos, doc_text, pool, n_neg)
            return data, None, {"loss": type(loss).__name__, "n_negatives": n_neg}
        pool = None
        if "mine" in ctx.upstream:
            pool = read_negatives(ctx.upstream["mine"] / NEGATIVES_FILE)
        elif "bm25" in ctx.upstream:
            pool = run_window_pool(ctx.upstream["bm25"] / "runs" / f"{split}.trec", positives, p["neg_window"],
                                   "distill")
        return ContrastiveData(queries, positives, doc_text, pool, n_neg), None, {"loss": type(loss).__name__,
                                                                                   "n_negatives": n_neg}

    if group_teacher:
        def teacher_of(batch):
            g = batch.group
            rows = [[teacher_scores[q][d] for d in batch.doc_ids[i * g:(i + 1) * g]] for i, q in enumerate(batch.qids)]
            return torch.tensor(rows, dtype=torch.float32)
    else:
        teacher = load_teacher(ctx.cfg.model.teacher, ctx.upstream["rerank"] / "checkpoint")
        if not hasattr(teacher, "score_all"):
            raise ConfigError(f"pipeline.distill.loss {type(loss).__name__} scores the whole batch with the teacher: "
                              f"it needs a ColBERT teacher (teacher@model.teacher=colbert)")
        teacher.to(resolve_device(str(ctx.runtime.device))).eval()
        for prm in teacher.parameters():
            prm.requires_grad_(False)

        def teacher_of(batch):
            with torch.no_grad():
                return teacher.score_all(batch.queries, batch.docs)

    def loss_fn(scores, batch):
        return loss(scores, teacher_of(batch).to(scores.device), batch)

    metrics = train_biencoder("distill", ctx.cfg.model.encoder, ctx.checkpoint(), ctx.get("data"), p,
                              int(ctx.cfg.seed), ctx.get("runtime"), ctx.out, ctx.work, negatives, loss_fn=loss_fn)
    (ctx.out / "distill.json").write_text(json.dumps({"loss": ctx.get("pipeline.distill.loss"),
                                                      "teacher": ctx.upstream["rerank"].name}) + "\n")
    return metrics


STAGE = Stage(
    name="distill", version="1", reads=("data", "model.encoder", "model.teacher", "pipeline.distill", "seed"), run=run,
    uses=uses, distributed=True,
)
