"""Contrastive bi-encoder training: losses, hard-negative batches, a resumable trainer.

Used by stage ``retriever1`` (in-batch + BM25 negatives) and meant to be reused by
``retriever2`` (mined negatives: pass another negative pool) and ``distill`` (pass
another ``loss_fn``; ``Batch.extras`` carries per-batch data such as teacher scores).

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

Checkpoints (``trainer_state.pt`` in the work dir) hold model, optimizer, scheduler,
grad-scaler and RNG states (per rank), the step, the epoch and the position in the
epoch's batch order; they are written to a temporary file and renamed, so a kill
never leaves a half-written one. Batch order and negative sampling are a pure
function of (seed, epoch), so a resumed run replays exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("drlab")

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


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
    from pipelines.evaluation import trec_order

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


# =========================================================================== distributed


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` [n, ...] from every rank; this rank's slice keeps its autograd graph."""
    rank, world = dist_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, 0)


def all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum gradients over ranks in one flat all-reduce (every rank holds its part of d loss)."""
    rank, world = dist_info()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i : i + n].view_as(p.grad))
        i += n


def broadcast_params(module: nn.Module) -> None:
    """Make every rank start from rank 0's weights (e.g. a randomly initialised head)."""
    if dist_info()[1] > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


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
) -> float:
    """Forward + backward of one (micro-)batch; returns the global loss (unscaled).

    ``batch`` is the global batch (for targets/mask), ``local`` this rank's shard.
    Gradients (of ``loss * loss_scale``) accumulate in ``.grad``; on several ranks each
    holds its own part and :func:`all_reduce_grads` sums them.
    """
    q_feats = {k: v.to(device) for k, v in encoder.tokenize(local.queries, "query").items()}
    d_feats = {k: v.to(device) for k, v in encoder.tokenize(local.docs, "doc").items()}
    t_scale = encoder.cfg["temperature"] / temperature if temperature else 1.0

    def loss_of(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        q_all, d_all = gather_with_grad(q.float()), gather_with_grad(d.float())
        scores = encoder.score(q_all, d_all) * t_scale
        return loss_fn(scores, batch)

    def backward(loss: torch.Tensor) -> None:
        scaled = loss * loss_scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()

    if not grad_cache:
        with _autocast(device, precision):
            q = encoder.embed(q_feats, "query")
            d = encoder.embed(d_feats, "doc")
        loss = loss_of(q, d)
        backward(loss)
        return float(loss.detach())

    # GradCache: 1) embeddings without a graph, chunk by chunk, remembering RNG states
    right = getattr(encoder.tokenizer, "padding_side", "right") == "right"
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


# =========================================================================== trainer


@dataclass
class TrainArgs:
    """Trainer knobs (``pipeline.retriever1`` maps onto these by name)."""

    batch_size: int = 32  # global contrastive batch (queries); in-batch negatives span it
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    grad_accum: int = 1  # contrastive batches per optimizer step (negatives do not span them)
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    grad_cache: bool = False
    chunk_size: int = 16
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: CUDA only, with GradScaler)
    temperature: float | None = None  # None: the encoder's own
    mask_false_negatives: bool = True  # drop a query's other judged positives from its softmax
    seed: int = 42
    save_every: int = 0  # optimizer steps between checkpoints in the work dir (0: only at the end)
    log_every: int = 10
    eval_every: int = 0  # optimizer steps between dev evaluations (0: never)
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    step: int
    resumed_from: int | None
    log: list[dict[str, Any]]
    seconds: float  # this process
    seconds_total: float  # including the runs it resumed from (up to their last checkpoint)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (transformers 5: ``activation_checkpointing_enable``; 4.x: the old name)."""
    kwargs = {"use_reentrant": False}  # non-reentrant: works with inputs that need no grad
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_states(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Trainer:
    """Trains ``encoder`` on ``data`` with ``args``; checkpoints into ``work_dir`` and resumes from it.

    ``loss_fn(scores, batch)`` defaults to InfoNCE (masked or not, per ``args.mask_false_negatives``).
    ``evaluator(encoder) -> metrics`` runs every ``eval_every`` steps on rank 0.
    ``name`` appears in log lines (``resuming <name> from step N``).

    ``refresher`` (optional; ANCE, see :class:`retrievers.ance.AnnRefresher`) swaps the
    hard-negative pool during training. It has ``every`` (steps), ``request(encoder, step)``
    (sync: mines now and returns the new pool; async: hands the weights to a worker and
    returns None), ``poll(step)`` (a pool that became ready, or None), ``restore(step)``
    (the pool in force at a checkpointed step, for resuming) and ``close()``. After a swap
    the rest of the current epoch is re-sampled from the new pool (same batch order) and a
    checkpoint is written, so a resumed run sees exactly the batches an uninterrupted one saw.
    """

    def __init__(
        self,
        encoder,
        data: ContrastiveData,
        args: TrainArgs,
        work_dir: str | Path,
        *,
        device: torch.device | str = "cpu",
        loss_fn: LossFn | None = None,
        evaluator: Callable[[Any], dict[str, float]] | None = None,
        name: str = "trainer",
        refresher: Any = None,
    ):
        self.encoder = encoder
        self.data = data
        self.args = args
        self.work = Path(work_dir)
        self.device = torch.device(device)
        if loss_fn is None:
            loss_fn = contrastive_loss if args.mask_false_negatives else contrastive_loss_unmasked
        self.loss_fn = loss_fn
        self.evaluator = evaluator
        self.name = name
        self.refresher = refresher
        self.rank, self.world = dist_info()
        self._check()

    def _check(self) -> None:
        a = self.args
        if a.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision '{a.precision}' unknown; valid choices: fp32, bf16, fp16")
        if a.precision == "fp16" and self.device.type != "cuda":
            log.warning("precision fp16 needs CUDA; training in fp32 on %s (use bf16 for CPU autocast)", self.device)
            a.precision = "fp32"
        if a.batch_size % self.world:
            raise ValueError(f"batch_size {a.batch_size} is not divisible by the world size {self.world}")
        if a.grad_accum < 1 or a.chunk_size < 1:
            raise ValueError("grad_accum and chunk_size must be >= 1")
        if self.data.num_batches(a.batch_size) == 0:
            raise ValueError(
                f"{len(self.data)} training examples make no full batch of {a.batch_size}; lower batch_size"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def batches_per_epoch(self) -> int:
        return self.data.num_batches(self.args.batch_size)

    @property
    def total_steps(self) -> int:
        a = self.args
        if a.max_steps:
            return int(a.max_steps)
        return max(1, math.ceil(a.epochs * self.batches_per_epoch / a.grad_accum))

    # ------------------------------------------------------------------ setup
    def _optimizer(self):
        from transformers import get_linear_schedule_with_warmup

        decay, no_decay = [], []
        for n, p in self.encoder.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.args.lr)
        total = self.total_steps
        warm = self.args.warmup_steps if self.args.warmup_steps is not None else round(self.args.warmup_ratio * total)
        sched = get_linear_schedule_with_warmup(opt, int(warm), total)
        return opt, sched

    def _save(self, opt, sched, scaler, step: int, epoch: int, pos: int) -> None:
        rngs = _rng_states()
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rngs)
            rngs_all = gathered
        else:
            rngs_all = [rngs]
        if self.rank == 0:
            state = {
                "model": self.encoder.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs_all,
                "step": step,
                "epoch": epoch,
                "position": pos,
                "world_size": self.world,
                "total_steps": self.total_steps,
                "batch_size": self.args.batch_size,
                "seconds": self._elapsed(),
                "pending_losses": list(self._pending_losses),
            }
            atomic_torch_save(state, self.work / STATE_FILE)
            log.debug("[%s] checkpoint at step %d -> %s", self.name, step, self.work / STATE_FILE)
        if self.world > 1:
            dist.barrier()

    def _load(self, opt, sched, scaler) -> tuple[int, int, int] | None:
        path = self.work / STATE_FILE
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["batch_size"] != self.args.batch_size or state["total_steps"] != self.total_steps:
            raise RuntimeError(
                f"{path} was written with batch_size={state['batch_size']}, total_steps={state['total_steps']}, "
                f"but this run has {self.args.batch_size}, {self.total_steps}; delete the work dir to start over"
            )
        self.encoder.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) == self.world:
            _set_rng_states(rngs[self.rank])
        else:
            log.warning("[%s] checkpoint from %d rank(s), now %d: RNG states not restored", self.name, len(rngs), self.world)
        self._seconds_before = float(state.get("seconds", 0.0))
        self._pending_losses = list(state.get("pending_losses", []))
        return int(state["step"]), int(state["epoch"]), int(state["position"])

    def _elapsed(self) -> float:
        """Training seconds so far, including those of the runs this one resumed."""
        return self._seconds_before + time.perf_counter() - self._t_start

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        a = self.args
        seed_everything(a.seed + self.rank)
        self.encoder.to(self.device)
        self.encoder.train()
        if a.gradient_checkpointing:
            for m in {id(t): t for t in (self.encoder.tower("query"), self.encoder.tower("doc"))}.values():
                enable_gradient_checkpointing(m)
        broadcast_params(self.encoder)
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        opt, sched = self._optimizer()
        scaler = torch.amp.GradScaler("cuda") if a.precision == "fp16" else None
        if self.rank == 0:
            self.work.mkdir(parents=True, exist_ok=True)
        step, epoch, pos = 0, 0, 0
        self._seconds_before, self._t_start, self._pending_losses = 0.0, time.perf_counter(), []
        resumed = self._load(opt, sched, scaler)
        log_path = self.work / LOG_FILE
        history: list[dict[str, Any]] = []
        if resumed:
            step, epoch, pos = resumed
            log.info("resuming %s from step %d (epoch %d, batch %d)", self.name, step, epoch, pos)
            if log_path.exists():
                history = [r for r in map(json.loads, log_path.read_text().splitlines()) if r["step"] <= step]
        if self.refresher is not None:
            pool = self.refresher.restore(step)
            if pool is not None:
                self.data.set_pool(pool)
        if self.rank == 0:
            tmp = log_path.with_name(LOG_FILE + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
            os.replace(tmp, log_path)
        total = self.total_steps
        log.info(
            "[%s] %d examples, batch %d x %d accum on %d rank(s), %d hard negative(s) each, %d steps "
            "(%d batches/epoch), lr %g, %s%s on %s",
            self.name, len(self.data), a.batch_size, a.grad_accum, self.world, self.data.n_negatives, total,
            self.batches_per_epoch, a.lr, a.precision, ", grad cache" if a.grad_cache else "", self.device,
        )
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=self.name, unit="step", disable=not (a.progress and self.rank == 0),
                   mininterval=2, dynamic_ncols=True)
        t_start = self._t_start = time.perf_counter()
        # losses of the steps since the last log line (restored on resume, so the log is the same)
        t_log, ex_log, losses = time.perf_counter(), 0, self._pending_losses
        accum = 0
        opt.zero_grad(set_to_none=True)
        while step < total:
            batches = self.data.epoch_batches(epoch, a.seed, a.batch_size)
            while pos < len(batches) and step < total:
                batch = batches[pos]
                pos += 1
                loss = contrastive_step(
                    self.encoder, batch, batch.shard(self.rank, self.world), device=self.device,
                    loss_fn=self.loss_fn, grad_cache=a.grad_cache, chunk_size=a.chunk_size,
                    precision=a.precision, temperature=a.temperature, loss_scale=1.0 / a.grad_accum, scaler=scaler,
                )
                if not math.isfinite(loss):
                    raise FloatingPointError(f"[{self.name}] loss is {loss} at step {step + 1}; lower lr or use fp32")
                losses.append(loss)
                ex_log += len(batch)
                accum += 1
                if accum < a.grad_accum:
                    continue
                accum = 0
                all_reduce_grads(params)
                if scaler is not None:
                    scaler.unscale_(opt)
                gnorm = (
                    float(nn.utils.clip_grad_norm_(params, a.max_grad_norm)) if a.max_grad_norm else float("nan")
                )
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if step % max(1, a.log_every) == 0 or step == total:
                    dt = time.perf_counter() - t_log
                    rec = {
                        "step": step,
                        "epoch": epoch + pos / len(batches),
                        "loss": float(np.mean(losses)),
                        "lr": sched.get_last_lr()[0],
                        "grad_norm": gnorm,
                        "examples_per_s": ex_log / dt if dt > 0 else float("nan"),
                        "seconds": self._elapsed(),  # cumulative over resumed runs
                    }
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", ex_s=f"{rec['examples_per_s']:.1f}")
                    self._record(rec, history, log_path)
                    t_log, ex_log, losses = time.perf_counter(), 0, []
                    self._pending_losses = losses
                if a.eval_every and self.evaluator is not None and step % a.eval_every == 0:
                    self._evaluate(step, history, log_path)
                swapped = False
                if self.refresher is not None and step < total:
                    swapped = self._refresh(step)
                    if swapped:  # the rest of this epoch: same order, negatives from the new pool
                        batches = self.data.epoch_batches(epoch, a.seed, a.batch_size)
                if step < total and (swapped or (a.save_every and step % a.save_every == 0)):
                    self._save(opt, sched, scaler, step, epoch, pos)
            if pos >= len(batches):
                epoch, pos = epoch + 1, 0
        bar.close()
        if self.refresher is not None:
            self.refresher.close()
        self._save(opt, sched, scaler, step, epoch, pos)
        self.encoder.eval()
        return TrainResult(
            step, resumed[0] if resumed else None, history, time.perf_counter() - t_start, self._elapsed()
        )

    def _refresh(self, step: int) -> bool:
        """Ask the refresher for new negatives at this step; True when the pool was swapped."""
        r = self.refresher
        pool = None
        if self.rank == 0:
            if r.every and step % r.every == 0:
                pool = r.request(self.encoder, step)
                self.encoder.train()
            if pool is None:
                pool = r.poll(step)
        if self.world > 1:  # rank 0 mines; every rank trains on the same pool
            box = [pool]
            dist.broadcast_object_list(box, src=0)
            pool = box[0]
        if pool is None:
            return False
        self.data.set_pool(pool)
        return True

    def _record(self, rec: dict[str, Any], history: list, log_path: Path) -> None:
        history.append(rec)
        if self.rank == 0:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            log.info(
                "[%s] step %d  loss %.4f  lr %.2e  %.1f ex/s",
                self.name, rec["step"], rec["loss"], rec["lr"], rec["examples_per_s"],
            )

    def _evaluate(self, step: int, history: list, log_path: Path) -> None:
        if self.rank == 0:
            t0 = time.perf_counter()
            metrics = self.evaluator(self.encoder)
            self.encoder.train()
            rec = {"step": step, "eval": metrics, "eval_seconds": time.perf_counter() - t0}
            history.append(rec)
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            log.info("[%s] step %d dev %s", self.name, step, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.world > 1:
            dist.barrier()


# =========================================================================== dev evaluation & plots


def brute_force_eval(
    encoder,
    doc_ids: list[str],
    doc_texts: list[str],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    *,
    metrics: Sequence[str] = ("ndcg@10", "recall@100"),
    depth: int = 100,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    doc_emb: np.ndarray | None = None,
) -> dict[str, float]:
    """Exact (brute-force) dense retrieval of ``queries`` over the documents, scored with ranx."""
    from pipelines.evaluation import evaluate

    if doc_emb is None:
        doc_emb = encoder.encode(doc_texts, "doc", batch_size=batch_size, device=device, progress=False)
    qids = list(queries)
    q_emb = encoder.encode([queries[q] for q in qids], "query", batch_size=batch_size, device=device, progress=False)
    with torch.inference_mode():
        s = encoder.score(torch.from_numpy(q_emb), torch.from_numpy(doc_emb))
        top = torch.topk(s, k=min(depth, s.shape[1]), dim=1)
    run = {
        q: {doc_ids[j]: float(v) for j, v in zip(top.indices[i].tolist(), top.values[i].tolist())}
        for i, q in enumerate(qids)
    }
    means, _ = evaluate({q: qrels[q] for q in qids if q in qrels}, run, list(metrics))
    return means


def plot_loss(history: list[dict[str, Any]], path: Path, title: str = "training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#4c72b0", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if evals:
        key = next(iter(evals[0]["eval"]))
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], "o-", color="#dd8452", label=f"dev {key}")
        ax2.set_ylabel(f"dev {key}")
        fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
