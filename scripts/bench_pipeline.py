"""Wall time of ``make run``'s three commands, stage by stage, against the same work in peer scripts.

    DRLAB_DATA_DIR=../shared/data python -m scripts.bench_pipeline [--threads 2] [--dpr-steps 196]

dr-lab: ``python run.py model=bm25|pretrained|dpr data=scifact`` in a fresh output dir (cold cache,
as on a fresh clone), one after the other, so the DPR command reuses the BM25 stage as ``make run``
does; the seconds per stage come from each run's ``summary.json``.

The peer does the same work the way the libraries' docs show it:

* BM25: bm25s (k1 0.9, b 0.4, English stopwords; its README's ``tokenize``, ``index``, ``retrieve``),
  then ranx. Pyserini's own CLI is not the peer because it cannot start its JVM on these machines
  (``retrievers/bm25.py`` says why); bm25s scores differ from Lucene's a little;
* MiniLM zero-shot: ``SentenceTransformer.encode`` (its defaults: fp32, batch 32,
  ``normalize_embeddings=True``), ``faiss.IndexFlatIP``, ``index.search(q, 1000)``, ranx;
* DPR: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` on (query, positive, BM25
  negative from ranks 10-100 of the peer's own BM25 train run) for the same number of steps as
  dr-lab's retriever1 (196 = 7 epochs of 28 batches of 32), then encode + FAISS + ranx as above.

Both sides get the same threads. Writes ``outputs/bench/pipeline.json``: seconds per step and per
command, the ratio peer / dr-lab per command and in all, and each side's nDCG@10.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def drlab(out: Path, threads: int, data_dir: str, dpr_steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = {}
    for family in ("bm25", "pretrained", "dpr"):
        extra = [f"pipeline.retriever1.max_steps={dpr_steps}"] if family == "dpr" and dpr_steps != 196 else []
        run_dir = out / f"run_{family}"
        t0 = time.perf_counter()
        with open(out / f"{family}.log", "w") as fh:
            rc = subprocess.call([sys.executable, "run.py", f"model={family}", "data=scifact", *extra,
                                  f"runtime.threads={threads}", "runtime.progress=false", f"paths.output_dir={out}",
                                  f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"],
                                 cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        if rc:
            sys.exit(f"error: dr-lab {family} exited {rc}; see {out / f'{family}.log'}")
        s = json.loads((run_dir / "summary.json").read_text())
        result[family] = {"seconds": round(time.perf_counter() - t0, 1),
                          "stages": {k: v.get("seconds") for k, v in s["stages"].items()},
                          "ndcg@10": s["metrics"]["test/ndcg@10"]}
    return result


def _read(data: Path):
    docs, queries, qrels = {}, {}, {"test": {}, "train": {}}
    for line in open(data / "corpus.jsonl", encoding="utf-8"):
        d = json.loads(line)
        docs[d["_id"]] = (d["title"] + " " + d["text"]).strip() if d.get("title") else d["text"].strip()
    for line in open(data / "queries.jsonl", encoding="utf-8"):
        q = json.loads(line)
        queries[q["_id"]] = q["text"]
    for split in qrels:
        for line in (data / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
            q, d, r = line.split("\t")
            qrels[split].setdefault(q, {})[d] = int(r)
    return docs, queries, qrels


def _ndcg(qrels: dict, run: dict) -> float:
    from ranx import Qrels, Run, evaluate

    return float(evaluate(Qrels.from_dict(qrels), Run.from_dict(run), "ndcg@10"))


def peer(out: Path, threads: int, data_dir: str, dpr_steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    docs, queries, qrels = _read(Path(data_dir) / "scifact")
    steps: dict[str, dict[str, float]] = {"bm25": {}, "pretrained": {}, "dpr": {}}
    result: dict = {}

    def clock(cmd: str, step: str, t0: float) -> None:
        steps[cmd][step] = round(time.perf_counter() - t0, 1)

    # --- BM25 with bm25s, as its README shows (Pyserini's own CLI cannot start its JVM here: retrievers/bm25.py)
    import bm25s

    t0 = time.perf_counter()
    ids = list(docs)
    retriever = bm25s.BM25(k1=0.9, b=0.4)
    retriever.index(bm25s.tokenize([docs[d] for d in ids], stopwords="en", show_progress=False), show_progress=False)
    clock("bm25", "index", t0)
    runs = {}
    for split in ("test", "train"):
        t0 = time.perf_counter()
        qids = list(qrels[split])
        res, sc = retriever.retrieve(bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False),
                                     k=1000, show_progress=False, n_threads=threads)
        runs[split] = {q: {ids[j]: float(x) for j, x in zip(res[i], sc[i])} for i, q in enumerate(qids)}
        with open(out / f"{split}.run", "w") as fh:  # TREC, for the DPR negatives below
            for q, ranked in runs[split].items():
                for r, (d, x) in enumerate(sorted(ranked.items(), key=lambda kv: -kv[1]), 1):
                    fh.write(f"{q} Q0 {d} {r} {x:.6f} bm25s\n")
        clock("bm25" if split == "test" else "dpr", f"search_{split}", t0)
    t0 = time.perf_counter()
    result["bm25_ndcg@10"] = _ndcg(qrels["test"], runs["test"])
    clock("bm25", "eval", t0)

    # --- dense: sentence-transformers + FAISS + ranx, as their docs show
    def dense(model, cmd: str) -> float:
        import faiss

        faiss.omp_set_num_threads(threads)
        ids = list(docs)
        t0 = time.perf_counter()
        emb = model.encode([docs[d] for d in ids], batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        clock(cmd, "index", t0)
        t0 = time.perf_counter()
        qids = list(qrels["test"])
        q = model.encode([queries[x] for x in qids], batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
        scores, idx = index.search(q, 1000)
        run = {qid: {ids[j]: float(s) for s, j in zip(scores[i], idx[i])} for i, qid in enumerate(qids)}
        ndcg = _ndcg(qrels["test"], run)
        clock(cmd, "eval", t0)
        return ndcg

    from sentence_transformers import SentenceTransformer

    from retrievers.hub import resolve_model

    t0 = time.perf_counter()
    model = SentenceTransformer(resolve_model(MODEL), device="cpu")
    clock("pretrained", "load", t0)
    result["pretrained_ndcg@10"] = dense(model, "pretrained")

    # --- DPR: MNRL on BM25 negatives (ranks 10-100 of the peer's train run), same steps
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses

    from scripts.bench_train import triplets

    t0 = time.perf_counter()
    rows = triplets(Path(data_dir), out / "train.run")  # the same sampling as bench_train, on the peer's run
    model = SentenceTransformer(resolve_model(MODEL), device="cpu")
    model.max_seq_length = 128
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), max_steps=dpr_steps, per_device_train_batch_size=32, learning_rate=2e-5,
        weight_decay=0.01, warmup_ratio=0.1, seed=42, use_cpu=True, save_strategy="no", report_to=[],
        logging_steps=50, dataloader_drop_last=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, loss=losses.MultipleNegativesRankingLoss(model),
        train_dataset=Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows],
                                         "negative": [r[2] for r in rows]}))
    trainer.train()
    model.max_seq_length = 256
    clock("dpr", "train", t0)
    result["dpr_ndcg@10"] = dense(model, "dpr")
    result["steps"] = steps
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dpr-steps", type=int, default=196, help="retriever1 / MNRL steps (make run: 196)")
    ap.add_argument("--data-dir", default=os.environ.get("DRLAB_DATA_DIR", str(REPO / "data")))
    ap.add_argument("--work", default=str(REPO / "outputs" / "bench" / "pipeline_runs"))
    ap.add_argument("--drlab-json", help="reuse the dr-lab half of an earlier run (JSON of its 'dr-lab:' line)")
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench" / "pipeline.json"))
    args = ap.parse_args(argv)
    data_dir = str(Path(args.data_dir).resolve())
    work = Path(args.work)
    if args.drlab_json:  # the dr-lab half of an earlier run (the "dr-lab:" line it printed)
        d = json.loads(Path(args.drlab_json).read_text())
    else:
        d = drlab(work / "drlab", args.threads, data_dir, args.dpr_steps)
    print("dr-lab:", json.dumps(d), flush=True)
    p = peer(work / "peer", args.threads, data_dir, args.dpr_steps)
    print("peer:", json.dumps(p), flush=True)
    peer_s = {c: round(sum(v.values()), 1) for c, v in p["steps"].items()}
    out = {
        "threads": args.threads, "dpr_steps": args.dpr_steps,
        "drlab": d, "peer": p, "peer_seconds": peer_s,
        "ratio_peer_over_drlab": {c: round(peer_s[c] / d[c]["seconds"], 3) for c in d},
        "ratio_total": round(sum(peer_s.values()) / sum(v["seconds"] for v in d.values()), 3),
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    for c in d:
        print(f"{c}: dr-lab {d[c]['seconds']} s (nDCG@10 {d[c]['ndcg@10']:.4f}), peer {peer_s[c]} s "
              f"(nDCG@10 {p[f'{c}_ndcg@10']:.4f}), peer/dr-lab {out['ratio_peer_over_drlab'][c]}")
    print(f"all three: peer/dr-lab {out['ratio_total']}\nwrote {dest}")
    return out


if __name__ == "__main__":
    main()
