"""Training throughput: dr-lab's retriever1 recipe against the sentence-transformers trainer, same work.

    DRLAB_DATA_DIR=../shared/data python -m scripts.bench_train [--steps 56] [--threads 2]

Both sides train all-MiniLM-L6-v2 (one shared tower, mean pooling, cosine / 0.05 = scale 20) on
SciFact's train split for ``--steps`` optimizer steps of 32 queries, each with its positive and one
BM25 negative from ranks 10-100, the other 31 queries' documents as in-batch negatives; AdamW, lr
2e-5, weight decay 0.01, 10% linear warm-up then linear decay, gradient clipping at 1.0, seed 42;
queries cut at 64 tokens, documents at 128.

* ``drlab_<precision>``: ``python run.py model=dpr model.encoder.shared=true
  pipeline.retriever1.max_steps=<steps> pipeline.retriever1.precision=<precision>
  pipeline.retriever1.mask_false_negatives=false`` (MNRL does not mask), chain bm25 -> retriever1 ->
  index -> eval, in a fresh output dir. steps/s from the stage's ``train_log.jsonl`` (the training
  loop's clock), peak RSS from the stage's manifest (reset at the stage's start).
* ``st_<precision>``: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` on (anchor,
  positive, negative) triplets, one per (query, positive) of the train qrels, the negative drawn
  (seed 42) from the same BM25 run's ranks 10-100 without the query's positives. ``max_seq_length``
  128 (sentence-transformers has one length for both sides; SciFact's claims are under 64 tokens).
  steps/s is the trainer's ``train_steps_per_second``; peak RSS the worker process's ``VmHWM``. Its
  checkpoint is then indexed and evaluated by dr-lab exactly like dr-lab's own (``model=pretrained``).

The systems run one after the other in this process's children, in the order
``drlab_fp32, st_fp32, drlab_bf16, st_bf16`` (``--precisions``), so each ratio compares neighbours.

``--length-sort N`` measures ``pipeline.<stage>.length_sort`` instead: N retriever1 batches (the same
model, data, lengths and bf16 autocast as dr-lab's default; negatives drawn from the corpus), each run
through ``contrastive_step`` (forward + backward) once with and once without length-sorted chunks, in
alternating order; the ratio is the median of paired seconds, next to the padded tokens per real token
of both. Writes ``outputs/bench/train_length_sort.json``.
Writes ``outputs/bench/train.json``: steps/s, seconds, peak RSS, SciFact test nDCG@10 and R@100 of
each system, and the ratios ``drlab_X / st_fp32`` and ``drlab_X / st_Y``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"error: exit {rc}; see {log}")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def drlab(out: Path, steps: int, precision: str, threads: int, data_dir: str) -> dict:
    base = out / f"drlab_{precision}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    _run([sys.executable, "run.py", "model=dpr", "data=scifact", "model.encoder.shared=true",
          f"pipeline.retriever1.max_steps={steps}", f"pipeline.retriever1.precision={precision}",
          "pipeline.retriever1.mask_false_negatives=false", "pipeline.retriever1.save_every=100000",
          f"runtime.threads={threads}", "runtime.progress=false", f"paths.output_dir={base}",
          f"paths.data_dir={data_dir}", "hydra.run.dir=" + str(base / "hydra")], base / "log.txt")
    s = _summary(base / "hydra")
    stage = Path(s["stages"]["retriever1"]["dir"])
    last = [json.loads(x) for x in (stage / "train_log.jsonl").read_text().splitlines()][-1]
    m = json.loads((stage / "manifest.json").read_text())
    return {"steps": int(last["step"]), "train_seconds": round(last["seconds"], 2),
            "steps_per_s": round(last["step"] / last["seconds"], 4), "peak_rss_mb": m["peak_rss_mb"],
            "ndcg@10": s["metrics"]["test/ndcg@10"], "recall@100": s["metrics"].get("test/recall@100"),
            "bm25_train_run": str(Path(s["stages"]["bm25"]["dir"]) / "runs" / "train.trec")}


def triplets(data_dir: Path, bm25_run: Path, window=(10, 100), seed: int = 42) -> list[tuple[str, str, str]]:
    """(query, positive text, BM25 negative text), one per (query, positive) of SciFact's train qrels."""
    from retrievers.evaluation import read_trec, trec_order

    root = data_dir / "scifact"
    docs = {}
    for line in open(root / "corpus.jsonl", encoding="utf-8"):
        d = json.loads(line)
        docs[d["_id"]] = (d["title"] + " " + d["text"]).strip() if d.get("title") else d["text"].strip()
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in open(root / "queries.jsonl", encoding="utf-8")}
    pos: dict[str, list[str]] = {}
    for line in open(root / "qrels" / "train.tsv", encoding="utf-8").read().splitlines()[1:]:
        q, d, r = line.split("\t")
        if int(r) > 0:
            pos.setdefault(q, []).append(d)
    run = read_trec(bm25_run)
    rng = random.Random(seed)
    out = []
    for q in sorted(pos):
        ranked = [d for d, _ in trec_order(run.get(q, {}))][window[0] - 1 : window[1]]
        pool = [d for d in ranked if d not in pos[q]]
        for p in pos[q]:
            if pool:
                out.append((queries[q], docs[p], docs[rng.choice(pool)]))
    return out


