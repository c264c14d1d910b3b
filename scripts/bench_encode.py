"""Corpus encoding throughput: dr-lab's default against sentence-transformers' default and fastest setting.

    DRLAB_DATA_DIR=../shared/data python -m scripts.bench_encode [--n 2000] [--batch-size 128]

Same model (sentence-transformers/all-MiniLM-L6-v2), same texts (the first ``--n`` SciFact documents,
``title + " " + text``), same batch size, maximum length, device and thread count, in one process.
The systems:

* ``drlab``: ``BiEncoder.encode`` as the index stage runs it by default: ``backend: auto`` (OpenVINO
  on the CPU when installed) and ``precision: auto`` (resolved and checked on these texts by
  :func:`retrievers.precision.choose` as a stage does; the check's seconds are reported apart,
  ``check_seconds``);
* ``drlab_torch_fp32`` / ``drlab_torch_bf16``: the same encoder on torch, fp32 / bf16 autocast;
* ``st_fp32``: ``SentenceTransformer.encode`` as its docs show it (fp32), sentence-transformers'
  default;
* ``st_bf16``: the same under ``torch.autocast(bfloat16)``, its fastest setting on this CPU;

Other jobs on a shared machine swing throughput by 2-3x within minutes, so the texts are cut into
chunks (``--chunk``) and every system encodes each chunk back to back, in an order that rotates
from chunk to chunk. A ratio ``A/B`` is the median over all chunks and repeats of ``B seconds /
A seconds`` on the same chunk. Quality: the largest absolute difference between dr-lab's torch fp32
and sentence-transformers' fp32 vectors (< 1e-5), and each system's smallest and mean cosine to
dr-lab's torch fp32 vectors. ``token_cache``: tokenising the texts against reading their ids from
:mod:`retrievers.token_cache` (what the index stage, mining, ANCE refreshes and a sweep's runs reuse).

Writes ``outputs/bench/encode.json``, which keeps every measurement.
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="number of SciFact documents (default 2000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=256, help="max tokens per document (MiniLM's max_seq_length)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes over the texts")
    ap.add_argument("--chunk", type=int, default=250, help="texts per paired measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                    help="dr-lab's encoding backend (default: auto, as a run)")
    ap.add_argument("--data-dir", default=os.environ.get("DRLAB_DATA_DIR", str(REPO / "data")))
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "encode.json"))
    args = ap.parse_args(argv)

    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    from retrievers.encoder import build_biencoder, resolve_device
    from retrievers.hub import resolve_model
    from retrievers.openvino_backend import planned as planned_backend
    from retrievers.precision import choose, cosine_rows, cpu_bf16_flags

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    texts = load_texts(Path(args.data_dir), args.n)
    path = resolve_model(MODEL)

    drlab = build_biencoder(MODEL, read_st=True)  # what model=pretrained builds, as the index stage runs it
    drlab.cfg["doc_max_len"] = args.max_len
    drlab.to(device)
    drlab.backend = planned_backend(args.backend, str(device))
    t0 = time.perf_counter()
    use_bf16, prec = choose("auto", drlab, texts, "doc", device=device, batch_size=args.batch_size, who="bench")
    check_seconds = time.perf_counter() - t0
    torch_fp32 = build_biencoder(MODEL, read_st=True)  # the same encoder on torch, fp32
    torch_fp32.cfg["doc_max_len"] = args.max_len
    torch_fp32.to(device)
    st = SentenceTransformer(path, device=str(device))
    st.max_seq_length = args.max_len

    def drlab_at(enc, bf16: bool):
        return lambda ch: enc.encode(ch, "doc", batch_size=args.batch_size, device=device, bf16=bf16, progress=False)

    def st_at(bf16: bool):
        def run(ch):
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                return st.encode(ch, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return run

    systems = {"drlab": drlab_at(drlab, use_bf16), "drlab_torch_fp32": drlab_at(torch_fp32, False),
               "drlab_torch_bf16": drlab_at(torch_fp32, True), "st_fp32": st_at(False), "st_bf16": st_at(True)}
    for f in systems.values():  # warm-up (allocator, oneDNN / OpenVINO kernels)
        f(texts[:8])

    chunks = [texts[i : i + args.chunk] for i in range(0, len(texts), args.chunk)]
    names = list(systems)
    seconds: dict[str, list[list[float]]] = {k: [] for k in names}  # [repeat][chunk]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for r in range(args.repeats):
        for k in names:
            seconds[k].append([])
        for ci, ch in enumerate(chunks):
            shift = (r * len(chunks) + ci) % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                v = systems[name](ch)
                seconds[name][r].append(time.perf_counter() - t0)
                if r == 0:
                    parts[name].append(v)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {len(texts) / sum(seconds[k][r]):.1f}" for k in names) + " docs/s", flush=True)
    vectors = {k: np.concatenate(v) for k, v in parts.items()}

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(
            sb / sa for ra, rb in zip(seconds[a], seconds[b]) for sa, sb in zip(ra, rb)), 4)

    rate = {k: round(statistics.median(len(texts) / sum(x) for x in seconds[k]), 2) for k in names}
    ref = vectors["drlab_torch_fp32"]
    out: dict = {
        "model": MODEL, "n_docs": len(texts), "batch_size": args.batch_size, "max_len": args.max_len,
        "repeats": args.repeats, "chunk": args.chunk, "threads": args.threads, "device": str(device),
        "cpu": _cpu_name(), "cpu_bf16_flags": list(cpu_bf16_flags()),
        "drlab_default_precision": prec, "drlab_default_backend": drlab.backend,
        "check_seconds": round(check_seconds, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__,
                     "python": platform.python_version()},
        "docs_per_s": rate,
        "ratios": {f"{a}/{b}": ratio(a, b) for a in names if a.startswith("drlab") for b in names
                   if b.startswith("st_")},
        "cosine_to_drlab_torch_fp32": {k: {"min": float(c.min()), "mean": float(c.mean())}
                                 for k in names for c in [cosine_rows(vectors[k], ref)]},
        "fp32_max_abs_diff_drlab_vs_st": float(np.abs(ref - vectors["st_fp32"]).max()),
        "seconds_per_chunk": seconds,
    }
    out["token_cache"] = bench_token_cache(drlab.tokenizer, texts, args.max_len, rate["drlab"])
    out["targets"] = {
        "drlab/st_fp32>=1.5": out["ratios"]["drlab/st_fp32"] >= 1.5,
        "drlab/st_bf16>=1.2": out["ratios"]["drlab/st_bf16"] >= 1.2,
        "fp32_max_abs_diff<1e-5": out["fp32_max_abs_diff_drlab_vs_st"] < 1e-5,
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"dr-lab default: {prec['precision']}, {drlab.backend} (check {check_seconds:.1f} s on "
          f"{prec.get('bf16_check_texts', 0)} texts, min cosine {prec.get('bf16_check_min_cosine')})")
    print("docs/s: " + ", ".join(f"{k} {v}" for k, v in rate.items()))
    print("ratios (paired chunk medians): " + ", ".join(f"{k} {v}" for k, v in out["ratios"].items()))
    print("cosine to dr-lab torch fp32 (min): " + ", ".join(
        f"{k} {v['min']:.6f}" for k, v in out["cosine_to_drlab_torch_fp32"].items()))
    tc = out["token_cache"]
    print(f"token ids: tokenising {tc['texts']} texts {tc['tokenize_seconds']} s ({100 * tc['tokenize_share_of_encode']:.1f}% "
          f"of dr-lab's encode), from the cache {tc['cached_seconds']} s ({tc['speedup']}x)")
    print(f"targets: {out['targets']}\nwrote {dest}")
    return out


def bench_token_cache(tokenizer, texts: list[str], max_len: int, docs_per_s: float, repeats: int = 3) -> dict:
    """Tokenising ``texts`` against reading their ids from :mod:`retrievers.token_cache` (median of ``repeats``)."""
    import tempfile

    from retrievers import token_cache

    with tempfile.TemporaryDirectory() as tmp:
        token_cache.configure(tmp)
        tok_s, read_s = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            tokenizer(texts, truncation=True, max_length=max_len)
            tok_s.append(time.perf_counter() - t0)
            if r == 0:
                t0 = time.perf_counter()
                token_cache.tokenize(tokenizer, texts, max_len)  # the miss: tokenise, check, write
                write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            token_cache.tokenize(tokenizer, texts, max_len)
            read_s.append(time.perf_counter() - t0)
        token_cache.configure(None)
    tok, read = statistics.median(tok_s), statistics.median(read_s)
    return {"texts": len(texts), "tokenize_seconds": round(tok, 3), "first_call_seconds": round(write_s, 3),
            "cached_seconds": round(read, 3), "speedup": round(tok / read, 2),
            "tokenize_share_of_encode": round(tok / (len(texts) / docs_per_s), 4)}


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
