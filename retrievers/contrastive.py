"""Contrastive bi-encoder training, one step: InfoNCE, hard-negative batches, GradCache, gathers.

The trainer around it (:mod:`retrievers.training`) adds the optimiser, resume and logging.

What it implements, and from where:

* **InfoNCE** (van den Oord et al. 2018, "Representation Learning with Contrastive
  Predictive Coding"): cross-entropy of each query's positive among all candidate
  passages of the batch, ``scores = q @ d.T / temperature``.
* **DPR** training (Karpukhin et al. 2020, "Dense Passage Retrieval for Open-Domain
  Question Answering"): in-batch negatives (every other example's passages) plus
  BM25 hard negatives; one example per (question, positive) pair.
  *Differences from the paper:* the number of BM25 negatives and the BM25 rank
  window they are drawn from are configurable (DPR took the top BM25 passage not
  containing the answer; here ``n_negatives`` are sampled per epoch from ranks
  ``[lo, hi]``, excluding every judged positive of the query); the scores of
  candidates that are judged positives of the query other than its target are
  masked out of the softmax (``mask_false_negatives``; DPR does not), which
  matters when a query has several positives in the same batch; the dot product
  can be scaled by a temperature.
* **GradCache** (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
  under Memory Limited Setup"): embeddings of the whole batch are computed without
  a graph in chunks, the loss and its gradient with respect to the embeddings are
  computed once, then every chunk is re-encoded with a graph (under the RNG state
  of its first pass, so dropout masks repeat) and the cached embedding gradient is
  back-propagated. Gradients equal the full-batch gradients; memory is that of one
  chunk. *Difference:* no separate library; it composes with gradient
  accumulation, mixed precision and the distributed gather below.
* **Distributed** in-batch negatives (as in DPR's and Tevatron's multi-GPU
  training): embeddings are all-gathered across ranks, the local slice of the
  gathered tensor is replaced by the local tensor that carries the graph, and
  every rank computes the loss of the *whole* global batch. The gradient of that
  loss with respect to a rank's own embeddings is then complete (its passages are
  negatives of every rank's queries), so summing parameter gradients across ranks
  (one ``all_reduce(SUM)`` per optimizer step; no DDP wrapper, which would average
  and would fight GradCache's several forward passes) gives exactly the
  single-process gradient. The reported loss equals the single-process loss.

Batch order and negative sampling are a pure function of (seed, epoch): a resumed run replays
exactly the batches an uninterrupted one would have seen (checkpoints: :mod:`retrievers.training`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from retrievers.distributed import gather_with_grad

log = logging.getLogger("drlab")


# =========================================================================== losses


def info_nce(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE / softmax cross-entropy of ``scores`` [Nq, Nd] (already divided by the temperature).

    ``targets[i]`` is the column of query i's positive; ``mask`` (bool [Nq, Nd], True =
    drop) removes candidates from the softmax (e.g. other judged positives of query i).
    """
    if mask is not None:
        if mask.gather(1, targets[:, None]).any():
            raise ValueError("info_nce: the mask drops a query's own positive")
        scores = scores.masked_fill(mask, float("-inf"))
    return nn.functional.cross_entropy(scores, targets)


#: ``loss_fn(scores, batch) -> scalar``; ``scores`` are global [Nq, Nd] logits.
LossFn = Callable[[torch.Tensor, "Batch"], torch.Tensor]


def contrastive_loss(scores: torch.Tensor, batch: "Batch") -> torch.Tensor:
    """InfoNCE over in-batch + hard negatives, masking the query's other positives."""
    return info_nce(scores, batch.targets(scores.device), batch.mask(scores.device))


def contrastive_loss_unmasked(scores: torch.Tensor, batch: "Batch") -> torch.Tensor:
    """InfoNCE over in-batch + hard negatives as DPR computes it (no false-negative mask)."""
    return info_nce(scores, batch.targets(scores.device))


# =========================================================================== negatives


