"""Corpus encoding throughput: dr-lab's ``BiEncoder.encode`` vs ``SentenceTransformer.encode``.

    DRLAB_DATA_DIR=../shared/data python -m scripts.bench_encode [--n 2000] [--batch-size 128]

Same model (sentence-transformers/all-MiniLM-L6-v2 via ``retrievers.hub.resolve_model``),
same texts (the first ``--n`` SciFact documents, ``title + " " + text``), same batch size
and maximum length, same device and thread count, measured in the same process.

Other jobs on a shared machine swing throughput by 2-3x within minutes, so the texts are
cut into chunks (``--chunk``, default 500) and both libraries encode each chunk back to
back, alternating which goes first; ``ratio`` is the median over all chunks and repeats
of the paired ratio ``st seconds / drlab seconds`` (= drlab docs/s / st docs/s). Also
reported: median docs/s per library over the repeats (wall clock and process CPU time),
for fp32 and for bf16 autocast (CPU bf16 autocast where there is no GPU), the largest
absolute difference between the two libraries' fp32 embeddings (they must agree to
< 1e-5) and the cosine between dr-lab's bf16 and fp32 embeddings (min and mean; target:
min >= 0.9999).

Writes ``outputs/bench/encode.json`` (target for the fp32 ratio: >= 1.0); the JSON keeps
every individual measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def load_texts(data_dir: Path, n: int) -> list[str]:
    path = data_dir / "scifact" / "corpus.jsonl"
    if not path.exists():
        sys.exit(f"error: {path} not found; set DRLAB_DATA_DIR (or --data-dir) to the directory holding scifact/")
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            title, text = d.get("title") or "", d.get("text") or ""
            texts.append((title + " " + text).strip() if title else text.strip())
            if len(texts) == n:
                break
    return texts


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="number of SciFact documents (default 2000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=256, help="max tokens per document (MiniLM's max_seq_length)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per library and precision")
    ap.add_argument(
        "--chunk", type=int, default=500,
        help="texts per paired measurement (both libraries encode each chunk back to back; 0: all at once)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--data-dir", default=os.environ.get("DRLAB_DATA_DIR", str(REPO / "data")))
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "encode.json"))
    args = ap.parse_args(argv)

    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    from retrievers.encoder import resolve_device
    from retrievers.hub import resolve_model
    from retrievers.pretrained import build

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    texts = load_texts(Path(args.data_dir), args.n)
    path = resolve_model(MODEL)

    drlab = build(MODEL)
    drlab.cfg["doc_max_len"] = args.max_len
    drlab.to(device)
    st = SentenceTransformer(path, device=str(device))
    st.max_seq_length = args.max_len

    def run_drlab(chunk: list[str], bf16: bool) -> np.ndarray:
        return drlab.encode(chunk, "doc", batch_size=args.batch_size, device=device, bf16=bf16, progress=False)

    def run_st(chunk: list[str], bf16: bool) -> np.ndarray:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            return st.encode(chunk, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)

    systems = {"drlab": run_drlab, "sentence_transformers": run_st}
    # warm-up (allocator, oneDNN kernels) on a few texts, both precisions
    for bf16 in (False, True):
        for f in systems.values():
            f(texts[:8], bf16)

    chunk = args.chunk or len(texts)
    chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    results: dict = {}
    embeddings: dict[tuple[str, str], np.ndarray] = {}
    for prec in args.precisions:
        bf16 = prec == "bf16"
        wall: dict[str, list[float]] = {k: [] for k in systems}  # per repeat, whole text set
        cpu: dict[str, list[float]] = {k: [] for k in systems}
        paired: list[float] = []  # drlab/st docs/s on the same chunk, measured back to back
        for r in range(args.repeats):
            w = {k: 0.0 for k in systems}
            c = {k: 0.0 for k in systems}
            parts: dict[str, list[np.ndarray]] = {k: [] for k in systems}
            for ci, ch in enumerate(chunks):
                order = list(systems) if (r + ci) % 2 == 0 else list(reversed(systems))
                dt = {}
                for name in order:
                    t0, c0 = time.perf_counter(), time.process_time()
                    parts[name].append(systems[name](ch, bf16))
                    dt[name] = time.perf_counter() - t0
                    w[name] += dt[name]
                    c[name] += time.process_time() - c0
                paired.append(dt["sentence_transformers"] / dt["drlab"])
            for name in systems:
                wall[name].append(w[name])
                cpu[name].append(c[name])
                embeddings[(name, prec)] = np.concatenate(parts[name])
            print(
                f"{prec} repeat {r + 1}/{args.repeats}: drlab {len(texts) / w['drlab']:.1f} docs/s, "
                f"sentence-transformers {len(texts) / w['sentence_transformers']:.1f} docs/s "
                f"(paired chunk ratios so far: median {statistics.median(paired):.3f})",
                flush=True,
            )
        rate = {k: [len(texts) / t for t in v] for k, v in wall.items()}
        cpu_rate = {k: [len(texts) / t for t in v] for k, v in cpu.items()}
        med = {k: statistics.median(v) for k, v in rate.items()}
        results[prec] = {
            "drlab_docs_per_s": round(med["drlab"], 2),
            "st_docs_per_s": round(med["sentence_transformers"], 2),
            # drlab/st on the same chunk, back to back, alternating who goes first: the
            # estimate least sensitive to other jobs on the machine
            "ratio": round(statistics.median(paired), 4),
            "ratio_of_median_docs_per_s": round(med["drlab"] / med["sentence_transformers"], 4),
            "ratio_cpu_time": round(
                statistics.median(cpu_rate["drlab"]) / statistics.median(cpu_rate["sentence_transformers"]), 4
            ),
            "paired_chunk_ratios": [round(x, 4) for x in paired],
            "drlab_runs_docs_per_s": [round(x, 2) for x in rate["drlab"]],
            "st_runs_docs_per_s": [round(x, 2) for x in rate["sentence_transformers"]],
            "drlab_cpu_docs_per_s": [round(x, 2) for x in cpu_rate["drlab"]],
            "st_cpu_docs_per_s": [round(x, 2) for x in cpu_rate["sentence_transformers"]],
        }
    out: dict = {
        "model": MODEL,
        "n_docs": len(texts),
        "batch_size": args.batch_size,
        "max_len": args.max_len,
        "repeats": args.repeats,
        "chunk": chunk,
        "threads": args.threads,
        "device": str(device),
        "cpu": _cpu_name(),
        "bf16_mode": f"torch.autocast({device.type}, bfloat16) for both libraries",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "python": platform.python_version(),
        },
        **results,
    }
    if ("drlab", "fp32") in embeddings and ("sentence_transformers", "fp32") in embeddings:
        out["fp32_max_abs_diff_drlab_vs_st"] = float(
            np.abs(embeddings[("drlab", "fp32")] - embeddings[("sentence_transformers", "fp32")]).max()
        )
    if ("drlab", "fp32") in embeddings and ("drlab", "bf16") in embeddings:
        c = cosine(embeddings[("drlab", "bf16")], embeddings[("drlab", "fp32")])
        out["bf16_vs_fp32_cosine"] = {"min": float(c.min()), "mean": float(c.mean())}
    if ("sentence_transformers", "fp32") in embeddings and ("sentence_transformers", "bf16") in embeddings:
        c = cosine(embeddings[("sentence_transformers", "bf16")], embeddings[("sentence_transformers", "fp32")])
        out["st_bf16_vs_fp32_cosine"] = {"min": float(c.min()), "mean": float(c.mean())}
    out["targets"] = {
        "fp32_ratio>=1.0": out.get("fp32", {}).get("ratio", 0) >= 1.0 if "fp32" in out else None,
        "bf16_min_cosine>=0.9999": (
            out["bf16_vs_fp32_cosine"]["min"] >= 0.9999 if "bf16_vs_fp32_cosine" in out else None
        ),
        "fp32_max_abs_diff<1e-5": (
            out["fp32_max_abs_diff_drlab_vs_st"] < 1e-5 if "fp32_max_abs_diff_drlab_vs_st" in out else None
        ),
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    for prec in args.precisions:
        r = out[prec]
        print(
            f"{prec}: drlab {r['drlab_docs_per_s']} docs/s, sentence-transformers {r['st_docs_per_s']} docs/s, "
            f"ratio {r['ratio']} (paired median; CPU-time ratio {r['ratio_cpu_time']})"
        )
    for k in ("fp32_max_abs_diff_drlab_vs_st", "bf16_vs_fp32_cosine", "st_bf16_vs_fp32_cosine"):
        if k in out:
            print(f"{k}: {out[k]}")
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


if __name__ == "__main__":
    main()
