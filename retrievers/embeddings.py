"""Corpus embeddings on disk: resumable, rank-sharded encoding into fp16 ``.npy`` shards.

The corpus is cut into contiguous *storage shards* of at most ``shard_size`` rows, each written
to ``<work>/embeddings/shard_NNN.npy`` (+ ``.json``: rows, doc-id digest, dtype) as soon as it
is done, so a killed run resumes at shard granularity. Under ``torch.distributed`` every rank
encodes its contiguous slice of each storage shard (:func:`encode_corpus_shard`) and rank 0
merges the slices (:func:`merge_shards`). Encoding itself is
:meth:`retrievers.encoder.BiEncoder.encode` (length-sorted dynamic batches, optional bf16).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrievers.errors import IndexBuildError
from retrievers.proc import failpoint

log = logging.getLogger("drlab")

FP16_MAX = float(np.finfo(np.float16).max)

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


def write_json(path: Path, obj: Any) -> None:
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
            write_json(meta_path, {**want, "dim": dim, "seconds": round(time.perf_counter() - t0, 3)})
            for p in emb_dir.glob(f"shard_{i:03d}.rank*of*.npy"):
                p.unlink()
            log.info("[index] shard %d/%d: %d docs in %.1fs", i + 1, n_shards, hi - lo, time.perf_counter() - t0)
            failpoint(f"shard:{i}")
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


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (a copy across filesystems), atomically."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def total_bytes(paths: Sequence[Path]) -> int:
    return int(sum(p.stat().st_size for p in paths if p.exists()))
