"""Stage ``rerank``: train a teacher reranker on hard negatives; score the train candidates.

The teacher is ``model.teacher`` (a ``_target_`` builder): a cross-encoder
(:mod:`retrievers.cross_encoder`, SimLM's re-ranker) or ColBERT (:mod:`retrievers.colbert`,
TCT-ColBERT's teacher). Both expose ``score_pairs(queries, docs)``.

Training (``pipeline.rerank``): one group per (train query, positive) -- the positive and
``n_negatives`` candidates sampled per epoch from the query's pool -- scored by the teacher
and trained with softmax cross-entropy over the group (*localized contrastive estimation*,
Gao et al. 2021; ColBERT's pairwise softmax when ``n_negatives`` is 1). The pool is the
upstream ``mine`` stage's ``negatives.jsonl`` when the chain has one, else ranks
``neg_window`` of the upstream bm25 train run; with ``remine`` (``auto``: when a
``retriever2`` is upstream, as in SimLM, whose re-ranker learns from Retriever2's
negatives) the train queries are mined again with the newest upstream checkpoint and
``pipeline.mine``'s settings (:class:`pipelines.mine.DenseMiner`). AdamW, linear warm-up/decay, gradient
clipping; a resumable state is written to the work dir every ``save_every`` steps.

Scoring: every train query's positives and its first ``score_depth`` pool candidates are
scored by the trained teacher into ``teacher_scores.jsonl`` (``{"qid", "scores": {docid:
score}}``: what ``distill`` learns from and what ``mine``'s false-negative filter reads).

Writes ``checkpoint/`` (the teacher: Hugging Face layout + ``drlab_reranker.json`` or
``colbert.json``), ``teacher_scores.jsonl``, ``train_log.jsonl``, ``loss.png``.
The ``eval`` stage reranks the retriever's top ``pipeline.eval.rerank_depth`` with this
checkpoint (its own row in the report).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from pipelines.executor import ConfigError, Context, Stage

log = logging.getLogger("drlab")

STATE = "reranker_state.pt"


def load_teacher(teacher_cfg, checkpoint: str | Path | None = None):
    from hydra.utils import instantiate

    return instantiate(teacher_cfg, **({"checkpoint": str(checkpoint)} if checkpoint else {}))


@torch.inference_mode()
def score_pairs_batched(model, pairs: list[tuple[str, str]], batch_size: int, progress: bool = False,
                        desc: str = "teacher scoring") -> np.ndarray:
    """Teacher scores of (query text, doc text) pairs, in length-sorted batches."""
    from tqdm.auto import tqdm

    model.eval()
    order = np.argsort([-(len(q) + len(d)) for q, d in pairs], kind="stable")
    out = np.empty(len(pairs), dtype=np.float32)
    for lo in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, mininterval=5):
        idx = order[lo : lo + batch_size]
        s = model.score_pairs([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
        out[idx] = s.float().cpu().numpy()
    return out


def rerank_run(model, run: dict[str, dict[str, float]], queries: dict[str, str], doc_text: dict[str, str],
               depth: int, batch_size: int, progress: bool = True) -> dict[str, dict[str, float]]:
    """The top ``depth`` of each query in ``run`` re-scored by ``model``; deeper hits follow in their order.

    Hits below ``depth`` keep their original order under every re-scored one (scores
    ``min(reranked) - 1 - i``), so Recall@k for k > depth is the first stage's.
    """
    from pipelines.evaluation import trec_order

    pairs, keys = [], []
    for q, docs in run.items():
        for d, _ in trec_order(docs)[:depth]:
            if d in doc_text and q in queries:
                pairs.append((queries[q], doc_text[d]))
                keys.append((q, d))
    scores = score_pairs_batched(model, pairs, batch_size, progress=progress, desc=f"rerank top-{depth}")
    out: dict[str, dict[str, float]] = {}
    for (q, d), s in zip(keys, scores):
        out.setdefault(q, {})[d] = float(s)
    for q, docs in run.items():
        top = out.setdefault(q, {})
        floor = min(top.values()) if top else 0.0
        rest = [d for d, _ in trec_order(docs) if d not in top]
        for i, d in enumerate(rest):
            top[d] = floor - 1.0 - i
    return out


def train_reranker(model, examples: list[tuple[str, str]], pool: dict[str, list[str]], queries: dict[str, str],
                   doc_text: dict[str, str], p: dict, seed: int, work: Path, progress: bool = True,
                   name: str = "rerank") -> list[dict[str, Any]]:
    """Group softmax cross-entropy training of ``model`` (resumable from ``work/STATE``)."""
    from transformers import get_linear_schedule_with_warmup
    from tqdm.auto import tqdm

    from retrievers.colbert import group_ce_loss
    from retrievers.training import atomic_torch_save

    bs, n_neg = int(p.get("batch_size", 8)), int(p.get("n_negatives", 7))
    per_epoch = max(1, len(examples) // bs)
    total = int(p["max_steps"]) if p.get("max_steps") else max(1, math.ceil(float(p.get("epochs", 1)) * per_epoch))
    opt = torch.optim.AdamW([x for x in model.parameters() if x.requires_grad], lr=float(p.get("lr", 2e-5)),
                            weight_decay=float(p.get("weight_decay", 0.01)))
    sched = get_linear_schedule_with_warmup(opt, round(float(p.get("warmup_ratio", 0.1)) * total), total)
    Path(work).mkdir(parents=True, exist_ok=True)
    step, history = 0, []
    state_path = work / STATE
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, history = int(st["step"]), list(st["history"])
        log.info("resuming %s from step %d", name, step)
    doc_ids = list(doc_text)
    model.train()
    bar = tqdm(total=total, initial=step, desc=name, unit="step", disable=not progress, mininterval=2)
    t0, losses = time.perf_counter(), []
    while step < total:
        epoch, pos_in_epoch = divmod(step, per_epoch)
        rng = np.random.default_rng([int(seed), int(epoch)])
        order = rng.permutation(len(examples))
        idx = order[pos_in_epoch * bs : (pos_in_epoch + 1) * bs]
        rng_b = np.random.default_rng([int(seed), int(epoch), int(pos_in_epoch)])
        qs, ds = [], []
        for i in idx:
            q, d = examples[i]
            cands = [c for c in pool.get(q, ()) if c in doc_text and c != d]
            if len(cands) >= n_neg:
                negs = [cands[j] for j in rng_b.choice(len(cands), size=n_neg, replace=False)]
            else:
                negs = list(cands)
                while len(negs) < n_neg:
                    negs.append(doc_ids[int(rng_b.integers(len(doc_ids)))])
            for x in [d] + negs:
                qs.append(queries[q])
                ds.append(doc_text[x])
        scores = model.score_pairs(qs, ds).view(len(idx), 1 + n_neg)
        loss = group_ce_loss(scores)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"[{name}] loss is {loss.item()} at step {step + 1}; lower pipeline.rerank.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(p.get("max_grad_norm", 1.0)))
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        losses.append(loss.item())
        if step % int(p.get("log_every", 10)) == 0 or step == total:
            rec = {"step": step, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                   "groups_per_s": len(losses) * bs / max(1e-9, time.perf_counter() - t0)}
            history.append(rec)
            log.info("[%s] step %d  loss %.4f  %.1f groups/s", name, step, rec["loss"], rec["groups_per_s"])
            t0, losses = time.perf_counter(), []
        if p.get("save_every") and step % int(p["save_every"]) == 0 and step < total:
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "step": step, "history": history}, state_path)
    bar.close()
    model.eval()
    return history


def score_query_sample(qids: list[str], n: int | None, seed: int) -> list[str]:
    """The train queries whose candidates the teacher scores: all, or a seeded sample of ``n``
    (in ``qids`` order). The distill stage trains on the scored queries only, so a sample bounds
    the scoring time on a large train split (NFCorpus: 2590 queries x ~42 judged passages)."""
    if n is None or int(n) >= len(qids):
        return list(qids)
    if int(n) < 1:
        raise ConfigError(f"pipeline.rerank.score_queries={n}: must be >= 1 (null: all train queries)")
    keep = set(np.random.default_rng([int(seed), 7]).choice(len(qids), size=int(n), replace=False).tolist())
    return [q for i, q in enumerate(qids) if i in keep]


def candidate_pool(ctx: Context, split: str, positives: dict[str, list[str]], p: dict, ds=None) -> tuple[dict, str]:
    from pipelines.mine import NEGATIVES_FILE, miner_from_config, read_negatives
    from pipelines.retriever1 import bm25_pool
    from retrievers.encoder import instantiate_encoder, latest_checkpoint

    remine = p.get("remine", "auto")
    if remine == "auto":
        remine = "retriever2" in ctx.upstream
    if remine:
        # SimLM: the re-ranker trains on the negatives of the newest retriever (Retriever2), mined
        # here with the mine stage's settings and code
        ckpt = latest_checkpoint(ctx.upstream)
        encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=ckpt)
        pm = OmegaConf.to_container(ctx.cfg.pipeline.mine, resolve=True)
        miner = miner_from_config(ds, split, encoder, pm, int(ctx.cfg.seed), ctx.runtime)
        log.info("[rerank] mining the train queries with %s for the teacher's negatives", ckpt)
        _, negs, _ = miner(encoder, ctx.work / "remine")
        del encoder
        return {q: [c["id"] for c in v] for q, v in negs.items()}, f"re-mined with {ckpt}"
    if "mine" in ctx.upstream:
        path = ctx.upstream["mine"] / NEGATIVES_FILE
        return read_negatives(path), str(path)
    if "bm25" in ctx.upstream:
        return bm25_pool(ctx, split, positives, p.get("neg_window") or (1, 100), "rerank"), "bm25 train run"
    raise ConfigError(
        f"stage rerank trains on hard negatives from a mine or bm25 stage, but model '{ctx.cfg.model.name}' "
        f"has neither before rerank in its chain. Fix: add bm25 (or mine) to model.chain."
    )


def teacher_quality(scores: dict[str, dict[str, float]], positives: dict[str, set[str]]) -> dict[str, float]:
    """How well the teacher separates a query's judged positives from the other scored candidates.

    * ``top1_is_positive``: share of queries whose best-scored candidate is judged relevant, next to
      ``top1_chance``, what a random order gets (the mean share of positives among the candidates:
      on NFCorpus, with ~42 judged passages per train query, that is far from 0);
    * ``auc``: mean over queries (with both kinds) of P(score(positive) > score(other)), ties 1/2;
      0.5 is chance, 1.0 a perfect teacher.
    """
    top, chance, aucs = [], [], []
    for q, sc in scores.items():
        pos = positives.get(q, set())
        if not sc:
            continue
        top.append(max(sc, key=sc.get) in pos)
        chance.append(sum(d in pos for d in sc) / len(sc))
        p = np.array([v for d, v in sc.items() if d in pos])
        n = np.array([v for d, v in sc.items() if d not in pos])
        if len(p) and len(n):
            aucs.append(float(((p[:, None] > n[None, :]) + 0.5 * (p[:, None] == n[None, :])).mean()))
    return {"top1_is_positive": round(float(np.mean(top)), 4) if top else 0.0,
            "top1_chance": round(float(np.mean(chance)), 4) if chance else 0.0,
            "auc": round(float(np.mean(aucs)), 4) if aucs else float("nan")}


def run(ctx: Context) -> dict[str, float]:
    from pipelines.data import load_dataset
    from pipelines.retriever1 import train_positives, train_split_of
    from retrievers.encoder import resolve_device
    from retrievers.training import plot_loss

    p = OmegaConf.to_container(ctx.cfg.pipeline.rerank, resolve=True)
    if "teacher" not in ctx.cfg.model or ctx.cfg.model.teacher is None:
        raise ConfigError(f"stage rerank needs model.teacher (a _target_ builder); model '{ctx.cfg.model.name}' has none")
    data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    torch.set_num_threads(int(ctx.runtime.threads))
    device = resolve_device(str(ctx.runtime.device))
    split = train_split_of(data)
    ds = load_dataset(data, [split])
    positives = train_positives(ds, split)
    doc_text = {d: ds.doc_text(d) for d in ds.corpus}
    pool, source = candidate_pool(ctx, split, positives, p, ds)
    model = load_teacher(ctx.cfg.model.teacher).to(device)
    examples = [(q, d) for q, ds_ in positives.items() for d in ds_ if d in doc_text]
    torch.manual_seed(int(ctx.cfg.seed))
    progress = bool(ctx.runtime.get("progress", True))
    t0 = time.perf_counter()
    history: list[dict] = []
    if p.get("train", True):
        log.info("[rerank] training %s on %d groups (1 positive + %d negatives from %s)",
                 type(model).__name__, len(examples), int(p.get("n_negatives", 7)), source)
        history = train_reranker(model, examples, pool, ds.queries, doc_text, p, int(ctx.cfg.seed), ctx.work,
                                 progress=progress)
    train_s = time.perf_counter() - t0
    model.to("cpu").save(ctx.out / "checkpoint")
    model.to(device)
    (ctx.out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if history:
        plot_loss(history, ctx.out / "loss.png", title=f"rerank ({type(model).__name__}) on {data['name']}")

    depth = int(p.get("score_depth", 30))
    scored = score_query_sample(sorted(positives), p.get("score_queries"), int(ctx.cfg.seed))
    if len(scored) < len(positives):
        log.info("[rerank] scoring %d of %d train queries (pipeline.rerank.score_queries)", len(scored), len(positives))
    pairs, keys = [], []
    for q in scored:
        for d in list(dict.fromkeys(positives[q] + list(pool.get(q, ()))[:depth])):
            if d in doc_text:
                pairs.append((ds.queries[q], doc_text[d]))
                keys.append((q, d))
    t1 = time.perf_counter()
    scores = score_pairs_batched(model, pairs, int(p.get("score_batch_size", 64)), progress=progress)
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


STAGE = Stage(name="rerank", version="1", reads=("data", "model", "pipeline.rerank", "pipeline.mine", "seed"), run=run,
              added_options=(("pipeline.rerank.score_queries", None),))  # null = every train query, as before
