"""Memory and time of indexing, search and mining at MS MARCO scale, simulated with synthetic vectors.

    python -m scripts.bench_scale                                  # 0.25M, 0.5M, 1M, 2M x 384 (this machine)
    python -m scripts.bench_scale --sizes 8.8e6 --dim 768          # the real size, on a bigger box
    python -m scripts.bench_scale --sizes 2e5 4e5 --queries 200    # a quick look

No encoder runs: unit vectors drawn around 4096 random centres (so IVF has clusters to find) are
written as the index stage writes them, fp16 ``shard_NNN.npy`` of ``--shard-size`` rows, and read
memory-mapped. Each configuration then runs in its own process, so its peak RSS (``ru_maxrss``) is
its own, counted from just before the work (``/proc/self/clear_refs``). Two numbers: ``excess_rss_mb``
(VmHWM: includes the page cache of the memory-mapped shards, which the kernel can drop) and
``excess_anon_mb`` (anonymous memory, sampled every 20 ms: what must fit in RAM):

* ``flat``: :func:`retrievers.faiss_index.build_index` (Flat, rows added in ``add_batch_size`` blocks
  from the mmap) + :func:`retrievers.faiss_index.search` (chunked) to depth 100 -- the index stage + eval;
* ``flat-sharded``: :func:`retrievers.faiss_index.search_shards`, a Flat index per shard, merged at
  search time -- memory bounded by one shard, not the corpus;
* ``ivfpq``: ``IVF{nlist},PQ{m}`` trained on ``--train`` vectors, nprobe 32; recall@100 against flat;
* ``mine``: ``flat-sharded`` with ``--mine-queries`` queries to depth 200, then
  :func:`retrievers.mining.select_negatives` (window 3-200, 30 per query) -- the mine stage.

Fits ``log(y) = a + b log(N)`` per configuration for seconds and for excess RSS (b ~ 1: linear; b ~ 0:
bounded), extrapolates to 8.8M x 768 (MS MARCO passage, 503k train queries to mine) and 21M x 768 (DPR
Wikipedia, 59k NQ train queries): times x (768 / dim) x (train queries / ``--mine-queries``), and writes
``outputs/bench/scale.json`` and ``outputs/bench/scale.png`` (log-log).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("flat", "flat-sharded", "ivfpq", "mine")


def make_data(root: Path, n: int, dim: int, n_queries: int, shard_size: int, seed: int = 0) -> dict:
    """fp16 shards of ``n`` unit vectors around random centres, and float32 queries near some of them."""
    meta_path = root / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, dim)).astype(np.float32)
    shards = []
    for s, lo in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - lo)
        x = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / f"shard_{s:03d}.npy", x.astype(np.float16))
        shards.append(f"shard_{s:03d}.npy")
    first = np.load(root / shards[0], mmap_mode="r")
    q = first[rng.integers(0, first.shape[0], n_queries)].astype(np.float32)
    q += 0.3 * rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(dim)
    np.save(root / "queries.npy", q / np.linalg.norm(q, axis=1, keepdims=True))
    meta = {"n": n, "dim": dim, "shards": shards, "queries": n_queries}
    meta_path.write_text(json.dumps(meta))
    return meta


def child(a) -> dict:
    """One configuration in this process: (seconds, peak RSS, recall where it applies)."""
    import faiss

    from pipelines.provenance import reset_peak_rss, status_mb
    from retrievers.faiss_index import build_index, search, search_shards

    faiss.omp_set_num_threads(a.threads)
    root = Path(a.root)
    meta = json.loads((root / "meta.json").read_text())
    shards = [np.load(root / s, mmap_mode="r") for s in meta["shards"]]
    q = np.load(root / "queries.npy")
    out: dict = {"config": a.config}
    reset_peak_rss()  # the peak from here on: what this configuration adds to a process that has imported faiss
    before, anon_before = status_mb("VmRSS"), status_mb("RssAnon")
    anon_peak = [anon_before]
    stop = threading.Event()

    def sample() -> None:  # RssAnon has no high-water mark: sample it
        while not stop.wait(0.02):
            anon_peak[0] = max(anon_peak[0], status_mb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if a.config == "flat":
        index, _ = build_index(shards, "Flat", use_gpu=False, progress=False)
        out["build_s"] = time.perf_counter() - t0
        _, ids = search(index, q, 100, chunk=256)
        out["index_bytes"] = int(index.ntotal) * meta["dim"] * 4
        np.save(root / "flat_ids.npy", ids)
    elif a.config == "flat-sharded":
        _, ids = search_shards(shards, q, 100, chunk=256)
    elif a.config == "ivfpq":
        n = meta["n"]
        nlist = int(min(4 * np.sqrt(n), a.train // 39))
        m = meta["dim"] // 8  # 8 dims per 1-byte code (PQ48 at 384, PQ96 at 768)
        index, params = build_index(shards, f"IVF{nlist},PQ{m}", nprobe=32, max_train_points=a.train,
                                    use_gpu=False, progress=False)
        out["build_s"] = time.perf_counter() - t0
        out["factory"] = params["factory"]
        _, ids = search(index, q, 100, chunk=256)
        out["index_bytes"] = int(index.ntotal) * (m + 8) + nlist * meta["dim"] * 4
        flat = root / "flat_ids.npy"
        if flat.exists():
            ref = np.load(flat)
            out["recall@100_vs_flat"] = float(np.mean([len(set(x) & set(y)) / 100 for x, y in zip(ids, ref)]))
    elif a.config == "mine":
        from retrievers.mining import select_negatives

        mq = np.resize(q, (a.mine_queries, q.shape[1]))
        _, ids = search_shards(shards, mq, 200, chunk=256)
        ranked = {str(r): [(str(int(i)), 0.0) for i in row] for r, row in enumerate(ids)}
        positives = {str(r): [str(int(row[0]))] for r, row in enumerate(ids)}
        select_negatives(ranked, positives, (3, 200), 30, 0)
    out["seconds"] = time.perf_counter() - t0
    stop.set()
    sampler.join()
    out["peak_rss_mb"] = status_mb("VmHWM")
    out["excess_rss_mb"] = round(out["peak_rss_mb"] - before, 1)  # incl. the mapped shards' page cache
    out["excess_anon_mb"] = round(max(anon_peak[0], status_mb("RssAnon")) - anon_before, 1)  # what must fit in RAM
    return out


def fit(ns, ys) -> dict:
    ns, ys = np.asarray(ns, float), np.maximum(np.asarray(ys, float), 1e-9)
    b, a = np.polyfit(np.log(ns), np.log(ys), 1)
    return {"exponent": round(float(b), 3), "log_intercept": float(a)}


def predict(f: dict, n: float) -> float:
    return float(np.exp(f["log_intercept"]) * n ** f["exponent"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[2.5e5, 5e5, 1e6, 2e6])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--mine-queries", type=int, default=5000)
    ap.add_argument("--shard-size", type=int, default=100000)
    ap.add_argument("--train", type=int, default=65536, help="IVF-PQ training vectors")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "bench" / "scale_data")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "scale.json")
    ap.add_argument("--keep-data", action="store_true", help="keep the synthetic shards (GBs)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    rows = []
    for n in [int(s) for s in a.sizes]:
        root = a.work / f"{n}x{a.dim}"
        t0 = time.perf_counter()
        meta = make_data(root, n, a.dim, a.queries, a.shard_size)
        print(f"[bench_scale] {n:,} x {a.dim}: data in {time.perf_counter() - t0:.0f} s ({len(meta['shards'])} shards)",
              flush=True)
        res = {}
        for c in CONFIGS:
            cmd = [sys.executable, "-m", "scripts.bench_scale", "--child", "--config", c, "--root", str(root),
                   "--threads", str(a.threads), "--train", str(a.train), "--mine-queries", str(a.mine_queries)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{c} at {n}: failed\n{proc.stderr[-2000:]}")
            res[c] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {c:<13} {res[c]['seconds']:8.1f} s  peak RSS +{res[c]['excess_rss_mb']:.0f} MiB, "
                  f"anonymous +{res[c]['excess_anon_mb']:.0f} MiB" + (f"  recall@100 vs flat {res[c]['recall@100_vs_flat']:.3f}"
                                                        if "recall@100_vs_flat" in res[c] else ""), flush=True)
        rows.append({"n": n, "dim": a.dim, "data_bytes": n * a.dim * 2, **{c: res[c] for c in CONFIGS}})
        if not a.keep_data:
            for f in root.iterdir():
                f.unlink()
            root.rmdir()
    ns = [r["n"] for r in rows]
    fits = {c: {"seconds": fit(ns, [r[c]["seconds"] for r in rows]),
                "excess_rss_mb": fit(ns, [max(r[c]["excess_rss_mb"], 1.0) for r in rows]),
                "excess_anon_mb": fit(ns, [max(r[c]["excess_anon_mb"], 1.0) for r in rows])}
            for c in CONFIGS} if len(ns) > 1 else {}
    # corpus, dim, train queries the mine stage searches (MS MARCO train; NQ train as in DPR)
    targets = {"msmarco-passage 8.8M x 768": (8.8e6, 768, 502939), "dpr-wikipedia 21M x 768": (21e6, 768, 58880)}
    extrapolated = {}
    for name, (n, d, train_q) in targets.items():
        scale = d / a.dim  # time and Flat memory grow with the dimension too
        m = d // 8
        extrapolated[name] = {
            "flat_index_gb": round(n * d * 4 / 2**30, 1),
            "fp16_shards_gb": round(n * d * 2 / 2**30, 1),
            f"ivfpq_PQ{m}_index_gb": round((n * (m + 8) + 4 * np.sqrt(n) * d * 4) / 2**30, 2),
            "flat-sharded_peak_gb": round(a.shard_size * d * 4 / 2**30 + 1.0, 2),
            **({f"{c}_seconds": round(predict(fits[c]["seconds"], n) * scale) for c in fits} if fits else {}),
        }
        if fits:  # search time grows with the queries: the mine stage searches every train query
            extrapolated[name]["mine_seconds"] = round(predict(fits["mine"]["seconds"], n) * scale * train_q
                                                       / a.mine_queries)
            extrapolated[name]["mine_train_queries"] = train_q
    out = {"machine": {"cpus": os.cpu_count(), "threads": a.threads}, "sizes": rows, "fits": fits,
           "extrapolated": extrapolated, "argv": sys.argv[1:]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    if len(ns) > 1:
        plot(rows, a.out.with_suffix(".png"))
    print(json.dumps({"fits": fits, "extrapolated": extrapolated}, indent=2))
    print(f"wrote {a.out}")
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for c in CONFIGS:
        ax1.loglog(ns, [r[c]["seconds"] for r in rows], "o-", label=c)
        ax2.loglog(ns, [max(r[c]["excess_anon_mb"], 1.0) for r in rows], "o-", label=c)
    ax1.set(xlabel="corpus vectors", ylabel="seconds (build + search)", title="time")
    ax2.set(xlabel="corpus vectors", ylabel="peak anonymous memory added (MiB)", title="memory")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
