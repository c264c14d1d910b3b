"""Stage ``pretrain``: retrieval-oriented pre-training on raw corpus text.

The method is ``model.pretrain`` (a ``_target_`` builder returning a module with
``loss(texts) -> (loss, logs)``, optional ``after_step()`` and ``backbone()``):

* SimLM replaced-LM with a representation bottleneck (:mod:`retrievers.simlm`),
* RetroMAE masked auto-encoding with enhanced decoding (:mod:`retrievers.retromae`),
* Contriever cropping + MoCo (:mod:`retrievers.contriever`),
* ICT inverse cloze (and BFS / WLP when the corpus has the metadata) (:mod:`retrievers.ict`),
* SG-OPT self-guided contrastive learning of the [CLS] vector (:mod:`retrievers.sgopt`),
* ``retrievers.pretraining.no_pretraining``: no steps, only the (random or given) init --
  the "no pre-training" row, so every row starts from the same seeded weights.

Text: every passage (``title + " " + text``) of the dataset's corpus plus the corpora named
in ``pipeline.pretrain.extra_corpora`` (BEIR directories next to the dataset, e.g.
``[nfcorpus]``); or, when the data config has a ``data.text`` node (STS data does), both sentences
of every pair of that file (scores dropped): ``data=scifact '+data.text={path:<dir>,split:train}'``
pre-trains on STS-B's sentences and evaluates on SciFact, sharing the stage with ``data=stsb``.
Training: ``batch_size`` passages per step, AdamW with linear warm-up and
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
import random

import numpy as np
from omegaconf import OmegaConf

from pipelines.executor import Context, Stage, task_of
from retrievers.errors import ConfigError

log = logging.getLogger("drlab")


def run(ctx: Context) -> dict[str, float]:
    import torch
    from hydra.utils import instantiate

    from retrievers.encoder import instantiate_encoder, resolve_device
    from retrievers.pretrain_loop import corpus_texts, embedding_spread, pretrain_loop
    from retrievers.train_utils import plot_loss, seed_everything

    p = ctx.get("pipeline.pretrain")
    if ctx.cfg.model.get("pretrain") is None:  # present but null (a missing node fails at plan time)
        raise ConfigError(
            "stage pretrain needs model.pretrain (a _target_ pre-training method); this family has none. Fix: use a "
            "family with one (simlm, contriever, retromae, ict) or drop pretrain from model.chain."
        )
    sentences = ctx.cfg.data.get("text") is not None  # data.text: pairs of sentences, not the corpus
    data = ctx.get("data.text" if sentences else "data")
    torch.set_num_threads(int(ctx.runtime.threads))
    device = resolve_device(str(ctx.runtime.device))
    seed_everything(int(ctx.cfg.seed))
    random.seed(int(ctx.cfg.seed))
    method = instantiate(ctx.cfg.model.pretrain)
    wants_meta = hasattr(method, "set_corpus")  # ICT's BFS / WLP need the documents' metadata
    if sentences:  # both sentences of every pair of data.text, scores dropped
        from retrievers.sts import text_sentences

        texts, docs, source = text_sentences(data), [], f"{data['path']}/{data['split']}.tsv"
    else:
        texts, docs = corpus_texts(data, list(p["extra_corpora"] or []), metadata=wants_meta)
        source = f"{data['name']} + {p['extra_corpora'] or []}"
    if not texts:
        raise ConfigError(f"no text to pre-train on in {data['path']} (+ {p['extra_corpora']})")
    if wants_meta:
        method.set_corpus(docs)
    log.info("[pretrain] %s on %d passages (%s)", type(method).__name__, len(texts), source)
    history, steps, seconds = pretrain_loop(
        method, texts, batch_size=p["batch_size"], epochs=p["epochs"], max_steps=p["max_steps"], lr=p["lr"],
        weight_decay=p["weight_decay"], warmup_ratio=p["warmup_ratio"], max_grad_norm=p["max_grad_norm"],
        precision=p["precision"], save_every=p["save_every"], log_every=p["log_every"], seed=int(ctx.cfg.seed),
        work=ctx.work, device=device, progress=bool(ctx.runtime.get("progress", True)))
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
        plot_loss(history, ctx.out / "loss.png", title=f"pretrain ({type(method).__name__}) on {source}")
    stats = {"method": type(method).__name__, "text": source, "passages": len(texts), "steps": steps,
             "seconds": round(seconds, 2),
             "doc_mean_cosine": spread,
             "extra_corpora": p["extra_corpora"] or [], **getattr(method, "describe", lambda: {})()}
    (ctx.out / "pretrain_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    metrics = {"steps": float(steps), "passages": float(len(texts)), "seconds": round(seconds, 2),
               "doc_mean_cosine": spread}
    if history:
        metrics["final_loss"] = history[-1]["loss"]
        metrics["tokens_per_s"] = round(float(np.mean([r["tokens_per_s"] for r in history])), 1)
    return metrics


def _data_reads(cfg) -> tuple[str, ...]:
    """``data.text`` when the data config names one (STS data does), else the corpus (``data``). Every run
    that pre-trains on the same sentences shares one pretrain stage, whatever it is evaluated on."""
    if OmegaConf.select(cfg, "data.text") is not None:
        return ("data.text",)
    if task_of(cfg) == "sts":
        raise ConfigError(f"data '{cfg.data.name}' is STS data with data.text=null: the pretrain stage has no "
                          f"sentences. Fix: data.text={{path: <dir with <split>.tsv>, split: train}}")
    return ("data",)


STAGE = Stage(name="pretrain", version="1",
              reads=lambda cfg, before: (*_data_reads(cfg), "model.encoder", "model.pretrain", "pipeline.pretrain", "seed"),
              run=run, uses=(), tasks=("retrieval", "sts"))