def st_worker(spec_path: str) -> None:
    """Child process: train with sentence-transformers per the spec JSON, save, write the result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    from pipelines.provenance import status_mb
    from retrievers.hub import resolve_model

    rows = json.loads(Path(spec["triplets"]).read_text())
    ds = Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows],
                            "negative": [r[2] for r in rows]})
    model = SentenceTransformer(resolve_model(MODEL), device="cpu")
    model.max_seq_length = 128
    args = SentenceTransformerTrainingArguments(
        output_dir=spec["out"] + "/trainer", max_steps=int(spec["steps"]), per_device_train_batch_size=32,
        learning_rate=2e-5, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0, seed=42,
        bf16=spec["precision"] == "bf16", use_cpu=True, logging_steps=10, save_strategy="no", report_to=[],
        dataloader_drop_last=True, disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                         loss=losses.MultipleNegativesRankingLoss(model, scale=20.0))
    res = trainer.train()
    model.save(spec["out"] + "/model")
    Path(spec["result"]).write_text(json.dumps({
        "steps": int(res.global_step), "train_seconds": round(res.metrics["train_runtime"], 2),
        "steps_per_s": round(res.global_step / res.metrics["train_runtime"], 4), "peak_rss_mb": status_mb("VmHWM"),
        "examples": len(rows)}))


def st(out: Path, steps: int, precision: str, threads: int, data_dir: str, trip: Path) -> dict:
    base = out / f"st_{precision}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    spec = base / "spec.json"
    spec.write_text(json.dumps({"steps": steps, "precision": precision, "threads": threads, "triplets": str(trip),
                                "out": str(base), "result": str(base / "result.json")}))
    _run([sys.executable, "-m", "scripts.bench_train", "--st-worker", str(spec)], base / "train_log.txt")
    r = json.loads((base / "result.json").read_text())
    _run([sys.executable, "run.py", "model=pretrained", "data=scifact", f"model.checkpoint={base / 'model'}",
          f"runtime.threads={threads}", "runtime.progress=false", f"paths.output_dir={base / 'eval'}",
          f"paths.data_dir={data_dir}", "hydra.run.dir=" + str(base / "eval_run")], base / "eval_log.txt")
    s = _summary(base / "eval_run")
    r.update({"ndcg@10": s["metrics"]["test/ndcg@10"], "recall@100": s["metrics"].get("test/recall@100")})
    return r


def length_sort_pairs(n: int, threads: int, data_dir: str, chunk: int = 16) -> dict:
    """Paired seconds of one contrastive step with and without ``length_sort`` (see the module docstring)."""
    import statistics

    import torch

    from retrievers.contrastive import ContrastiveData, contrastive_step
    from retrievers.data import load_dataset
    from retrievers.dpr import build
    from retrievers.precision import choose
    from scripts.bench_encode import _cpu_name

    torch.set_num_threads(threads)
    ds = load_dataset({"name": "scifact", "format": "beir", "path": str(Path(data_dir) / "scifact")}, ["train"])
    enc = build(MODEL, shared=True, pooling="mean", normalize=True, similarity="cos", temperature=0.05,
                query_max_len=64, doc_max_len=128, local_dirs=None)
    doc_ids = list(ds.corpus)
    data = ContrastiveData(ds.queries, ds.positives("train"), dict(zip(doc_ids, enc.doc_texts([ds.corpus[d] for d in doc_ids]))),
                           n_negatives=1)
    bf16, _ = choose("auto", enc, [data.doc_text[d] for d in doc_ids[:64]], "doc", device=torch.device("cpu"),
                     batch_size=64, who="bench")
    precision = "bf16" if bf16 else "fp32"
    enc.train()
    batches = data.epoch_batches(0, seed=42, batch_size=32)[:n]
    seconds = {"off": [], "on": []}
    padding = {k: {"tokens": 0, "padded": 0, "padded_unsorted": 0} for k in seconds}
    contrastive_step(enc, batches[0], batches[0], device=torch.device("cpu"), precision=precision)  # warm-up
    for i, b in enumerate(batches):
        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
            enc.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            contrastive_step(enc, b, b, device=torch.device("cpu"), precision=precision, chunk_size=chunk,
                             length_sort=mode == "on", padding=padding[mode])
            seconds[mode].append(time.perf_counter() - t0)
        print(f"batch {i + 1}/{len(batches)}: off {seconds['off'][-1]:.2f} s, on {seconds['on'][-1]:.2f} s", flush=True)
    return {
        "batches": len(batches), "batch_size": 32, "chunk_size": chunk, "precision": precision, "threads": threads,
        "seconds_per_step": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "speedup_on_vs_off": round(statistics.median(a / b for a, b in zip(seconds["off"], seconds["on"])), 4),
        "padded_per_token": {k: round(v["padded"] / v["tokens"], 4) for k, v in padding.items()},
        "seconds": seconds, "cpu": _cpu_name(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=56, help="optimizer steps (SciFact: 28 batches of 32 per epoch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--data-dir", default=os.environ.get("DRLAB_DATA_DIR", str(REPO / "data")))
    ap.add_argument("--work", default=str(REPO / "outputs" / "bench" / "train_runs"))
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "train.json"))
    ap.add_argument("--length-sort", type=int, metavar="N", default=0,
                    help="instead: N paired steps with and without pipeline.<stage>.length_sort")
    ap.add_argument("--st-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.st_worker:
        st_worker(args.st_worker)
        return {}
    if args.length_sort:
        res = length_sort_pairs(args.length_sort, args.threads, str(Path(args.data_dir).resolve()))
        dest = Path(args.out).with_name("train_length_sort.json")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(res, indent=2) + "\n")
        print(f"length_sort: {res['seconds_per_step']} s/step, speedup {res['speedup_on_vs_off']}x, padded per real "
              f"token {res['padded_per_token']}\nwrote {dest}")
        return res
    import sentence_transformers
    import torch
    import transformers

    from scripts.bench_encode import _cpu_name

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).resolve())
    results: dict[str, dict] = {}
    trip = work / "triplets.json"
    t0 = time.time()
    for prec in args.precisions:
        results[f"drlab_{prec}"] = drlab(work, args.steps, prec, args.threads, data_dir)
        if not trip.exists():
            trip.write_text(json.dumps(triplets(Path(data_dir), Path(results[f"drlab_{prec}"]["bm25_train_run"]))))
        results[f"st_{prec}"] = st(work, args.steps, prec, args.threads, data_dir, trip)
        print(json.dumps({k: v for k, v in results.items() if k.endswith(prec)}, indent=1), flush=True)
    ratios = {f"{a}/{b}": round(results[a]["steps_per_s"] / results[b]["steps_per_s"], 4)
              for a in results if a.startswith("drlab") for b in results if b.startswith("st")}
    out = {
        "model": MODEL, "steps": args.steps, "batch_size": 32, "threads": args.threads,
        "cpu": _cpu_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__, "python": platform.python_version()},
        "systems": results, "ratios": ratios,
        "ndcg_delta_vs_st_fp32": {k: round(v["ndcg@10"] - results["st_fp32"]["ndcg@10"], 4)
                                  for k, v in results.items()} if "st_fp32" in results else {},
        "wall_seconds": round(time.time() - t0, 1),
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    for k, v in results.items():
        print(f"{k}: {v['steps_per_s']} steps/s, peak RSS {v['peak_rss_mb']} MiB, nDCG@10 {v['ndcg@10']:.4f}")
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()) + f"\nwrote {dest}")
    return out


if __name__ == "__main__":
    main()
