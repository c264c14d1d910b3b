"""Family ``ance``: Approximate nearest neighbour Negative Contrastive Estimation.

Xiong et al., ICLR 2021, "Approximate Nearest Neighbor Negative Contrastive Learning
for Dense Text Retrieval". Paper recipe: RoBERTa-base, one shared tower, the first
token's vector through a linear layer + LayerNorm (``first_token_head``), dot product;
warm-up on BM25 negatives (BM25 Warm Up), then training on negatives retrieved from an
ANN index of the corpus built with a recent checkpoint. An inference process re-encodes
the corpus and rebuilds the index every ~10k training steps while the trainer keeps
going on the previous negatives (asynchronous refresh).

Chain here: ``bm25 -> retriever1 (BM25 warm-up) -> mine (ANN negatives of the warm-up
model) -> retriever2 (refresh_every) -> index -> eval``. :class:`AnnRefresher` is the
refresh, handed to :class:`retrievers.training.Trainer`:

* ``refresh_mode: sync`` (single machine): every ``refresh_every`` optimizer steps the
  trainer stops, re-encodes the corpus with its current weights, rebuilds the FAISS
  index, re-mines (:class:`retrievers.mining.DenseMiner` -- the index stage's encoding,
  index and search code) and continues on the new negatives. Deterministic: a resumed
  run replays the same negatives.
* ``refresh_mode: async`` (the paper's design, for several GPUs): at each refresh step
  the trainer writes its weights to ``refresh/request_stepN.pt`` and goes on; a worker
  process (``torch.multiprocessing`` spawn, on ``refresh_device``) loads the newest
  request, encodes, mines and writes ``refresh/negatives_stepN.jsonl``; the trainer polls
  every step and swaps the pool as soon as a file is ready (a request still in flight
  when a newer one arrives is skipped, as ANCE uses the latest checkpoint). Which step
  adopts which negatives depends on timing, so async runs are not bit-reproducible.

Every refresh is logged to ``refresh_log.jsonl`` (requested step, adopted step, seconds,
overlap of the new negatives with the previous pool, mean negatives per query).

What differs from the paper: offline the default init is all-MiniLM-L6-v2 (no RoBERTa
ships here), so the head is initialised to the identity (linear) and unit LayerNorm, and
scoring is cosine / 0.05 as in the dpr family (the paper: dot product); the refresh
interval is in optimizer steps of a small dataset (SciFact: ~100 steps, not 10k); the
mined window and sample size are ``pipeline.mine.window`` / ``n_per_query``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from retrievers import token_cache
from retrievers.encoder import BiEncoder, build_biencoder
from retrievers.mining import overlap, read_negatives, write_negatives

log = logging.getLogger("drlab")


def build(
    checkpoint: str,
    shared: bool,
    pooling: str,
    normalize: bool,
    similarity: str,
    temperature: float,
    query_max_len: int,
    doc_max_len: int,
    head_init: str,
    local_dirs: dict | None,
) -> BiEncoder:
    enc = build_biencoder(
        checkpoint,
        shared=shared,
        pooling=pooling,
        normalize=normalize,
        similarity=similarity,
        temperature=temperature,
        query_max_len=query_max_len,
        doc_max_len=doc_max_len,
        local_dirs=local_dirs,
    )
    head = getattr(enc, "head", None)
    if head is not None and head_init == "identity" and not _head_was_loaded(checkpoint):
        with torch.no_grad():
            lin = head[0]
            if lin.weight.shape[0] == lin.weight.shape[1]:
                lin.weight.copy_(torch.eye(lin.weight.shape[0]))
                lin.bias.zero_()
    return enc


def refresher_for(ds, split: str, encoder, mine_cfg: dict, seed: int, runtime: dict, *, every: int, work: Path,
                  initial_pool: dict[str, list[str]], mine_run: Path, encoder_cfg: dict, checkpoint: Path | None,
                  mode: str, device: str | None, max_lag: int | None, doc_max_len: int,
                  precision: str = "fp32") -> "AnnRefresher":
    """The :class:`AnnRefresher` of the retriever2 stage: mines like the mine stage (``mine_cfg``).

    ``mine_run``: the mine stage's train run; the first refresh reports how many of its candidates
    are new against it (after a resume the comparison is with it again, not with the last
    refresh before the kill).
    """
    from retrievers.encoder import resolve_device
    from retrievers.evaluation import read_trec, trec_order
    from retrievers.mining import miner_from_config, window_sets

    miner = miner_from_config(ds, split, encoder, mine_cfg, seed, runtime,
                              doc_max_len=mine_cfg["doc_max_len"] or doc_max_len, precision=precision)
    if Path(mine_run).exists():
        ranked = {q: trec_order(d) for q, d in read_trec(mine_run).items() if q in miner.positives}
        miner.prev_window = window_sets(ranked, miner.positives, miner.window)
    return AnnRefresher(
        miner, every, work, initial_pool=initial_pool, mode=str(mode),
        encoder_spec=(encoder_cfg, str(checkpoint) if checkpoint else None),
        device=str(resolve_device(str(device or runtime["device"]))), max_lag=max_lag,
    )


def plot_refresh(recs: list[dict], path) -> None:
    """Overlap of each refresh's negatives with the previous ones, by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in recs], [r["overlap_with_previous"] for r in recs], marker="o")
    ax.set_xlabel("optimizer step of the refresh")
    ax.set_ylabel("overlap with previous negatives")
    ax.set_ylim(0, 1)
    ax.set_title("ANCE refresh")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _head_was_loaded(checkpoint: str) -> bool:
    """True when ``checkpoint`` is a dr-lab checkpoint that carries a trained head."""
    p = Path(str(checkpoint))
    return p.is_dir() and (p / "drlab_encoder.json").exists() and any(p.glob("head*"))


