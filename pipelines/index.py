"""Stage ``index``: encode the corpus with the chain's final retriever, build a FAISS index.

The encoder is the newest upstream checkpoint (``retriever1``, ``distill``, ...;
see :func:`retrievers.encoder.latest_checkpoint`) or, for a chain without training
(``model=pretrained``), the family's ``model.encoder`` as configured.

Encoding
    Documents (``title + title_sep + text``) are encoded under
    ``torch.inference_mode`` with length-sorted dynamic batching
    (:meth:`retrievers.encoder.BiEncoder.encode`), optional bf16 autocast
    (``runtime.bf16``), ``runtime.encode_batch_size`` and ``runtime.threads``.
    The corpus is cut into contiguous *storage shards* of at most
    ``pipeline.index.shard_size`` rows, each written to the stage's work dir as soon as
    it is done (``embeddings/shard_NNN.npy``, float16 by default): a killed run resumes
    at shard granularity. Under ``torch.distributed`` (``WORLD_SIZE > 1``) every rank
    encodes its contiguous slice of each storage shard (:func:`encode_corpus_shard`)
    into the work dir and rank 0 merges the slices (:func:`merge_shards`).

Index
    ``faiss.index_factory(dim, index.factory, METRIC_INNER_PRODUCT)`` (FAISS: Johnson,
    Douze & Jegou, "Billion-scale similarity search with GPUs", IEEE TBD 2019) built from
    the *stored* embeddings (so ``scripts/bench_index.py`` can rebuild any other index
    type from the same vectors):

    * ``Flat``: exact inner-product search;
    * ``HNSW32``: hierarchical navigable small-world graph (Malkov & Yashunin, TPAMI
      2018), ``index.ef_construction`` / ``index.ef_search``;
    * ``IVF{nlist},PQ{m}``: inverted lists over a k-means coarse quantiser with product
      quantisation of the residuals (Jegou, Douze & Schmid, TPAMI 2011), trained on (a
      sample of) the embeddings, ``index.nprobe`` lists probed. On a small corpus
      ``nlist`` and the PQ codebook size are clamped so k-means gets
      ``pipeline.index.min_points_per_centroid`` training points per centroid (the log
      says so, and ``index_params.json`` records the factory actually built).

    On a machine with CUDA and a GPU build of FAISS (``pip install dr-lab[gpu]``),
    Flat / IVF indexes are trained and searched on the GPU; the CPU path is the default.

Writes ``index.faiss``, ``doc_ids.txt`` (one id per line, row order of the index),
``embeddings/shard_NNN.npy`` + ``embeddings/meta.json``, ``encoder.json`` (which
checkpoint or model id encoded the corpus), ``index_params.json`` (what
:func:`search_queries` needs: factory, efSearch, nprobe, ...) and ``index_stats.json``
(index type, size on disk, build and encode seconds, docs/s).

:func:`search_queries` is what the ``eval`` stage calls: it reloads the recorded
encoder, encodes the queries and searches the index in chunks of queries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import OmegaConf

from pipelines.executor import ConfigError, Context, Stage

log = logging.getLogger("drlab")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every CPU variant tried

#: bump together with STAGE.version when the embedding files change meaning
EMBEDDING_FORMAT = "1"
FP16_MAX = float(np.finfo(np.float16).max)


class IndexBuildError(ConfigError):
    """A user-facing problem building or searching an index (bad factory, mismatched files).

    A :class:`~pipelines.executor.ConfigError`, so ``run.py`` prints it without a traceback.
    """


# --------------------------------------------------------------------------- sharding


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``'s contiguous slice of ``n`` rows (sizes differ by <= 1)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return n * rank // world_size, n * (rank + 1) // world_size


def encode_corpus_shard(
    encoder,
    texts: Sequence[str],
    rank: int,
    world_size: int,
    *,
    batch_size: int = 128,
    device="cpu",
    bf16: bool = False,
    progress: bool = True,
    max_tokens: int | None = None,
) -> np.ndarray:
    """Encode rank ``rank``'s contiguous slice of ``texts`` (documents); float32 [hi-lo, dim]."""
    lo, hi = shard_bounds(len(texts), rank, world_size)
    return encoder.encode(
        list(texts[lo:hi]),
        "doc",
        batch_size=batch_size,
        device=device,
        bf16=bf16,
        progress=progress,
        max_tokens=max_tokens,
    )


