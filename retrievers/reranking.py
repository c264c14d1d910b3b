"""Teacher rerankers: training with grouped softmax cross-entropy, scoring, reranking a run.

The teacher is a ``_target_`` builder (``model.teacher``): a cross-encoder
(:mod:`retrievers.cross_encoder`, SimLM's re-ranker) or ColBERT (:mod:`retrievers.colbert`,
TCT-ColBERT's teacher). Both expose ``score_pairs(queries, docs)``.

:func:`train_reranker`: one group per (train query, positive) -- the positive and
``n_negatives`` candidates sampled per epoch from the query's pool -- trained with softmax
cross-entropy over the group (*localized contrastive estimation*, Gao et al. 2021; ColBERT's
pairwise softmax when ``n_negatives`` is 1). AdamW, linear warm-up/decay, gradient clipping;
a resumable state every ``save_every`` steps. :func:`teacher_quality` measures how well the
trained teacher separates judged positives from the other candidates.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrievers.errors import ConfigError

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
    from retrievers.evaluation import trec_order

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
                   doc_text: dict[str, str], *, batch_size: int, n_negatives: int, epochs: float,
                   max_steps: int | None, lr: float, weight_decay: float, warmup_ratio: float,
                   max_grad_norm: float, log_every: int, save_every: int | None, seed: int, work: Path,
                   progress: bool = True, name: str = "rerank") -> list[dict[str, Any]]:
    """Group softmax cross-entropy training of ``model`` (resumable from ``work/STATE``)."""
    from tqdm.auto import tqdm

    from retrievers.colbert import group_ce_loss
    from retrievers.train_utils import adamw_linear, atomic_torch_save

    bs, n_neg = int(batch_size), int(n_negatives)
    per_epoch = max(1, len(examples) // bs)
    total = int(max_steps) if max_steps else max(1, math.ceil(float(epochs) * per_epoch))
    opt, sched = adamw_linear((x for x in model.parameters() if x.requires_grad), lr=lr, weight_decay=weight_decay,
                              warmup_ratio=warmup_ratio, total=total)
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(max_grad_norm))
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        losses.append(loss.item())
        if step % int(log_every) == 0 or step == total:
            rec = {"step": step, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                   "groups_per_s": len(losses) * bs / max(1e-9, time.perf_counter() - t0)}
            history.append(rec)
            log.info("[%s] step %d  loss %.4f  %.1f groups/s", name, step, rec["loss"], rec["groups_per_s"])
            t0, losses = time.perf_counter(), []
        if save_every and step % int(save_every) == 0 and step < total:
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