# --------------------------------------------------------------------------- refresh


def mine_at_step(miner, encoder, emb_dir: Path, step: int):
    """``miner(encoder, emb_dir)`` with its sampling seed drawn from (seed, step): ANCE samples afresh at every
    refresh (not the same rank positions each time), and a resumed run replays the same negatives."""
    import numpy as np

    base = miner.seed
    miner.seed = int(np.random.SeedSequence([int(base), int(step)]).generate_state(1)[0])
    try:
        return miner(encoder, emb_dir)
    finally:
        miner.seed = base


class AnnRefresher:
    """Re-mines hard negatives with the weights being trained (see the module docstring).

    ``miner``: a :class:`retrievers.mining.DenseMiner`; ``every``: optimizer steps between
    refreshes; ``work_dir``: where ``refresh/`` (negatives files, requests, embeddings)
    and ``refresh_log.jsonl`` live; ``initial_pool``: the negatives training starts on
    (for the overlap of the first refresh); ``mode``: ``sync`` or ``async``;
    ``encoder_spec`` (async only): ``(encoder_cfg dict, init checkpoint)`` from which the
    worker builds its own copy of the encoder; ``device``: the worker's device;
    ``max_lag`` (async only): the trainer waits for the negatives of a request once it
    is this many steps old (bounded staleness; None: never waits).
    """

    def __init__(
        self,
        miner,
        every: int,
        work_dir: str | Path,
        *,
        initial_pool: dict[str, list[str]] | None = None,
        mode: str = "sync",
        encoder_spec: tuple[dict, str | None] | None = None,
        device: str = "cpu",
        keep_files: int = 2,
        max_lag: int | None = None,
    ):
        if mode not in ("sync", "async"):
            raise ValueError(f"refresh_mode '{mode}' unknown; valid choices: sync, async")
        if mode == "async" and encoder_spec is None:
            raise ValueError("async refresh needs encoder_spec=(encoder_cfg, init checkpoint) for its worker")
        self.miner = miner
        self.every = int(every)
        self.work = Path(work_dir)
        self.dir = self.work / "refresh"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "refresh_log.jsonl"
        self.mode = mode
        self.encoder_spec = encoder_spec
        self.device = device
        self.keep_files = keep_files
        self.max_lag = max_lag
        self.current = initial_pool or {}
        self._proc = None
        self._requested: dict[int, float] = {}
        self._adopted_step = max([r["requested_step"] for r in self.records()] or [0])

    # ---------------------------------------------------------------- log
    def records(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(x) for x in self.log_path.read_text().splitlines() if x.strip()]

    def _negs_path(self, step: int) -> Path:
        return self.dir / f"negatives_step{step:07d}.jsonl"

    def _adopt(self, requested: int, step: int, seconds: float, negs_path: Path, stats: dict) -> dict[str, list[str]]:

        pool = read_negatives(negs_path)
        rec = {
            "requested_step": requested,
            "step": step,
            "seconds": round(seconds, 2),
            "overlap_with_previous": round(overlap(self.current, pool), 4),
            "negatives_per_query": round(sum(map(len, pool.values())) / max(1, len(pool)), 2),
            "file": negs_path.name,
            "mode": self.mode,
            **{k: stats[k] for k in ("window_overlap_with_previous", "encode_seconds", "search_seconds", "worker_pid")
               if k in stats},
        }
        # a resumed run rewrites the records after the step it resumed from
        kept = [r for r in self.records() if r["step"] < step]
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept + [rec]))
        os.replace(tmp, self.log_path)
        log.info(
            "[refresh] step %d: new negatives (requested at step %d) in %.1fs, %.1f%% overlap with the previous pool",
            step, requested, seconds, 100 * rec["overlap_with_previous"],
        )
        self.current = pool
        self._adopted_step = requested
        self._requested = {s: t for s, t in self._requested.items() if s > requested}
        self._prune()
        return pool

    def _prune(self) -> None:
        keep = {r["file"] for r in self.records()[-self.keep_files:]}
        for p in self.dir.glob("negatives_step*.jsonl"):
            if p.name not in keep and int(p.stem.split("step")[1]) < self._adopted_step:
                p.unlink(missing_ok=True)

    # ---------------------------------------------------------------- trainer hooks
    def request(self, encoder, step: int) -> dict[str, list[str]] | None:
        if self.mode == "async":
            self._ensure_worker()
            from retrievers.train_utils import atomic_torch_save

            sd = {k: v.detach().to("cpu") for k, v in encoder.state_dict().items()}
            atomic_torch_save(sd, self.dir / f"request_step{step:07d}.pt")
            self._requested[step] = time.perf_counter()
            log.info("[refresh] step %d: weights handed to the refresh worker; training goes on", step)
            return None
        t0 = time.perf_counter()
        emb_dir = self.dir / f"emb_step{step:07d}"
        shutil.rmtree(emb_dir, ignore_errors=True)
        log.info("[refresh] step %d: re-encoding %d docs and re-mining %d queries",
                 step, len(self.miner.doc_ids), len(self.miner.queries))
        _, negs, stats = mine_at_step(self.miner, encoder, emb_dir, step)
        shutil.rmtree(emb_dir, ignore_errors=True)
        path = self._negs_path(step)
        write_negatives(path, negs, self.miner.positives)
        return self._adopt(step, step, time.perf_counter() - t0, path, stats)

    def poll(self, step: int) -> dict[str, list[str]] | None:
        if self.mode != "async":
            return None
        self._check_worker()
        ready = self._ready()
        pending = [s for s in self._requested if s > self._adopted_step]
        if not ready and pending and self.max_lag is not None and step - min(pending) >= self.max_lag:
            log.info("[refresh] step %d: waiting for the negatives requested at step %d (max_lag %d)",
                     step, min(pending), self.max_lag)
            while not ready:
                time.sleep(0.1)
                self._check_worker(dead_is_error=True)
                ready = self._ready()
        if not ready:
            return None
        path = ready[-1]
        req = int(path.stem.split("step")[1])
        t_req = self._requested.get(req)
        stats_path = path.with_suffix(".stats.json")
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        seconds = time.perf_counter() - t_req if t_req is not None else float(stats.get("seconds", 0.0))
        return self._adopt(req, step, seconds, path, stats)

    def _ready(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("negatives_step*.jsonl")
                      if int(p.stem.split("step")[1]) > self._adopted_step)

    def restore(self, step: int) -> dict[str, list[str]] | None:
        """The pool in force after optimizer step ``step`` (None: the initial one)."""
        recs = [r for r in self.records() if r["step"] <= step]
        if not recs:
            self._adopted_step = 0
            return None
        path = self.dir / recs[-1]["file"]
        if not path.exists():
            raise RuntimeError(f"{self.log_path} names {path}, which is gone; delete {self.work} to start over")
        self.current = read_negatives(path)
        self._adopted_step = recs[-1]["requested_step"]
        log.info("[refresh] resuming with the negatives of the refresh at step %d (%s)", recs[-1]["step"], path.name)
        return self.current

    def close(self) -> None:
        if self._proc is None:
            return
        (self.dir / "STOP").touch()
        self._proc.join(timeout=60)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._proc = None
        for p in self.dir.glob("request_step*.pt"):
            p.unlink(missing_ok=True)
        (self.dir / "STOP").unlink(missing_ok=True)

    # ---------------------------------------------------------------- async worker
    def _ensure_worker(self) -> None:
        if self._proc is not None:
            return
        import torch.multiprocessing as mp

        (self.dir / "STOP").unlink(missing_ok=True)
        ctx = mp.get_context("spawn")
        self._proc = ctx.Process(
            target=refresh_worker, args=(self.miner, self.encoder_spec, str(self.dir), self.device, os.getpid(),
                                         0.2, token_cache.directory()),
            daemon=True
        )
        self._proc.start()
        log.info("[refresh] started the refresh worker (pid %d, %s)", self._proc.pid, self.device)

    def _check_worker(self, dead_is_error: bool = False) -> None:
        if self._proc is None or self._proc.is_alive():
            return
        if self._proc.exitcode not in (0, None) or dead_is_error:
            err = self.dir / "worker_error.txt"
            detail = err.read_text()[-2000:] if err.exists() else "(no traceback written)"
            raise RuntimeError(f"the refresh worker died (exit code {self._proc.exitcode}):\n{detail}")


