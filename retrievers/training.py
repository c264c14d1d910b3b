"""The resumable contrastive bi-encoder trainer (retriever1, retriever2, distill).

What each step computes, and from which papers, is in :mod:`retrievers.contrastive`.
Checkpoints (``trainer_state.pt`` in the work dir) hold model, optimizer, scheduler,
grad-scaler and RNG states (per rank), the step, the epoch and the position in the
epoch's batch order; they are written to a temporary file and renamed, so a kill
never leaves a half-written one. Batch order and negative sampling are a pure
function of (seed, epoch), so a resumed run replays exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from retrievers.contrastive import (
    ContrastiveData,
    LossFn,
    contrastive_loss,
    contrastive_loss_unmasked,
    contrastive_step,
)
from retrievers.distributed import all_reduce_grads, broadcast_params, dist_info
from retrievers.proc import failpoint
from retrievers.train_utils import (
    _rng_states,
    _set_rng_states,
    atomic_torch_save,
    seed_everything,
)

log = logging.getLogger("drlab")

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


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
    length_sort: bool = False  # forward each batch in length-sorted chunks of chunk_size (same loss, less padding)
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
        self.padding = {"tokens": 0, "padded": 0, "padded_unsorted": 0}  # this process's steps (contrastive_step)
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
            failpoint(f"checkpoint:{self.name}:{step}")
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
                    length_sort=a.length_sort, padding=self.padding,
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
