"""Stage ``pretrain``: retrieval-oriented pre-training on raw corpus text.

The method is ``model.pretrain`` (a ``_target_`` builder returning a module with
``loss(texts) -> (loss, logs)``, optional ``after_step()`` and ``backbone()``):

* SimLM replaced-LM with a representation bottleneck (:mod:`retrievers.simlm`),
* RetroMAE masked auto-encoding with enhanced decoding (:mod:`retrievers.retromae`),
* Contriever cropping + MoCo (:mod:`retrievers.contriever`),
* ICT inverse cloze (and BFS / WLP when the corpus has the metadata) (:mod:`retrievers.ict`),
* ``retrievers.pretraining.no_pretraining``: no steps, only the (random or given) init --
  the "no pre-training" row, so every row starts from the same seeded weights.

Text: every passage (``title + " " + text``) of the dataset's corpus plus the corpora named
in ``pipeline.pretrain.extra_corpora`` (BEIR directories next to the dataset, e.g.
``[nfcorpus]``). Training: ``batch_size`` passages per step, AdamW with linear warm-up and
decay, gradient clipping, ``max_steps`` (or ``epochs``); a resumable state (model, optimiser,
scheduler, step, RNG) is written to the work dir every ``save_every`` steps; a progress bar
and ``train_log.jsonl`` with loss parts and passages/s and tokens/s. ``precision: bf16`` runs
the forward pass under bf16 autocast (weights and optimiser stay fp32; on CPUs with AMX, as
here, the vocabulary heads of SimLM / RetroMAE run about 1.5x faster).

Also records ``doc_mean_cosine`` (mean pairwise cosine of 256 passages' vectors; near 1 = every
passage gets almost the same vector). It is a diagnostic, not a verdict: on SciFact the random-init
small BERT (0.991, mean pooling) fine-tunes well, SimLM's 275-step checkpoint (0.9975, [CLS]) does not.

Writes ``backbone/`` (the pre-trained encoder as a plain Hugging Face ``AutoModel`` directory;
decoders, generators and momentum encoders are dropped) and ``checkpoint/`` (the family's
bi-encoder built on it: what ``retriever1``, or ``index`` for unsupervised families, starts
from), ``train_log.jsonl``, ``loss.png``, ``pretrain_stats.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipelines.executor import ConfigError, Context, Stage

log = logging.getLogger("drlab")

STATE = "pretrain_state.pt"


def corpus_texts(data: dict, extra: list[str], metadata: bool = False) -> tuple[list[str], list[dict]]:
    """Passages of the dataset's corpus and of ``extra`` BEIR corpora beside it.

    Returns (texts, docs); ``docs`` (title, text and, with ``metadata``, the corpus line's
    ``metadata`` object) only when ``metadata`` is asked for (ICT's BFS / WLP need it).
    """
    from pipelines.data import load_dataset

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


def pretrain_loop(method, texts: list[str], p: dict, seed: int, work: Path, device, progress: bool = True,
                  name: str = "pretrain") -> tuple[list[dict], int, float]:
    """Resumable training of ``method`` on ``texts``; returns (log, steps, seconds)."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from retrievers.training import _rng_states, _set_rng_states, atomic_torch_save

    bs = int(p.get("batch_size", 32))
    precision = str(p.get("precision", "fp32"))
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"pipeline.pretrain.precision is '{precision}'; valid choices: fp32, bf16")
    per_epoch = max(1, len(texts) // bs)
    if p.get("max_steps") is not None:
        total = int(p["max_steps"])
    else:
        total = max(1, math.ceil(float(p.get("epochs", 1)) * per_epoch))
    if total == 0 or not getattr(method, "trainable", True):  # NoPretraining: the init as it is
        return [], 0, 0.0
    params = [x for x in method.parameters() if x.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(p.get("lr", 1e-4)), weight_decay=float(p.get("weight_decay", 0.01)))
    sched = get_linear_schedule_with_warmup(opt, round(float(p.get("warmup_ratio", 0.1)) * total), max(1, total))
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
        torch.nn.utils.clip_grad_norm_(params, float(p.get("max_grad_norm", 1.0)))
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
        if step % int(p.get("log_every", 10)) == 0 or step == total:
            dt = max(1e-9, time.perf_counter() - t_log)
            rec = {"step": step, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                   "passages_per_s": n_pass / dt, "tokens_per_s": n_tok / dt,
                   **{k: float(np.mean(v)) for k, v in parts.items()}}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            log.info("[%s] step %d  loss %.4f  %s  %.1f passages/s, %.0f tokens/s", name, step, rec["loss"],
                     "  ".join(f"{k} {np.mean(v):.3f}" for k, v in parts.items()), rec["passages_per_s"],
                     rec["tokens_per_s"])
            t_log, losses, parts, n_pass, n_tok = time.perf_counter(), [], {}, 0, 0
        if p.get("save_every") and step % int(p["save_every"]) == 0 and step < total:
            atomic_torch_save({"model": method.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "rng": _rng_states(), "step": step,
                               "method_rng": method.rng.bit_generator.state if hasattr(method, "rng") else None,
                               "history": history, "seconds": secs_before + time.perf_counter() - t_start}, path)
    bar.close()
    method.eval()
    return history, step, secs_before + time.perf_counter() - t_start


def run(ctx: Context) -> dict[str, float]:
    from hydra.utils import instantiate

    from retrievers.encoder import instantiate_encoder, resolve_device
    from retrievers.training import plot_loss, seed_everything

    p = OmegaConf.to_container(ctx.cfg.pipeline.pretrain, resolve=True)
    if ctx.cfg.model.get("pretrain") is None:  # present but null (a missing node fails at plan time)
        raise ConfigError(
            f"stage pretrain needs model.pretrain (a _target_ pre-training method); model '{ctx.cfg.model.name}' has "
            f"none. Fix: use a family with one (simlm, contriever, retromae, ict) or drop pretrain from model.chain."
        )
    data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    torch.set_num_threads(int(ctx.runtime.threads))
    device = resolve_device(str(ctx.runtime.device))
    seed_everything(int(ctx.cfg.seed))
    random.seed(int(ctx.cfg.seed))
    method = instantiate(ctx.cfg.model.pretrain)
    wants_meta = hasattr(method, "set_corpus")  # ICT's BFS / WLP need the documents' metadata
    texts, docs = corpus_texts(data, list(p.get("extra_corpora") or []), metadata=wants_meta)
    if not texts:
        raise ConfigError(f"no text to pre-train on in {data['path']}/corpus.jsonl (+ {p.get('extra_corpora')})")
    if wants_meta:
        method.set_corpus(docs)
    log.info("[pretrain] %s on %d passages (%s + %s)", type(method).__name__, len(texts), data["name"],
             p.get("extra_corpora") or [])
    history, steps, seconds = pretrain_loop(method, texts, p, int(ctx.cfg.seed), ctx.work, device,
                                            progress=bool(ctx.runtime.get("progress", True)))
    method.to("cpu")
    backbone, tokenizer = method.backbone(), method.tokenizer
    backbone.save_pretrained(ctx.out / "backbone", safe_serialization=True)
    tokenizer.save_pretrained(ctx.out / "backbone")
    encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=ctx.out / "backbone")
    encoder.save(ctx.out / "checkpoint")
    spread = round(embedding_spread(encoder, texts, seed=int(ctx.cfg.seed)), 4)
    log.info("[pretrain] document vectors: mean pairwise cosine %.4f on 256 passages (near 1: collapsed)", spread)
    (ctx.out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if history:
        plot_loss(history, ctx.out / "loss.png", title=f"pretrain ({type(method).__name__}) on {data['name']}")
    stats = {"method": type(method).__name__, "passages": len(texts), "steps": steps, "seconds": round(seconds, 2),
             "doc_mean_cosine": spread,
             "extra_corpora": p.get("extra_corpora") or [], **getattr(method, "describe", lambda: {})()}
    (ctx.out / "pretrain_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    metrics = {"steps": float(steps), "passages": float(len(texts)), "seconds": round(seconds, 2),
               "doc_mean_cosine": spread}
    if history:
        metrics["final_loss"] = history[-1]["loss"]
        metrics["tokens_per_s"] = round(float(np.mean([r["tokens_per_s"] for r in history])), 1)
    return metrics


# Not the whole ``model`` node: its ``chain`` (and a family's teacher, ...) do not change what pre-training
# writes, and reading them would pre-train again for the zero-shot and the fine-tuned chain of the same method.
STAGE = Stage(name="pretrain", version="1",
              reads=("data", "model.name", "model.encoder", "model.pretrain", "pipeline.pretrain", "seed"), run=run,
              added_options=(("pipeline.pretrain.precision", "fp32"), ("model.pretrain.loss_on_special", True)))
