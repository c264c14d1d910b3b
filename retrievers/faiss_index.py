"""FAISS indexes over stored embeddings, and chunked search.

``faiss.index_factory(dim, factory, METRIC_INNER_PRODUCT)`` (FAISS: Johnson, Douze & Jegou,
"Billion-scale similarity search with GPUs", IEEE TBD 2019), built from the *stored*
embeddings so any other index type can be rebuilt from the same vectors
(``scripts/bench_index.py``):

* ``Flat``: exact inner-product search;
* ``HNSW32``: hierarchical navigable small-world graph (Malkov & Yashunin, TPAMI 2018),
  ``ef_construction`` / ``ef_search``;
* ``IVF{nlist},PQ{m}``: inverted lists over a k-means coarse quantiser with product
  quantisation of the residuals (Jegou, Douze & Schmid, TPAMI 2011), trained on (a sample of)
  the embeddings, ``nprobe`` lists probed. On a small corpus ``nlist`` and the PQ codebook
  size are clamped so k-means gets ``min_points_per_centroid`` points per centroid (logged,
  and recorded in the returned params).

With CUDA and a GPU build of FAISS (``pip install dr-lab[gpu]``), Flat / IVF indexes are
trained and searched on the GPU; the CPU path is the default.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrievers.embeddings import human_bytes, read_doc_ids
from retrievers.errors import IndexBuildError

log = logging.getLogger("drlab")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every CPU variant tried

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


def merge_topk(D: np.ndarray, I: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two (scores, ids) result lists per query, best first (ids -1 = no result)."""
    d, i = np.concatenate([D, D2], axis=1), np.concatenate([I, I2], axis=1)
    d = np.where(i < 0, -np.inf, d)
    top = np.argpartition(-d, min(k, d.shape[1]) - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(d, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    return np.take_along_axis(d, top, axis=1), np.take_along_axis(i, top, axis=1)


def search_shards(shards: Sequence[np.ndarray], queries: np.ndarray, k: int, chunk: int = 256,
                  add_batch_size: int = 65536):
    """Exact top-``k`` over embedding ``shards`` (e.g. memory-mapped fp16 ``shard_NNN.npy``) without one
    index of the whole corpus: a Flat index per shard, searched and dropped in turn, results merged.
    Peak memory is one shard as float32 plus ``len(queries) x k`` results, whatever the corpus size."""
    import faiss

    nq = len(queries)
    D = np.full((nq, 0), -np.inf, dtype=np.float32)
    I = np.full((nq, 0), -1, dtype=np.int64)
    offset = 0
    for s in shards:
        index = faiss.IndexFlatIP(int(s.shape[1]))
        for block in iter_rows([s], add_batch_size):
            index.add(block)
        d, i = search(index, queries, k, chunk=chunk)
        del index
        D, I = merge_topk(D, I, d, np.where(i >= 0, i + offset, -1), k)
        offset += s.shape[0]
    return D.astype(np.float32), I


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


def set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(int(n))
    faiss.omp_set_num_threads(int(n))


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


def dense_search(index_dir: Path, encoder_cfg, queries: dict[str, str], depth: int, *, device: str,
                 threads: int, encode_batch_size: int) -> tuple[dict[str, dict[str, float]], str]:
    """Dense run ``{qid: {docid: score}}`` (top ``depth``) for ``queries`` from a finished index dir.

    The index parameters come from the files the index stage wrote (``index_params.json``,
    ``encoder.json``; queries are encoded in the precision and by the backend the documents were,
    ``encoder.json``'s ``bf16`` and ``backend``). Queries are encoded in batches and searched ``search_batch_size`` at a
    time. Returns the run and a Markdown section (index type, size, vectors, timings).
    """
    import faiss

    from retrievers.encoder import resolve_device

    index_dir = Path(index_dir)
    set_threads(threads)
    params = json.loads((index_dir / "index_params.json").read_text())
    encoder, rec = load_recorded_encoder(index_dir, encoder_cfg)
    device = resolve_device(str(device))
    encoder.to(device)
    encoder.backend = rec.get("backend", "torch")  # as the documents were encoded
    qids = list(queries)
    t0 = time.perf_counter()
    q = encoder.encode([queries[x] for x in qids], "query", batch_size=int(encode_batch_size), device=device,
                       bf16=bool(rec.get("bf16")), progress=len(qids) > 1000)
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
        f"| search latency | {ms:.3f} ms/query (batches of {chunk}, depth {k}, {int(threads)} threads) |",
        "",
    ]
    if params.get("clamped"):
        extra.append("Index clamped for a small corpus: " + "; ".join(params["clamped"]) + "\n")
    return run, "\n".join(extra) + "\n"
