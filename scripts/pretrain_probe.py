"""When does the [CLS] bottleneck form? A pre-training run probed as it goes (issue 16).

Runs one pre-training method (``retrievers.simlm`` / ``retrievers.retromae`` ``pretrainer``) with
the pre-training table's small-BERT setting (random init: 4 layers, hidden 256, the MiniLM
vocabulary; SciFact + NFCorpus text, batch 32, lr 5e-4, linear decay over ``--steps``) and, every
``--every`` steps, measures the [CLS] vectors of the backbone as it is:

* ``doc_mean_cosine``: mean pairwise cosine of 256 passages (near 1: every passage the same vector);
* a zero-shot SciFact test run by exact cosine over the whole corpus (``<method>.runs.json``:
  ``{step: {qid: {docid: score}}}``, top 100), scored afterwards with ``--evaluate``.

The losses go into ``<method>.json`` with the probes. Needs only torch and transformers, so it runs
as is on a lent GPU:

    python -m scripts.pretrain_probe --data-root ../shared/data --checkpoint <MiniLM dir> --method simlm \\
        --steps 3000 --every 500 --out outputs/analysis/pretrain-probe
    python -m scripts.pretrain_probe --evaluate outputs/analysis/pretrain-probe --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

SMALL = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}


@torch.inference_mode()
def cls_vectors(backbone, tokenizer, texts: list[str], max_len: int, device, batch: int = 256) -> torch.Tensor:
    backbone.eval()
    out = []
    for lo in range(0, len(texts), batch):
        enc = tokenizer(texts[lo:lo + batch], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        h = backbone(**{k: v.to(device) for k, v in enc.items()}).last_hidden_state[:, 0]
        out.append(torch.nn.functional.normalize(h.float(), dim=-1))
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, required=True, help="holds scifact/ and nfcorpus/ (BEIR)")
    ap.add_argument("--checkpoint", help="tokenizer / vocabulary source (all-MiniLM-L6-v2 directory)")
    ap.add_argument("--method", choices=["simlm", "retromae"])
    ap.add_argument("--set", nargs="*", default=[], help="pretrainer keyword overrides, e.g. dec_rate=0.0")
    ap.add_argument("--name", help="output name (default: the method)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--evaluate", type=Path, help="score the probes written under this directory; print a table")
    a = ap.parse_args(argv)
    from retrievers.data import load_dataset

    scifact = {"name": "scifact", "format": "beir", "path": str(a.data_root / "scifact"), "train_split": "train"}
    if a.evaluate:
        from retrievers.evaluation import evaluate

        qrels = load_dataset(scifact, ["test"], with_corpus=False).qrels["test"]
        print("| run | step | loss | doc mean cosine | zero-shot SciFact nDCG@10 | R@100 |")
        print("|---|---|---|---|---|---|")
        for f in sorted(a.evaluate.glob("*.json")):
            if f.name.endswith(".runs.json"):
                continue
            rec, runs = json.loads(f.read_text()), json.loads(f.with_suffix(".runs.json").read_text())
            for p in rec["probes"]:
                agg, _ = evaluate(qrels, runs[str(p["step"])], ["ndcg@10", "recall@100"])
                print(f"| {f.stem} | {p['step']} | {p['loss']:.3f} | {p['doc_mean_cosine']:.4f} | "
                      f"{agg['ndcg@10']:.4f} | {agg['recall@100']:.4f} |")
        return 0

    import importlib

    from retrievers.pretrain_loop import corpus_texts, pretrain_loop
    from retrievers.train_utils import seed_everything

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(a.seed)
    kw = {k: json.loads(v) for k, v in (x.split("=", 1) for x in a.set)}
    method = importlib.import_module(f"retrievers.{a.method}").pretrainer(
        checkpoint=a.checkpoint, init_config=SMALL, local_dirs=None, seed=a.seed, **kw)
    texts, _ = corpus_texts(scifact, ["nfcorpus"])
    ds = load_dataset(scifact, ["test"])
    doc_ids = list(ds.corpus)
    doc_texts = [ds.doc_text(d) for d in doc_ids]
    qids = sorted(ds.qrels["test"])
    sample = [texts[i] for i in np.random.default_rng(a.seed).choice(len(texts), 256, replace=False)]
    probes, runs = [], {}

    def probe(rec: dict) -> None:
        if rec["step"] % a.every and rec["step"] != a.steps:
            return
        bb, tok = method.backbone(), method.tokenizer
        v = cls_vectors(bb, tok, sample, 256, device)
        cos = float(((v @ v.T).sum() - len(v)) / (len(v) * (len(v) - 1)))
        d = cls_vectors(bb, tok, doc_texts, 256, device)
        q = cls_vectors(bb, tok, [ds.queries[x] for x in qids], 64, device)
        top = (q @ d.T).topk(100, dim=1)
        runs[str(rec["step"])] = {qid: {doc_ids[j]: round(s, 5) for s, j in zip(top.values[i].tolist(),
                                                                                  top.indices[i].tolist())}
                                  for i, qid in enumerate(qids)}
        probes.append({**rec, "doc_mean_cosine": round(cos, 4)})
        print(json.dumps(probes[-1]), flush=True)

    method.to(device)
    probe({"step": 0, "loss": float("nan")})
    t0 = time.perf_counter()
    history, steps, _ = pretrain_loop(method, texts, batch_size=32, epochs=1, max_steps=a.steps, lr=a.lr,
                                      weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0, precision=a.precision,
                                      save_every=None, log_every=min(50, a.every), seed=a.seed,
                                      work=a.out / f"{a.name or a.method}.work", device=device, progress=False,
                                      on_log=probe)
    name = a.name or a.method
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{name}.json").write_text(json.dumps({
        "method": a.method, "set": kw, "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
        "device": str(device), "passages": len(texts), "history": history, "probes": probes}) + "\n")
    (a.out / f"{name}.runs.json").write_text(json.dumps(runs) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
