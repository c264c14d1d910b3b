"""The pre-training loop and its corpus: what the ``pretrain`` stage runs for any method.

The method (``model.pretrain``, a ``_target_`` builder: SimLM, RetroMAE, Contriever, ICT, or
``no_pretraining``) is a module with ``loss(texts) -> (loss, logs)``, optional ``after_step()``
and ``backbone()``. :func:`pretrain_loop` trains it on passages with AdamW, linear warm-up and
decay, gradient clipping, optional bf16 autocast, and a resumable state (model, optimiser,
scheduler, step, RNG) every ``save_every`` steps. :func:`embedding_spread` is the collapse
diagnostic (mean pairwise cosine of passage vectors; near 1 = one vector for everything).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from retrievers.errors import ConfigError

log = logging.getLogger("drlab")

STATE = "pretrain_state.pt"


def corpus_texts(data: dict, extra: list[str], metadata: bool = False) -> tuple[list[str], list[dict]]:
    """Passages of the dataset's corpus and of ``extra`` BEIR corpora beside it.

    Returns (texts, docs); ``docs`` (title, text and, with ``metadata``, the corpus line's
    ``metadata`` object) only when ``metadata`` is asked for (ICT's BFS / WLP need it).
    """
    from retrievers.data import load_dataset

    texts, docs = [], []
    roots = [(data, data["path"])]
    for name in extra or []:
        path = str(Path(data["path"]).parent / name)
        if not (Path(path) / "corpus.jsonl").exists():
            raise ConfigError(
                f"pipeline.pretrain.extra_corpora names '{name}', but {path}/corpus.jsonl does not exist "
                f"(extra corpora are BEIR directories next to {data['path']})"
            )
        roots.append(({**data, "name": name, "path": path, "train_split": None, "eval_split": None}, path))
    for d, path in roots:
        ds = load_dataset(d, [], with_corpus=True)
        meta: dict[str, dict] = {}
        if metadata and d.get("format", "beir") == "beir":
            with open(Path(path) / "corpus.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        o = json.loads(line)
                        if o.get("metadata"):
                            meta[str(o["_id"])] = o["metadata"]
        for did, doc in ds.corpus.items():
            t = f"{doc.get('title', '')} {doc.get('text', '')}".strip()
            if t:
                texts.append(t)
                if metadata:
                    docs.append({**doc, "metadata": meta.get(did, {})})
    return texts, docs


def embedding_spread(encoder, texts: list[str], n: int = 256, seed: int = 0) -> float:
    """Mean pairwise cosine of the encoder's document vectors for ``n`` sampled passages.

    Near 1 means every passage gets almost the same vector: contrastive fine-tuning then starts
    at a near-uniform softmax (README, section Pre-training, for what it predicted there).
    """
    if len(texts) < 2:
        return float("nan")
    idx = np.random.default_rng(int(seed)).choice(len(texts), size=min(int(n), len(texts)), replace=False)
    v = encoder.encode([texts[i] for i in idx], "doc", batch_size=64, progress=False)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sims = v @ v.T
    k = len(v)
    return float((sims.sum() - np.trace(sims)) / (k * (k - 1)))


def pretrain_loop(method, texts: list[str], *, batch_size: int, epochs: float, max_steps: int | None, lr: float,
                  weight_decay: float, warmup_ratio: float, max_grad_norm: float, precision: str, save_every: int | None,
                  log_every: int, seed: int, work: Path, device, progress: bool = True,
                  name: str = "pretrain", on_log=None) -> tuple[list[dict], int, float]:
    """Resumable training of ``method`` on ``texts``; returns (log, steps, seconds).

    ``on_log(record)``, when given, is called after each logged step with its log record (it may add keys:
    ``scripts/pretrain_probe.py`` measures the [CLS] vectors there)."""
    from tqdm.auto import tqdm

    from retrievers.train_utils import _rng_states, _set_rng_states, adamw_linear, atomic_torch_save

    bs = int(batch_size)
    precision = str(precision)
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"pipeline.pretrain.precision is '{precision}'; valid choices: fp32, bf16")
    per_epoch = max(1, len(texts) // bs)
    if max_steps is not None:
        total = int(max_steps)
    else:
        total = max(1, math.ceil(float(epochs) * per_epoch))
    if total == 0 or not getattr(method, "trainable", True):  # NoPretraining: the init as it is
        return [], 0, 0.0
    params = [x for x in method.parameters() if x.requires_grad]
    opt, sched = adamw_linear(params, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, total=total)
    Path(work).mkdir(parents=True, exist_ok=True)
    step, history, secs_before = 0, [], 0.0
    path = work / STATE
    if path.exists():
        st = torch.load(path, map_location="cpu", weights_only=False)
        method.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        _set_rng_states(st["rng"])
        if st.get("method_rng") is not None and hasattr(method, "rng"):
            method.rng.bit_generator.state = st["method_rng"]
        step, history, secs_before = int(st["step"]), list(st["history"]), float(st.get("seconds", 0.0))
        log.info("resuming %s from step %d", name, step)
    method.to(device).train()
    bar = tqdm(total=total, initial=step, desc=name, unit="step", disable=not progress, mininterval=2)
    t_start = t_log = time.perf_counter()
    losses, parts, n_pass, n_tok = [], {}, 0, 0
    while step < total:
        epoch, pos = divmod(step, per_epoch)
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(texts))
        batch = [texts[i] for i in order[pos * bs : (pos + 1) * bs]]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, logs = method.loss(batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"[{name}] loss is {loss.item()} at step {step + 1}; lower pipeline.pretrain.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(max_grad_norm))
        opt.step()
        sched.step()
        if hasattr(method, "after_step"):
            method.after_step()
        step += 1
        bar.update(1)
        losses.append(loss.item())
        for k, v in logs.items():
            if k != "tokens":
                parts.setdefault(k, []).append(float(v))
        n_pass += len(batch)
        n_tok += int(logs.get("tokens", 0))
        if step % int(log_every) == 0 or step == total:
            dt = max(1e-9, time.perf_counter() - t_log)
            rec = {"step": step, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                   "passages_per_s": n_pass / dt, "tokens_per_s": n_tok / dt,
                   **{k: float(np.mean(v)) for k, v in parts.items()}}
            if on_log is not None:
                on_log(rec)
                method.train()
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            log.info("[%s] step %d  loss %.4f  %s  %.1f passages/s, %.0f tokens/s", name, step, rec["loss"],
                     "  ".join(f"{k} {np.mean(v):.3f}" for k, v in parts.items()), rec["passages_per_s"],
                     rec["tokens_per_s"])
            t_log, losses, parts, n_pass, n_tok = time.perf_counter(), [], {}, 0, 0
        if save_every and step % int(save_every) == 0 and step < total:
            atomic_torch_save({"model": method.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "rng": _rng_states(), "step": step,
                               "method_rng": method.rng.bit_generator.state if hasattr(method, "rng") else None,
                               "history": history, "seconds": secs_before + time.perf_counter() - t_start}, path)
    bar.close()
    method.eval()
    return history, step, secs_before + time.perf_counter() - t_start
