"""Stage ``index``: encode the corpus with the chain's final retriever, build a FAISS index.

The encoder is the newest upstream checkpoint (``retriever1``, ``distill``, ...) or, for a chain
without training (``model=pretrained``), ``model.encoder`` as configured. Documents are encoded
into resumable fp16 shards (:func:`retrievers.embeddings.encode_corpus`; rank-sharded under
torchrun), then indexed (:func:`retrievers.faiss_index.build_index`: ``index.factory``, Flat /
HNSW / IVF-PQ, GPU when present).

Reads ``data``, ``model.encoder``, ``index``, ``pipeline.index``, ``precision`` (bf16 or fp32 encoding,
:mod:`retrievers.precision`; the choice and its check are in ``encoder.json`` and the metrics) and
``backend`` (torch or OpenVINO, :mod:`retrievers.openvino_backend`). Uses the newest checkpoint.
Writes ``index.faiss``, ``doc_ids.txt``, ``embeddings/shard_NNN.npy`` + ``meta.json``,
``encoder.json`` (which checkpoint or model id encoded the corpus), ``index_params.json`` (what
the eval stage's search needs) and ``index_stats.json`` (size, build and encode seconds, docs/s).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipelines.executor import Context, Stage, dist_state, newest_checkpoint
from pipelines.keys import digest
from retrievers.embeddings import (
    encode_corpus,
    human_bytes,
    link_or_copy,
    load_embeddings,
    total_bytes,
    write_doc_ids,
    write_json,
)
from retrievers.faiss_index import build_index, index_type, set_threads
from retrievers.openvino_backend import planned as planned_backend
from retrievers.precision import choose, precision_metrics

log = logging.getLogger("drlab")

#: bump together with STAGE.version when the embedding files change meaning
EMBEDDING_FORMAT = "1"


def _embedding_key(ctx: Context, bf16: bool) -> str:
    """The part of this stage's inputs the stored vectors depend on: its key without the index type.

    Two index stage dirs with the same embedding key hold the same vectors, whatever their FAISS
    index; the stage links them instead of re-encoding (``reuse_embeddings``: flat -> hnsw).
    """
    p = ctx.inputs["pipeline.index"]
    return digest({
        "format": EMBEDDING_FORMAT,
        "data": ctx.inputs["data"],
        "encoder": ctx.inputs["model.encoder"],
        "checkpoint": ctx.checkpoint().parent.name if ctx.checkpoint() else None,  # its stage key
        "layout": [p["shard_size"], p["embedding_dtype"], p["max_tokens"]],
        "bf16": bool(bf16),
    }, n=16)


def _reuse_sibling_embeddings(ctx: Context, key: str) -> Path | None:
    """Hard-link the embedding shards of a finished sibling index dir with the same embedding key."""
    d = ctx.sibling_with("embedding_key.txt", key)
    if d is None:
        return None
    emb_dir = ctx.work / "embeddings"
    src = d / "embeddings"
    meta = json.loads((src / "meta.json").read_text())
    emb_dir.mkdir(parents=True, exist_ok=True)
    for s in meta["shards"]:
        link_or_copy(src / s, emb_dir / s)
        link_or_copy(src / s.replace(".npy", ".json"), emb_dir / s.replace(".npy", ".json"))
    log.info("[index] reusing the embeddings of %s (same encoder, checkpoint, data and storage layout)", d)
    return d


def _encoder_record(ctx: Context, ckpt: Path | None, encoder, bf16: bool) -> dict[str, Any]:
    from retrievers.hub import resolve_model

    rec: dict[str, Any] = {}
    if ckpt is not None:
        rec.update(
            kind="checkpoint",
            checkpoint=str(Path(ckpt).resolve()),
            checkpoint_relative=os.path.relpath(Path(ckpt).resolve(), ctx.out.resolve()),
            stage=Path(ckpt).parent.parent.name,
        )
    else:
        mid = str(ctx.cfg.model.encoder.get("checkpoint") or "")
        local = dict(ctx.cfg.model.encoder.get("local_dirs") or {})
        rec.update(kind="model", model=mid, resolved_path=resolve_model(mid, local) if mid else None)
    rec.update(knobs=encoder.cfg, bf16=bool(bf16))
    return rec


def run(ctx: Context) -> dict[str, float]:
    import faiss
    import torch

    from retrievers.data import load_dataset
    from retrievers.encoder import instantiate_encoder, resolve_device

    data = ctx.get("data")
    p = ctx.cfg.pipeline.index
    icfg = ctx.cfg.index
    rt = ctx.runtime
    rank, world, dist = dist_state()
    set_threads(int(rt.threads))
    device = resolve_device(str(rt.device))

    ds = load_dataset(data, [data["eval_split"]])
    doc_ids = list(ds.corpus)
    ckpt = ctx.checkpoint()
    encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=ckpt)
    encoder.to(device)
    encoder.backend = planned_backend(str(ctx.get("backend")), str(device))
    texts = encoder.doc_texts([ds.corpus[d] for d in doc_ids])
    del ds
    bf16, prec = choose(str(ctx.get("precision")), encoder, texts, "doc", device=device,
                        batch_size=int(rt.encode_batch_size), who="index")
    rec = _encoder_record(ctx, ckpt, encoder, bf16)
    rec.update(prec, backend=encoder.backend)
    # cosine similarity from an encoder that does not normalise: store and index unit vectors
    # (dense_search normalises the queries too)
    cosine_unnormalized = encoder.cfg["similarity"] == "cos" and not encoder.cfg["normalize"]
    log.info(
        "[index] encoding %d documents with %s on %s%s (batch %d, %d threads)",
        len(texts), rec.get("checkpoint") or rec.get("model"), device, " bf16" if bf16 else "",
        int(rt.encode_batch_size), int(rt.threads),
    )

    emb_key = _embedding_key(ctx, bf16)
    reused_from = None
    if bool(p.get("reuse_embeddings", True)) and rank == 0 and not (ctx.work / "embeddings").exists():
        reused_from = _reuse_sibling_embeddings(ctx, emb_key)
    if dist is not None:
        dist.barrier()
    enc = encode_corpus(
        encoder,
        texts,
        doc_ids,
        ctx.work,
        shard_size=int(p.shard_size),
        dtype=str(p.embedding_dtype),
        batch_size=int(rt.encode_batch_size),
        device=device,
        bf16=bf16,
        progress=bool(rt.get("progress", True)),
        max_tokens=p.get("max_tokens"),
        unit_norm=cosine_unnormalized,
    )
    padding = dict(getattr(encoder, "padding", {}))
    del encoder
    if rank != 0:  # rank 0 alone writes the index and the stage artifacts
        return {"docs": float(len(doc_ids))}

    # Stored vectors -> the stage's output dir (hard links: the work dir is deleted on success).
    out_emb = ctx.out / "embeddings"
    out_emb.mkdir()
    for s in enc["shards"]:
        link_or_copy(ctx.work / "embeddings" / s, out_emb / s)
        link_or_copy(ctx.work / "embeddings" / s.replace(".npy", ".json"), out_emb / s.replace(".npy", ".json"))
    write_json(
        out_emb / "meta.json",
        {"shards": enc["shards"], "rows": len(doc_ids), "dim": enc["dim"], "dtype": str(p.embedding_dtype),
         "shard_size": int(p.shard_size),
         "unit_norm": bool(rec["knobs"].get("normalize")) or cosine_unnormalized},
    )
    write_doc_ids(doc_ids, ctx.out / "doc_ids.txt")
    (ctx.out / "embedding_key.txt").write_text(emb_key + "\n")

    shards, _ = load_embeddings(ctx.out)
    t0 = time.perf_counter()
    index, params = build_index(
        shards,
        str(icfg.factory),
        ef_construction=icfg.get("ef_construction"),
        ef_search=icfg.get("ef_search"),
        nprobe=icfg.get("nprobe"),
        min_points_per_centroid=int(p.min_points_per_centroid),
        max_train_points=int(p.max_train_points),
        add_batch_size=int(p.add_batch_size),
        use_gpu=True,
    )
    build_seconds = time.perf_counter() - t0
    faiss.write_index(index, str(ctx.out / "index.faiss"))
    params.update(
        name=str(icfg.get("name", index_type(str(icfg.factory)))),
        search_batch_size=int(p.search_batch_size),
        cosine=rec["knobs"].get("similarity") == "cos",
    )
    write_json(ctx.out / "index_params.json", params)
    write_json(ctx.out / "encoder.json", rec)

    size = total_bytes([ctx.out / "index.faiss"])
    enc_s = float(enc["encode_seconds"])
    stats = {
        "index_type": index_type(params["factory"]),
        "factory": params["factory"],
        "vectors": int(index.ntotal),
        "dim": int(enc["dim"]),
        "index_bytes": size,
        "embeddings_bytes": total_bytes(list(out_emb.glob("*.npy"))),
        "build_seconds": round(build_seconds, 3),
        "encode_seconds": round(enc_s, 3),
        "docs_encoded": int(enc["encoded"]),
        "docs_reused": int(enc["reused"]),
        "reused_from": str(reused_from) if reused_from else None,
        "docs_per_s": round(enc["encoded"] / enc_s, 2) if enc_s > 0 and enc["encoded"] else None,
        # tokens computed with length-sorted batches vs batches in corpus order (the check's texts included)
        "padding": {**padding, "saved": round(1 - padding["padded"] / padding["padded_unsorted"], 4)}
        if padding.get("padded_unsorted") else None,
        "device": str(device),
        "bf16": bf16,
        **prec,
        "backend": rec["backend"],
        "encode_batch_size": int(rt.encode_batch_size),
        "threads": int(rt.threads),
        "world_size": world,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
    }
    write_json(ctx.out / "index_stats.json", stats)
    log.info(
        "[index] %s: %d vectors x %d, %s, build %.1fs, %s",
        params["factory"], index.ntotal, enc["dim"], human_bytes(size), build_seconds,
        (f"encode {enc_s:.1f}s ({stats['docs_per_s']} docs/s, {stats['precision']}, {stats['backend']}"
         + (f", length-sorted batches computed {stats['padding']['saved']:.0%} fewer tokens" if stats["padding"] else "")
         + ")") if stats["docs_per_s"] else "no document re-encoded",
    )
    metrics = {"docs": float(len(doc_ids)), "index_mb": round(size / 1e6, 3), "build_s": round(build_seconds, 3)}
    if stats["docs_per_s"]:
        metrics["docs_per_s"] = float(stats["docs_per_s"])
    metrics.update(precision_metrics(prec))
    return metrics


STAGE = Stage(
    name="index", version="1", reads=("data", "model.encoder", "index", "pipeline.index", "precision", "backend"), run=run,
    uses=lambda cfg, before: newest_checkpoint(before), distributed=True,
)
