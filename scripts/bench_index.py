"""Compare FAISS index types on the same stored embeddings: recall, size, latency.

    # from a finished index stage directory
    python -m scripts.bench_index --index-dir outputs/cache/index/index-v1-<key>
    # or let dr-lab build (or reuse from its cache) the index stage first
    DRLAB_DATA_DIR=../shared/data python -m scripts.bench_index model=pretrained data=scifact

The corpus vectors are the ``embeddings/shard_NNN.npy`` an ``index`` stage stored; each
index type is built from exactly those vectors with :func:`retrievers.faiss_index.build_index`:

* ``Flat``: exact inner-product search (FAISS; Johnson, Douze & Jegou 2019);
* ``HNSW32``: graph search (Malkov & Yashunin, TPAMI 2018), efConstruction/efSearch of
  ``conf/index/hnsw.yaml``;
* ``IVF{nlist},PQ{m}``: inverted lists + product quantisation (Jegou, Douze & Schmid,
  TPAMI 2011), nprobe of ``conf/index/ivfpq.yaml`` (clamped on small corpora, as the stage does).

The eval queries are encoded once with the encoder the index stage recorded
(``encoder.json``), every index is searched to ``--depth``, and ranx (via
:func:`retrievers.evaluation.evaluate`) scores the runs against the qrels. Reported per
index: recall@100 (and nDCG@10, recall@10), recall relative to Flat, overlap with Flat's
top-100, size of ``index.faiss``, build seconds, batched search latency (ms/query) and
single-query latency (median ms). Writes ``outputs/bench/index_<data>.json`` and prints a
table. Acceptance for this repo: HNSW recall@100 >= 0.99 x Flat's on SciFact with
all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

log = logging.getLogger("drlab")


def index_dir_from_config(overrides: list[str]) -> tuple[Path, str]:
    """Compose conf/ with ``overrides``, run (or reuse) the chain up to ``index``: (index dir, data path)."""
    from hydra import compose, initialize_config_dir

    import pipelines.runner as runner

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "stage=index"])
    run_dir = Path(cfg.paths.output_dir) / "bench" / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    summary = runner.run_pipeline(cfg, run_dir)
    return Path(summary["stages"]["index"]["dir"]), str(cfg.data.path)


def default_factories() -> list[dict]:
    from omegaconf import OmegaConf

    out = []
    for name in ("flat", "hnsw", "ivfpq"):
        c = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "index" / f"{name}.yaml"))
        out.append(c)
    return out


def data_cfg(index_dir: Path, data_path: str | None) -> dict:
    """The ``data`` node the index stage read (its manifest), with the dataset's path on this machine."""
    reads = json.loads((index_dir / "manifest.json").read_text())["reads"]
    data = dict(reads["data"])
    data.pop("fingerprint", None)
    if data_path:
        data["path"] = data_path
    else:
        root = os.environ.get("DRLAB_DATA_DIR", str(REPO / "data"))
        data["path"] = str(Path(root) / data["name"])
    return data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--index-dir", help="a finished index stage directory (outputs/cache/index/<key>)")
    ap.add_argument("--data-path", help="dataset directory (default: $DRLAB_DATA_DIR/<data.name>)")
    ap.add_argument("--depth", type=int, default=100, help="search depth (default 100)")
    ap.add_argument(
        "--factory", action="append",
        help="index factory to add (repeatable); default Flat, HNSW, IVF-PQ from conf/index",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="query encoding batch size")
    ap.add_argument("--single-queries", type=int, default=100, help="queries timed one at a time (median latency)")
    ap.add_argument("--out", help="JSON output (default outputs/bench/index_<data>.json)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides when no --index-dir is given (model=... data=...)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

    import faiss
    import torch
    from omegaconf import OmegaConf

    from retrievers import faiss_index as ix
    from retrievers.data import load_dataset
    from retrievers.embeddings import load_embeddings
    from retrievers.evaluation import evaluate

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    data_path = args.data_path
    if args.index_dir:
        index_dir = Path(args.index_dir).resolve()
    else:
        import pipelines.runner  # noqa: F401  registers ${drlab_root:}

        index_dir, configured_path = index_dir_from_config(args.overrides)
        data_path = data_path or configured_path
    if not (index_dir / "manifest.json").exists():
        sys.exit(f"error: {index_dir} is not a finished index stage directory (no manifest.json)")

    data = data_cfg(index_dir, data_path)
    split = data["eval_split"]
    ds = load_dataset(data, [split], with_corpus=False)
    queries = ds.split_queries(split)
    qrels = ds.qrels[split]
    shards, doc_ids = load_embeddings(index_dir)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    encoder, rec = ix.load_recorded_encoder(index_dir, OmegaConf.create(manifest["reads"]["model"]["encoder"]))
    qids = list(queries)
    t0 = time.perf_counter()
    q = encoder.encode([queries[x] for x in qids], "query", batch_size=args.batch_size, progress=False)
    q_seconds = time.perf_counter() - t0
    params_stage = json.loads((index_dir / "index_params.json").read_text())
    if params_stage.get("cosine") and not rec["knobs"].get("normalize"):
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    del encoder
    p_index = manifest["reads"].get("pipeline.index", {})

    specs = default_factories() if not args.factory else [{"name": f, "factory": f} for f in args.factory]
    metrics = ["recall@100", "ndcg@10", "recall@10"]
    results: list[dict] = []
    flat_top: np.ndarray | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            t0 = time.perf_counter()
            index, params = ix.build_index(
                shards,
                spec["factory"],
                ef_construction=spec.get("ef_construction"),
                ef_search=spec.get("ef_search"),
                nprobe=spec.get("nprobe"),
                min_points_per_centroid=int(p_index.get("min_points_per_centroid", 39)),
                max_train_points=int(p_index.get("max_train_points", 262144)),
                progress=False,
            )
            build_s = time.perf_counter() - t0
            path = Path(tmp) / "index.faiss"
            faiss.write_index(index, str(path))
            size = path.stat().st_size
            k = min(args.depth, index.ntotal)
            ix.search(index, q[:8], k)  # warm-up
            t0 = time.perf_counter()
            D, I = ix.search(index, q, k, chunk=int(p_index.get("search_batch_size", 256)))
            batch_ms = 1000 * (time.perf_counter() - t0) / len(qids)
            single = []
            for i in range(min(args.single_queries, len(qids))):
                t1 = time.perf_counter()
                index.search(np.ascontiguousarray(q[i : i + 1]), k)
                single.append(1000 * (time.perf_counter() - t1))
            run = {qid: {doc_ids[j]: float(s) for s, j in zip(D[r], I[r]) if j >= 0} for r, qid in enumerate(qids)}
            means, _ = evaluate(qrels, run, metrics)
            if flat_top is None and ix.index_type(params["factory"]) == "flat":
                flat_top = I
            overlap = None
            if flat_top is not None:
                overlap = float(np.mean([len(set(a) & set(b)) / max(1, len(set(b))) for a, b in zip(I, flat_top)]))
            results.append(
                {
                    "name": spec.get("name", spec["factory"]),
                    "factory": params["factory"],
                    "factory_requested": spec["factory"],
                    "clamped": params["clamped"],
                    "ef_search": params.get("ef_search"),
                    "ef_construction": params.get("ef_construction"),
                    "nprobe": params.get("nprobe"),
                    **{m: round(v, 4) for m, v in means.items()},
                    "overlap_with_flat_top_k": round(overlap, 4) if overlap is not None else None,
                    "index_bytes": int(size),
                    "build_seconds": round(build_s, 3),
                    "search_ms_per_query_batched": round(batch_ms, 4),
                    "search_ms_single_query_median": round(float(np.median(single)), 4),
                }
            )
            del index
    flat = next((r for r in results if ix.index_type(r["factory"]) == "flat"), None)
    for r in results:
        r["recall@100_vs_flat"] = (
            round(r["recall@100"] / flat["recall@100"], 4) if flat and flat["recall@100"] else None
        )
    hnsw = next((r for r in results if ix.index_type(r["factory"]) == "hnsw"), None)
    acceptance = None
    if flat and hnsw:
        acceptance = {
            "criterion": "HNSW recall@100 >= 0.99 x Flat recall@100",
            "hnsw_over_flat": hnsw["recall@100_vs_flat"],
            "passed": hnsw["recall@100"] >= 0.99 * flat["recall@100"],
        }
    stats = json.loads((index_dir / "index_stats.json").read_text())
    out = {
        "data": data["name"],
        "split": split,
        "queries": len(qids),
        "index_dir": str(index_dir),
        "encoder": rec.get("checkpoint") or rec.get("model"),
        "vectors": int(sum(s.shape[0] for s in shards)),
        "dim": int(shards[0].shape[1]),
        "stored_dtype": str(shards[0].dtype),
        "depth": args.depth,
        "threads": args.threads,
        "query_encode_seconds": round(q_seconds, 3),
        "corpus_encode_docs_per_s": stats.get("docs_per_s"),
        "cpu": _cpu_name(),
        "faiss": faiss.__version__,
        "results": results,
        "acceptance": acceptance,
    }
    dest = Path(args.out) if args.out else REPO / "outputs" / "bench" / f"index_{data['name']}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))
    print(f"wrote {dest}")
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError as e:
        return f"unknown ({e})"
    return "unknown"


def table(out: dict) -> str:
    from retrievers.embeddings import human_bytes

    head = [
        "index", "factory built", "R@100", "vs Flat", "nDCG@10", "overlap",
        "size", "build s", "ms/q batch", "ms/q single",
    ]
    rows = [
        [
            r["name"], r["factory"], f"{r['recall@100']:.4f}",
            f"{r['recall@100_vs_flat']:.4f}" if r["recall@100_vs_flat"] is not None else "-",
            f"{r['ndcg@10']:.4f}",
            f"{r['overlap_with_flat_top_k']:.3f}" if r["overlap_with_flat_top_k"] is not None else "-",
            human_bytes(r["index_bytes"]), f"{r['build_seconds']:.2f}",
            f"{r['search_ms_per_query_batched']:.3f}", f"{r['search_ms_single_query_median']:.3f}",
        ]
        for r in out["results"]
    ]
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(n) for c, n in zip(cells, w)) + " |"  # noqa: E731
    lines = [
        f"{out['data']} ({out['split']}, {out['queries']} queries), {out['vectors']} x {out['dim']} "
        f"{out['stored_dtype']} vectors from {out['encoder']}, depth {out['depth']}, {out['threads']} threads",
        line(head),
        "|" + "|".join("-" * (n + 2) for n in w) + "|",
        *map(line, rows),
    ]
    if out.get("acceptance"):
        a = out["acceptance"]
        lines.append(f"{a['criterion']}: {a['hnsw_over_flat']} -> {'PASS' if a['passed'] else 'FAIL'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