def window_negatives(
    run: dict[str, dict[str, float]],
    positives: dict[str, Iterable[str]],
    window: Sequence[int] = (1, 100),
) -> dict[str, list[str]]:
    """Per query, the documents ranked ``lo..hi`` (1-based, inclusive) in ``run``, minus its positives.

    Ranks follow trec_eval's order (score descending, then doc id descending), i.e.
    the order of a TREC run file written by dr-lab or Anserini. The window is applied
    to the ranks *before* removing positives, so a positive at rank 12 simply leaves
    a gap (``lo``/``hi`` mean the same documents whatever is judged).
    """
    from retrievers.evaluation import trec_order

    lo, hi = int(window[0]), int(window[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"neg_window must be [lo, hi] with 1 <= lo <= hi (1-based ranks), got {list(window)}")
    out: dict[str, list[str]] = {}
    for qid, docs in run.items():
        pos = set(positives.get(qid, ()))
        ranked = [d for d, _ in trec_order(docs)][lo - 1 : hi]
        out[qid] = [d for d in ranked if d not in pos]
    return out


# =========================================================================== batches


@dataclass
class Batch:
    """A global contrastive batch. Example i owns documents ``[i*group, (i+1)*group)``, positive first."""

    qids: list[str]
    queries: list[str]
    doc_ids: list[str]
    docs: list[str]
    group: int
    positives: list[frozenset[str]]  # per example: all judged positives of its query
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.qids)

    def targets(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.arange(len(self.qids), device=device) * self.group

    def mask(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """True where a candidate is a judged positive of the query but not its target."""
        m = torch.zeros(len(self.qids), len(self.doc_ids), dtype=torch.bool)
        for i, pos in enumerate(self.positives):
            for j, d in enumerate(self.doc_ids):
                if j != i * self.group and d in pos:
                    m[i, j] = True
        return m.to(device) if m.any() else None

    def shard(self, rank: int, world: int) -> "Batch":
        """This rank's contiguous slice (rank order = order in the global batch)."""
        n = len(self.qids)
        if n % world:
            raise ValueError(f"global batch of {n} examples does not split over {world} ranks")
        b = n // world
        q0, q1, d0, d1 = rank * b, (rank + 1) * b, rank * b * self.group, (rank + 1) * b * self.group
        return Batch(
            self.qids[q0:q1], self.queries[q0:q1], self.doc_ids[d0:d1], self.docs[d0:d1],
            self.group, self.positives[q0:q1], self.extras,
        )


class ContrastiveData:
    """(query, positive) examples with hard negatives sampled from a per-query pool.

    ``negative_pool[qid]``: candidate negatives (already without positives), e.g. a
    BM25 rank window or mined dense-retrieval negatives. When a query's pool has
    fewer than ``n_negatives`` documents, random corpus documents that are not its
    positives fill the gap (counted in :attr:`stats`). Batch order and sampled
    negatives depend only on (seed, epoch).
    """

    def __init__(
        self,
        queries: dict[str, str],
        positives: dict[str, list[str]],
        doc_text: dict[str, str],
        negative_pool: dict[str, list[str]] | None = None,
        n_negatives: int = 0,
        mix_pool: dict[str, list[str]] | None = None,
        n_mix: int = 0,
    ):
        self.queries = queries
        self.positives = {q: list(ds) for q, ds in positives.items() if ds and q in queries}
        self.pos_sets = {q: frozenset(ds) for q, ds in self.positives.items()}
        self.doc_text = doc_text
        self.n_pool = int(n_negatives)
        self.mix_pool = mix_pool or {}
        self.n_mix = int(n_mix) if mix_pool is not None else 0
        self.n_negatives = self.n_pool + self.n_mix  # hard negatives per example (group = 1 + this)
        missing = sorted({d for ds in self.positives.values() for d in ds if d not in doc_text})
        if missing:
            log.warning("%d positive document(s) are not in the corpus (e.g. %s); their examples are dropped",
                        len(missing), missing[:3])
        self.pairs = [(q, d) for q, ds in self.positives.items() for d in ds if d in doc_text]
        self.doc_ids = list(doc_text)
        self.stats: dict[str, Any] = {"examples": len(self.pairs), "queries": len(self.positives)}
        self.set_pool(negative_pool or {})

    def set_pool(self, negative_pool: dict[str, list[str]]) -> None:
        """Swap the hard-negative pool (ANCE refresh); batches made afterwards sample from it."""
        self.pool = negative_pool
        short = sum(1 for q, _ in self.pairs if len(self.pool.get(q, ())) < self.n_pool)
        self.stats["short_pools"] = short
        if self.n_pool and short:
            log.warning(
                "%d of %d examples have fewer than %d hard negatives in their pool; random corpus documents fill in",
                short, len(self.pairs), self.n_pool,
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def num_batches(self, batch_size: int) -> int:
        """Full batches per epoch (the last incomplete batch is dropped; a new order every epoch)."""
        return len(self.pairs) // batch_size

    def _from_pool(self, pool, k: int, rng: np.random.Generator, taken: Sequence[str]) -> list[str]:
        cands = [d for d in pool if d in self.doc_text and d not in taken]
        if len(cands) >= k:
            return [cands[i] for i in rng.choice(len(cands), size=k, replace=False)]
        return cands

    def _negatives(self, qid: str, rng: np.random.Generator) -> list[str]:
        n = self.n_negatives
        if not n:
            return []
        out = self._from_pool(self.pool.get(qid, ()), self.n_pool, rng, ()) if self.n_pool else []
        if self.n_mix:
            out += self._from_pool(self.mix_pool.get(qid, ()), self.n_mix, rng, out)
        pos = self.pos_sets[qid]
        while len(out) < n:
            d = self.doc_ids[int(rng.integers(len(self.doc_ids)))]
            if d not in pos and d not in out:
                out.append(d)
        return out

    def epoch_batches(self, epoch: int, seed: int, batch_size: int) -> list[Batch]:
        rng = np.random.default_rng([int(seed), int(epoch)])
        order = rng.permutation(len(self.pairs))
        batches = []
        for b in range(self.num_batches(batch_size)):
            idx = order[b * batch_size : (b + 1) * batch_size]
            qids, queries, doc_ids, positives = [], [], [], []
            for i in idx:
                q, d = self.pairs[i]
                qids.append(q)
                queries.append(self.queries[q])
                doc_ids += [d] + self._negatives(q, rng)
                positives.append(self.pos_sets[q])
            batches.append(
                Batch(qids, queries, doc_ids, [self.doc_text[d] for d in doc_ids], 1 + self.n_negatives, positives)
            )
        return batches



# =========================================================================== one step


class _RngState:
    """The RNG state before a chunk's first (no-grad) pass, replayed for its second pass."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _slice(feats: dict[str, torch.Tensor], i: int, j: int, right_padded: bool = True) -> dict[str, torch.Tensor]:
    """Rows ``i:j``; with right padding, also cut the columns that are padding in every row of the chunk."""
    out = {k: v[i:j] for k, v in feats.items()}
    if right_padded and "attention_mask" in out:
        n = int(out["attention_mask"].sum(1).max())
        out = {k: v[:, :n] if v.dim() == 2 else v for k, v in out.items()}
    return out


def _length_sorted(feats: dict[str, torch.Tensor], padding: dict[str, int] | None, chunk: int, on: bool):
    """``feats`` with its rows sorted longest first (``on``), and the permutation back to input order.

    ``padding`` counts the real tokens, the tokens the chunks compute (each cut to its own longest row)
    and the tokens one unsorted forward of the whole batch would compute.
    """
    n = feats["input_ids"].shape[0]
    lens = feats["attention_mask"].sum(1) if "attention_mask" in feats else torch.full((n,), feats["input_ids"].shape[1])
    order = torch.argsort(lens, descending=True, stable=True) if on else torch.arange(n)
    if padding is not None:
        ls = lens[order].tolist()
        padding["tokens"] += int(sum(ls))
        padding["padded"] += sum(len(ls[i : i + chunk]) * max(ls[i : i + chunk]) for i in range(0, n, chunk))
        padding["padded_unsorted"] += n * int(feats["input_ids"].shape[1])
    return ({k: v[order] for k, v in feats.items()} if on else feats), torch.argsort(order)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def contrastive_step(
    encoder,
    batch: Batch,
    local: Batch,
    *,
    device: torch.device,
    loss_fn: LossFn = contrastive_loss,
    grad_cache: bool = False,
    chunk_size: int = 16,
    precision: str = "fp32",
    temperature: float | None = None,
    loss_scale: float = 1.0,
    scaler: "torch.amp.GradScaler | None" = None,
    length_sort: bool = False,
    padding: dict[str, int] | None = None,
) -> float:
    """Forward + backward of one (micro-)batch; returns the global loss (unscaled).

    ``batch`` is the global batch (for targets/mask), ``local`` this rank's shard.
    Gradients (of ``loss * loss_scale``) accumulate in ``.grad``; on several ranks each
    holds its own part and :func:`all_reduce_grads` sums them.

    ``length_sort``: the encoder runs over the batch's queries and documents in length-sorted chunks
    of ``chunk_size``, each padded only to its own longest text (with ``grad_cache``, its chunks are
    sorted the same way). The batch, its in-batch negatives and the loss are those of one forward;
    only the padded positions nobody attends to are skipped. ``padding`` (a counter dict) adds up
    real, computed and unsorted-whole-batch tokens.
    """
    right = getattr(encoder.tokenizer, "padding_side", "right") == "right"
    chunk = chunk_size if (length_sort or grad_cache) and right else 1 << 30
    q_feats, q_back = _length_sorted({k: v.to(device) for k, v in encoder.tokenize(local.queries, "query").items()},
                                     padding, chunk, length_sort and right)
    d_feats, d_back = _length_sorted({k: v.to(device) for k, v in encoder.tokenize(local.docs, "doc").items()},
                                     padding, chunk, length_sort and right)
    t_scale = encoder.cfg["temperature"] / temperature if temperature else 1.0

    def embed(feats: dict[str, torch.Tensor], side: str) -> torch.Tensor:
        n = feats["input_ids"].shape[0]
        if chunk >= n:
            return encoder.embed(feats, side)
        return torch.cat([encoder.embed(_slice(feats, i, min(n, i + chunk), right), side) for i in range(0, n, chunk)])

    def loss_of(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:  # q, d in sorted order
        q_all, d_all = gather_with_grad(q.float()[q_back]), gather_with_grad(d.float()[d_back])
        scores = encoder.score(q_all, d_all) * t_scale
        return loss_fn(scores, batch)

    def backward(loss: torch.Tensor) -> None:
        scaled = loss * loss_scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()

    if not grad_cache:
        with _autocast(device, precision):
            q = embed(q_feats, "query")
            d = embed(d_feats, "doc")
        loss = loss_of(q, d)
        backward(loss)
        return float(loss.detach())

    # GradCache: 1) embeddings without a graph, chunk by chunk, remembering RNG states
    cached: dict[str, tuple[torch.Tensor, list[tuple[int, int, _RngState]]]] = {}
    for side, feats in (("query", q_feats), ("doc", d_feats)):
        n = feats["input_ids"].shape[0]
        embs, chunks = [], []
        for i in range(0, n, chunk_size):
            j = min(n, i + chunk_size)
            state = _RngState(device)
            with torch.no_grad(), _autocast(device, precision):
                embs.append(encoder.embed(_slice(feats, i, j, right), side).float())
            chunks.append((i, j, state))
        cached[side] = (torch.cat(embs).requires_grad_(True), chunks)
    # 2) loss and its gradient with respect to the embeddings
    q_leaf, d_leaf = cached["query"][0], cached["doc"][0]
    loss = loss_of(q_leaf, d_leaf)
    backward(loss)
    # 3) re-encode each chunk with a graph (same dropout) and push the cached gradient through
    for side, feats in (("query", q_feats), ("doc", d_feats)):
        leaf, chunks = cached[side]
        for i, j, state in chunks:
            with state.replay(), _autocast(device, precision):
                emb = encoder.embed(_slice(feats, i, j, right), side).float()
            emb.backward(leaf.grad[i:j])
    return float(loss.detach())