def merge_shards(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate rank slices in rank order (the inverse of :func:`shard_bounds`)."""
    parts = [p for p in parts if p is not None]
    dims = {p.shape[1] for p in parts if p.size}
    if len(dims) > 1:
        raise IndexBuildError(f"cannot merge embedding shards of different dimensions {sorted(dims)}")
    nonempty = [p for p in parts if p.size]
    if not nonempty:
        return np.zeros((0, dims.pop() if dims else 0), dtype=np.float32)
    return np.concatenate(nonempty, axis=0)


def _dist() -> tuple[int, int, Any]:
    """(rank, world_size, torch.distributed or None)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1, None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _ids_digest(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in ids:
        h.update(d.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _to_storage(emb: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return emb.astype(np.float32, copy=False)
    if dtype != "float16":
        raise IndexBuildError(f"pipeline.index.embedding_dtype '{dtype}' unknown; valid choices: float16, float32")
    big = float(np.abs(emb).max()) if emb.size else 0.0
    if big > FP16_MAX or not np.isfinite(emb).all():
        raise IndexBuildError(
            f"embedding values reach {big:.3g}, beyond float16's range ({FP16_MAX:.0f}) or not finite; "
            f"store them as float32: pipeline.index.embedding_dtype=float32"
        )
    return emb.astype(np.float16)


def encode_corpus(
    encoder,
    texts: Sequence[str],
    doc_ids: Sequence[str],
    work_dir: Path,
    *,
    shard_size: int,
    dtype: str = "float16",
    batch_size: int = 128,
    device="cpu",
    bf16: bool = False,
    progress: bool = True,
    max_tokens: int | None = None,
    unit_norm: bool = False,
) -> dict[str, Any]:
    """Encode ``texts`` into ``work_dir/embeddings/shard_NNN.npy`` (resumable, rank-aware).

    A storage shard whose ``.npy`` and ``.json`` (rows, doc-id digest, dtype, bf16) are
    already in ``work_dir`` is not recomputed. Under ``torch.distributed`` every rank
    encodes its slice of each missing shard to ``shard_NNN.rank{r}of{w}.npy``; rank 0
    merges them into the shard file. Returns ``{"shards": [...], "encoded": n,
    "reused": n, "encode_seconds": s, "dim": d}`` (identical on every rank).
    """
    rank, world, dist = _dist()
    emb_dir = Path(work_dir) / "embeddings"
    emb_dir.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    if n == 0:
        raise IndexBuildError("the corpus is empty: nothing to index")
    if len(doc_ids) != n:
        raise ValueError(f"{len(texts)} texts but {len(doc_ids)} doc ids")
    n_shards = math.ceil(n / shard_size)
    shards: list[str] = []
    encoded = reused = 0
    seconds = 0.0
    dim = None
    for i in range(n_shards):
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
        name = f"shard_{i:03d}.npy"
        path, meta_path = emb_dir / name, emb_dir / f"shard_{i:03d}.json"
        want = {
            "lo": lo, "hi": hi, "ids": _ids_digest(doc_ids[lo:hi]), "dtype": dtype, "bf16": bool(bf16),
            "unit_norm": bool(unit_norm),
        }
        have = json.loads(meta_path.read_text()) if meta_path.exists() and path.exists() else None
        if have is not None and {k: have.get(k) for k in want} == want:
            shards.append(name)
            reused += hi - lo
            dim = have.get("dim", dim)
            if rank == 0:
                log.info("[index] shard %d/%d (rows %d-%d) already encoded: reusing %s", i + 1, n_shards, lo, hi, path)
            continue
        if have is not None and rank == 0:
            log.warning("[index] %s does not match this run (%s != %s): re-encoding it", path, have, want)
        t0 = time.perf_counter()
        if dist is None:
            emb = encoder.encode(
                list(texts[lo:hi]), "doc", batch_size=batch_size, device=device, bf16=bf16,
                progress=progress, max_tokens=max_tokens,
            )
        else:
            part = emb_dir / f"shard_{i:03d}.rank{rank}of{world}.npy"
            if not part.exists():
                mine = encode_corpus_shard(
                    encoder, texts[lo:hi], rank, world, batch_size=batch_size, device=device, bf16=bf16,
                    progress=progress and rank == 0, max_tokens=max_tokens,
                )
                _save_npy_atomic(part, mine.astype(np.float32, copy=False))
            dim = int(np.load(part, mmap_mode="r").shape[1])  # before the barrier: rank 0 deletes parts after it
            dist.barrier()
            emb = None
            if rank == 0:
                parts = [emb_dir / f"shard_{i:03d}.rank{r}of{world}.npy" for r in range(world)]
                emb = merge_shards([np.load(p) for p in parts])
        seconds += time.perf_counter() - t0
        if rank == 0:
            assert emb is not None
            if emb.shape[0] != hi - lo:
                raise IndexBuildError(f"shard {i}: encoder returned {emb.shape[0]} rows for {hi - lo} documents")
            dim = int(emb.shape[1])
            if unit_norm:  # cosine similarity with an encoder that does not normalise
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            _save_npy_atomic(path, _to_storage(emb, dtype))
            _write_json(meta_path, {**want, "dim": dim, "seconds": round(time.perf_counter() - t0, 3)})
            for p in emb_dir.glob(f"shard_{i:03d}.rank*of*.npy"):
                p.unlink()
            log.info("[index] shard %d/%d: %d docs in %.1fs", i + 1, n_shards, hi - lo, time.perf_counter() - t0)
        if dist is not None:
            dist.barrier()
        shards.append(name)
        encoded += hi - lo
    if dim is None:
        dim = int(np.load(emb_dir / shards[0], mmap_mode="r").shape[1])
    return {"shards": shards, "encoded": encoded, "reused": reused, "encode_seconds": seconds, "dim": int(dim)}


# --------------------------------------------------------------------------- stored embeddings


def load_embeddings(index_dir: str | Path, mmap: bool = True) -> tuple[list[np.ndarray], list[str]]:
    """The stored embedding shards (float16/float32, memory-mapped) and the doc ids of an index dir."""
    index_dir = Path(index_dir)
    meta_path = index_dir / "embeddings" / "meta.json"
    if not meta_path.exists():
        raise IndexBuildError(f"{index_dir} has no embeddings/meta.json: is it a finished index stage directory?")
    meta = json.loads(meta_path.read_text())
    shards = [np.load(index_dir / "embeddings" / s, mmap_mode="r" if mmap else None) for s in meta["shards"]]
    doc_ids = read_doc_ids(index_dir / "doc_ids.txt")
    n = sum(s.shape[0] for s in shards)
    if n != len(doc_ids):
        raise IndexBuildError(f"{index_dir}: {n} embedding rows but {len(doc_ids)} lines in doc_ids.txt")
    return shards, doc_ids


def write_doc_ids(ids: Sequence[str], path: Path) -> None:
    bad = [d for d in ids if "\n" in d or "\r" in d]
    if bad:
        raise IndexBuildError(f"document id(s) containing a line break cannot go into doc_ids.txt: {bad[:3]}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{d}\n" for d in ids), encoding="utf-8")
    os.replace(tmp, path)


def read_doc_ids(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as fh:
        return [line.rstrip("\r\n") for line in fh]


# --------------------------------------------------------------------------- FAISS


def clamp_factory(factory: str, n_train: int, min_points: int = 39) -> tuple[str, list[str]]:
    """Shrink IVF ``nlist`` and PQ codebook bits so k-means has ``min_points`` points per centroid.

    Returns the factory string to build and the notes explaining each change (empty
    when nothing changed). ``IVF256,PQ32`` on 5,000 vectors becomes ``IVF128,PQ32x7``.
    """
    notes: list[str] = []
    tokens = factory.split(",")
    out = []
    cap = max(1, n_train // max(1, min_points))
    for tok in tokens:
        m = re.match(r"^IVF(\d+)(.*)$", tok)
        if m:
            nlist = int(m.group(1))
            if nlist > cap:
                notes.append(
                    f"IVF nlist {nlist} -> {cap}: {n_train} training vectors give fewer than "
                    f"{min_points} per list (FAISS k-means needs about that many)"
                )
                tok = f"IVF{cap}{m.group(2)}"
        m = re.match(r"^PQ(\d+)(?:x(\d+))?(.*)$", tok)
        if m:
            nbits = int(m.group(2) or 8)
            fit = max(1, int(math.floor(math.log2(cap)))) if cap > 1 else 1
            if nbits > fit:
                notes.append(
                    f"PQ codebook bits {nbits} -> {fit} ({2 ** fit} centroids per sub-quantiser): "
                    f"{n_train} training vectors are fewer than {min_points} x {2 ** nbits}"
                )
                tok = f"PQ{m.group(1)}x{fit}{m.group(3)}"
        out.append(tok)
    return ",".join(out), notes


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(index):
    import faiss

    idx = faiss.downcast_index(index)
    return idx if hasattr(idx, "hnsw") else None


def set_search_params(index, params: dict[str, Any]) -> None:
    """Apply ``ef_search`` (HNSW) and ``nprobe`` (IVF) to a CPU or GPU index."""
    import faiss

    h = _hnsw(index)
    if h is not None and params.get("ef_search"):
        h.hnsw.efSearch = int(params["ef_search"])
    ivf = _ivf(index) if hasattr(faiss, "extract_index_ivf") else None
    if ivf is not None and params.get("nprobe"):
        ivf.nprobe = min(int(params["nprobe"]), int(ivf.nlist))
    elif params.get("nprobe") and hasattr(faiss, "GpuParameterSpace") and "Gpu" in type(index).__name__:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(params["nprobe"]))


def gpu_resources():
    """``faiss.StandardGpuResources`` when CUDA and a GPU build of FAISS are both present, else None."""
    import faiss
    import torch

    if not torch.cuda.is_available():
        return None
    if not hasattr(faiss, "StandardGpuResources"):
        log.info("[index] CUDA is available but this FAISS build has no GPU support (pip install dr-lab[gpu]): CPU index")
        return None
    return faiss.StandardGpuResources()


def to_gpu(index, res):
    """Move ``index`` to GPU 0 if ``res``; HNSW has no GPU implementation and stays on the CPU."""
    import faiss

    if res is None:
        return index
    if _hnsw(index) is not None:
        log.info("[index] HNSW has no FAISS GPU implementation: searching on the CPU")
        return index
    try:
        return faiss.index_cpu_to_gpu(res, 0, index)
    except RuntimeError as e:  # e.g. PQ code sizes the GPU kernels do not support
        log.warning("[index] cannot move %s to the GPU (%s): using the CPU index", type(index).__name__, e)
        return index


def iter_rows(shards: Sequence[np.ndarray], batch: int):
    """float32 row blocks of at most ``batch`` rows over the stored shards (bounded memory)."""
    for s in shards:
        for lo in range(0, s.shape[0], batch):
            yield np.ascontiguousarray(s[lo : lo + batch], dtype=np.float32)


def training_sample(shards: Sequence[np.ndarray], max_points: int, seed: int = 0) -> np.ndarray:
    n = sum(s.shape[0] for s in shards)
    if n <= max_points:
        return np.concatenate([np.asarray(s, dtype=np.float32) for s in shards])
    rows = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
    out, start = [], 0
    for s in shards:
        sel = rows[(rows >= start) & (rows < start + s.shape[0])] - start
        out.append(np.asarray(s[sel], dtype=np.float32))
        start += s.shape[0]
    return np.concatenate(out)


def build_index(
    shards: Sequence[np.ndarray],
    factory: str,
    *,
    ef_construction: int | None = None,
    ef_search: int | None = None,
    nprobe: int | None = None,
    min_points_per_centroid: int = 39,
    max_train_points: int = 262144,
    add_batch_size: int = 65536,
    use_gpu: bool = True,
    progress: bool = True,
    seed: int = 0,
):
    """A FAISS inner-product index over the stored embedding ``shards`` (float16 rows are cast to float32).

    Returns ``(cpu_index, params)`` where ``params`` records the factory actually built,
    the clamping notes and the search parameters (what ``index_params.json`` holds).
    """
    import faiss
    from tqdm.auto import tqdm

    n = sum(s.shape[0] for s in shards)
    if n == 0:
        raise IndexBuildError("no embeddings to index")
    dim = int(shards[0].shape[1])
    built, notes = clamp_factory(factory, min(n, max_train_points), min_points_per_centroid)
    for note in notes:
        log.warning("[index] %s", note)
    try:
        index = faiss.index_factory(dim, built, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(
            f"faiss.index_factory({dim}, '{built}') failed: {str(e).strip().splitlines()[-1]}. "
            f"Valid examples: Flat, HNSW32, IVF256,PQ32 (PQ m must divide the dimension {dim})"
        ) from None
    h = _hnsw(index)
    if h is not None and ef_construction:
        h.hnsw.efConstruction = int(ef_construction)
    pq = faiss.downcast_index(index)
    if getattr(pq, "do_polysemous_training", False):
        # Polysemous codes (Douze et al. 2016) only serve Hamming pre-filtering, which dr-lab
        # does not use; training them takes minutes and does not change inner-product results.
        pq.do_polysemous_training = False
    res = gpu_resources() if use_gpu else None
    work = to_gpu(index, res) if (res is not None and not index.is_trained) else index
    if not index.is_trained:
        sample = training_sample(shards, max_train_points, seed)
        log.info("[index] training %s on %d vectors", built, len(sample))
        work.train(sample)
        del sample
    bar = tqdm(total=n, desc=f"faiss add ({built})", unit="vec", disable=not progress, mininterval=2)
    for block in iter_rows(shards, add_batch_size):
        work.add(block)
        bar.update(len(block))
    bar.close()
    index = faiss.index_gpu_to_cpu(work) if work is not index else index
    params = {
        "factory": built,
        "factory_requested": factory,
        "clamped": notes,
        "metric": "inner_product",
        "dim": dim,
        "ntotal": int(index.ntotal),
        "ef_construction": int(ef_construction) if (h is not None and ef_construction) else None,
        "ef_search": int(ef_search) if (h is not None and ef_search) else None,
        "nprobe": None,
    }
    ivf = _ivf(index)
    if ivf is not None:
        params["nlist"] = int(ivf.nlist)
        params["nprobe"] = min(int(nprobe or 1), int(ivf.nlist))
        if nprobe and int(nprobe) > ivf.nlist:
            log.warning("[index] nprobe %d > nlist %d: probing all %d lists", nprobe, ivf.nlist, ivf.nlist)
    set_search_params(index, params)
    return index, params


def search(index, queries: np.ndarray, k: int, chunk: int = 256, progress: bool = False):
    """Top-``k`` (scores, row ids) for ``queries`` [Nq, dim], searched ``chunk`` queries at a time."""
    from tqdm.auto import tqdm

    k = min(int(k), int(index.ntotal))
    D = np.empty((len(queries), k), dtype=np.float32)
    I = np.empty((len(queries), k), dtype=np.int64)
    for lo in tqdm(range(0, len(queries), chunk), desc="faiss search", disable=not progress, mininterval=2):
        q = np.ascontiguousarray(queries[lo : lo + chunk], dtype=np.float32)
        D[lo : lo + len(q)], I[lo : lo + len(q)] = index.search(q, k)
    return D, I


def index_type(factory: str) -> str:
    f = factory.upper()
    if "HNSW" in f and "IVF" not in f:
        return "hnsw"
    if "IVF" in f and "PQ" in f:
        return "ivfpq"
    if "IVF" in f:
        return "ivf"
    if f.startswith("FLAT"):
        return "flat"
    return factory


# --------------------------------------------------------------------------- the stage


def _embedding_key(ctx: Context, p, bf16: bool, ckpt: Path | None) -> str:
    """What the stored embeddings depend on: data content, model config, checkpoint, layout.

    Two index stage dirs with the same embedding key hold the same vectors, whatever
    their index type; the stage copies them instead of re-encoding (``reuse_embeddings``).
    """
    from pipelines.executor import _FP_CACHE, data_fingerprint

    data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    path = data.pop("path", None)
    if path is not None:
        if path not in _FP_CACHE:
            _FP_CACHE[path] = data_fingerprint(path)
        data["fingerprint"] = _FP_CACHE[path]
    payload = {
        "format": EMBEDDING_FORMAT,
        "data": data,
        "model": OmegaConf.to_container(ctx.cfg.model, resolve=True),
        # only the checkpoint matters (its stage key fixes its content), not e.g. an upstream bm25
        "checkpoint": f"{ckpt.parent.parent.name}/{ckpt.parent.name}" if ckpt is not None else None,
        "shard_size": int(p.shard_size),
        "dtype": str(p.embedding_dtype),
        "bf16": bool(bf16),
        "max_tokens": p.get("max_tokens"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _reuse_sibling_embeddings(ctx: Context, key: str) -> Path | None:
    """Hard-link the embedding shards of a finished sibling index dir with the same embedding key."""
    emb_dir = ctx.work / "embeddings"
    for d in sorted(ctx.out.parent.iterdir()):
        if d == ctx.out or not (d / "manifest.json").exists() or not (d / "embedding_key.txt").exists():
            continue
        if (d / "embedding_key.txt").read_text().strip() != key:
            continue
        src = d / "embeddings"
        meta = json.loads((src / "meta.json").read_text())
        emb_dir.mkdir(parents=True, exist_ok=True)
        for s in meta["shards"]:
            _link_or_copy(src / s, emb_dir / s)
            _link_or_copy(src / s.replace(".npy", ".json"), emb_dir / s.replace(".npy", ".json"))
        log.info("[index] reusing the embeddings of %s (same encoder, checkpoint, data and storage layout)", d)
        return d
    return None


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
        mid = str(ctx.cfg.model.encoder.get("checkpoint", ctx.cfg.model.get("checkpoint", "")))
        local = dict(ctx.cfg.model.encoder.get("local_dirs") or {})
        rec.update(kind="model", model=mid, resolved_path=resolve_model(mid, local) if mid else None)
    rec.update(knobs=encoder.cfg, bf16=bool(bf16))
    return rec


def _set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(int(n))
    faiss.omp_set_num_threads(int(n))


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _dir_bytes(paths: Sequence[Path]) -> int:
    return int(sum(p.stat().st_size for p in paths if p.exists()))


def run(ctx: Context) -> dict[str, float]:
    import faiss
    import torch

    from pipelines.data import load_dataset
    from retrievers.encoder import instantiate_encoder, latest_checkpoint, resolve_device

    data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    p = ctx.cfg.pipeline.index
    icfg = ctx.cfg.index
    rt = ctx.runtime
    rank, world, dist = _dist()
    _set_threads(int(rt.threads))
    device = resolve_device(str(rt.device))
    bf16 = bool(rt.bf16)

    ds = load_dataset(data, [data["eval_split"]])
    doc_ids = list(ds.corpus)
    ckpt = latest_checkpoint(ctx.upstream)
    encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=ckpt)
    encoder.to(device)
    texts = encoder.doc_texts([ds.corpus[d] for d in doc_ids])
    del ds
    rec = _encoder_record(ctx, ckpt, encoder, bf16)
    # cosine similarity from an encoder that does not normalise: store and index unit vectors
    # (search_queries normalises the queries too)
    cosine_unnormalized = encoder.cfg["similarity"] == "cos" and not encoder.cfg["normalize"]
    log.info(
        "[index] encoding %d documents with %s on %s%s (batch %d, %d threads)",
        len(texts), rec.get("checkpoint") or rec.get("model"), device, " bf16" if bf16 else "",
        int(rt.encode_batch_size), int(rt.threads),
    )

    emb_key = _embedding_key(ctx, p, bf16, ckpt)
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
    del encoder
    if rank != 0:  # rank 0 alone writes the index and the stage artifacts
        return {"docs": float(len(doc_ids))}

    # Stored vectors -> the stage's output dir (hard links: the work dir is deleted on success).
    out_emb = ctx.out / "embeddings"
    out_emb.mkdir()
    for s in enc["shards"]:
        _link_or_copy(ctx.work / "embeddings" / s, out_emb / s)
        _link_or_copy(ctx.work / "embeddings" / s.replace(".npy", ".json"), out_emb / s.replace(".npy", ".json"))
    _write_json(
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
    _write_json(ctx.out / "index_params.json", params)
    _write_json(ctx.out / "encoder.json", rec)

    size = _dir_bytes([ctx.out / "index.faiss"])
    enc_s = float(enc["encode_seconds"])
    stats = {
        "index_type": index_type(params["factory"]),
        "factory": params["factory"],
        "vectors": int(index.ntotal),
        "dim": int(enc["dim"]),
        "index_bytes": size,
        "embeddings_bytes": _dir_bytes(list(out_emb.glob("*.npy"))),
        "build_seconds": round(build_seconds, 3),
        "encode_seconds": round(enc_s, 3),
        "docs_encoded": int(enc["encoded"]),
        "docs_reused": int(enc["reused"]),
        "reused_from": str(reused_from) if reused_from else None,
        "docs_per_s": round(enc["encoded"] / enc_s, 2) if enc_s > 0 and enc["encoded"] else None,
        "device": str(device),
        "bf16": bf16,
        "encode_batch_size": int(rt.encode_batch_size),
        "threads": int(rt.threads),
        "world_size": world,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
    }
    _write_json(ctx.out / "index_stats.json", stats)
    log.info(
        "[index] %s: %d vectors x %d, %s, build %.1fs, %s",
        params["factory"], index.ntotal, enc["dim"], human_bytes(size), build_seconds,
        f"encode {enc_s:.1f}s ({stats['docs_per_s']} docs/s)" if stats["docs_per_s"] else "no document re-encoded",
    )
    metrics = {"docs": float(len(doc_ids)), "index_mb": round(size / 1e6, 3), "build_s": round(build_seconds, 3)}
    if stats["docs_per_s"]:
        metrics["docs_per_s"] = float(stats["docs_per_s"])
    return metrics


# --------------------------------------------------------------------------- eval-time search


def load_recorded_encoder(index_dir: Path, encoder_cfg):
    """The encoder that built ``index_dir`` (its ``encoder.json``), from the family's ``model.encoder``."""
    from retrievers.encoder import instantiate_encoder

    rec = json.loads((index_dir / "encoder.json").read_text())
    if rec.get("kind") == "checkpoint":
        cand = [index_dir / rec["checkpoint_relative"], Path(rec["checkpoint"])]
        path = next((c for c in cand if (c / "drlab_encoder.json").exists()), None)
        if path is None:
            raise IndexBuildError(
                f"{index_dir}/encoder.json names checkpoint {rec['checkpoint']}, which no longer exists "
                f"(tried {[str(c) for c in cand]}); re-run the chain with force=[index]"
            )
        return instantiate_encoder(encoder_cfg, checkpoint=path.resolve()), rec
    return instantiate_encoder(encoder_cfg), rec


def search_queries(ctx: Context, queries: dict[str, str], depth: int) -> dict[str, dict[str, float]]:
    """Dense run ``{qid: {docid: score}}`` (top ``depth``) for ``queries`` from the upstream index.

    Called by the ``eval`` stage with its own context: the index parameters come from
    the files the index stage wrote (``index_params.json``, ``encoder.json``), runtime
    knobs from ``ctx.runtime``. Queries are searched ``search_batch_size`` at a time.
    Also writes ``ctx.out/extra.md`` (index type, size, vectors, timings) for the report.
    """
    import faiss

    from retrievers.encoder import resolve_device

    index_dir = Path(ctx.upstream["index"])
    rt = ctx.runtime
    _set_threads(int(rt.threads))
    params = json.loads((index_dir / "index_params.json").read_text())
    encoder, rec = load_recorded_encoder(index_dir, ctx.cfg.model.encoder)
    device = resolve_device(str(rt.device))
    encoder.to(device)
    qids = list(queries)
    t0 = time.perf_counter()
    q = encoder.encode([queries[x] for x in qids], "query", batch_size=int(rt.encode_batch_size), device=device,
                       bf16=bool(rt.bf16), progress=len(qids) > 1000)
    q_seconds = time.perf_counter() - t0
    del encoder
    if params.get("cosine") and not rec["knobs"].get("normalize"):
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    index = faiss.read_index(str(index_dir / "index.faiss"))
    if index.d != q.shape[1]:
        raise IndexBuildError(f"{index_dir}/index.faiss has dimension {index.d}, the query encoder gives {q.shape[1]}")
    set_search_params(index, params)
    res = gpu_resources()
    index = to_gpu(index, res)
    set_search_params(index, params)
    doc_ids = read_doc_ids(index_dir / "doc_ids.txt")
    chunk = int(params.get("search_batch_size") or 256)
    k = min(int(depth), int(index.ntotal))
    t0 = time.perf_counter()
    D, I = search(index, q, k, chunk=chunk, progress=len(qids) > 10 * chunk)
    search_seconds = time.perf_counter() - t0
    run = {qid: {doc_ids[i]: float(s) for s, i in zip(D[r], I[r]) if i >= 0} for r, qid in enumerate(qids)}
    del D, I
    del index
    stats = json.loads((index_dir / "index_stats.json").read_text())
    ms = 1000 * search_seconds / max(1, len(qids))
    enc_line = (
        f"{stats['encode_seconds']:.1f} s ({stats['docs_per_s']} docs/s, {stats['device']}"
        f"{', bf16' if stats.get('bf16') else ''})"
        if stats.get("docs_per_s")
        else f"vectors reused from {stats.get('reused_from') or 'the work dir'}"
    )
    log.info("[index] %d queries: encode %.1fs, search %.2f ms/query (%s)", len(qids), q_seconds, ms, params["factory"])
    search_line = [f"ef_search {params['ef_search']}"] if params.get("ef_search") else []
    search_line += [f"nprobe {params['nprobe']}"] if params.get("nprobe") else []
    extra = [
        "## Dense index\n",
        "| | |",
        "|---|---|",
        f"| index | `{params['factory']}` ({stats['index_type']}{', ' + ', '.join(search_line) if search_line else ''}) |",
        f"| size on disk | {human_bytes(stats['index_bytes'])} (`index.faiss`; stored {stats['dim']}-d vectors: "
        f"{human_bytes(stats['embeddings_bytes'])}) |",
        f"| vectors x dim | {stats['vectors']:,} x {stats['dim']} |",
        f"| encoder | {rec.get('checkpoint') or rec.get('model')} |",
        f"| corpus encoding | {enc_line} |",
        f"| query encoding | {q_seconds:.2f} s for {len(qids)} queries |",
        f"| search latency | {ms:.3f} ms/query (batches of {chunk}, depth {k}, {int(rt.threads)} threads) |",
        "",
    ]
    if params.get("clamped"):
        extra.append("Index clamped for a small corpus: " + "; ".join(params["clamped"]) + "\n")
    with open(ctx.out / "extra.md", "a", encoding="utf-8") as fh:
        fh.write("\n".join(extra) + "\n")
    return run


STAGE = Stage(
    name="index", version="1", reads=("data", "model", "index", "pipeline.index"), run=run, distributed=True
)