def refresh_worker(miner, encoder_spec, refresh_dir: str, device: str, parent_pid: int | None = None,
                   poll_s: float = 0.2, token_dir: str | None = None) -> None:
    """The inference process of the async refresh: newest request -> negatives file, until STOP
    (``token_dir``: the parent's token-id cache, so each refresh reads the corpus's ids)."""
    from retrievers.encoder import instantiate_encoder
    from retrievers.proc import die_with_parent

    die_with_parent(parent_pid)  # a kill -9 of the trainer must not leave this process running
    token_cache.configure(token_dir)

    d = Path(refresh_dir)
    try:
        torch.set_num_threads(max(1, int(os.environ.get("DRLAB_REFRESH_THREADS", "1"))))
        cfg, init = encoder_spec
        encoder = instantiate_encoder(cfg, checkpoint=init)
        miner.device = device
        miner.progress = False
        while not (d / "STOP").exists():
            reqs = sorted(d.glob("request_step*.pt"))
            if not reqs:
                time.sleep(poll_s)
                continue
            newest = reqs[-1]
            for old in reqs[:-1]:  # superseded before the worker got to them
                old.unlink(missing_ok=True)
            step = int(newest.stem.split("step")[1])
            t0 = time.perf_counter()
            encoder.load_state_dict(torch.load(newest, map_location="cpu"))
            emb_dir = d / f"emb_step{step:07d}"
            shutil.rmtree(emb_dir, ignore_errors=True)
            _, negs, stats = mine_at_step(miner, encoder, emb_dir, step)
            shutil.rmtree(emb_dir, ignore_errors=True)
            out = d / f"negatives_step{step:07d}.jsonl"
            stats["seconds"] = round(time.perf_counter() - t0, 2)
            stats["worker_pid"] = os.getpid()
            out.with_suffix(".stats.json").write_text(json.dumps(stats))
            write_negatives(out, negs, miner.positives)  # last: its appearance is the signal
            newest.unlink(missing_ok=True)
    except BaseException:
        (d / "worker_error.txt").write_text(traceback.format_exc())
        raise
