"""Control runs for a ColBERT teacher that collapses (issue 16: NFCorpus).

Trains ColBERT teachers that differ in one thing each, on the same data, initial weights, negatives,
seed and step budget as the ``rerank`` stage (``conf/pipeline/rerank.yaml``: groups of 1 positive +
3 BM25 negatives from ranks 1-100, batch 16, lr 1e-4, 114 steps), then scores every test query
against the whole corpus by exact MaxSim (no FAISS: the index is not under test) and writes, per
variant, ``<variant>.trec`` (top 100) and ``<variant>.json`` (train log, train AUC, how many distinct
documents fill the test queries' top-10 slots: a collapsed model shows few).

Variants:
  drlab     dr-lab's ColBERT as the chain trains it (queries padded to 32 with [MASK]s that MaxSim uses)
  noexp     the same without query expansion (``query_expansion: false``: real query tokens only)
  pylate    PyLate's ColBERT (``pylate.models.ColBERT``, its own tokenisation, markers, expansion and
            skiplist) with the same backbone weights, projection init, loop and loss

    python -m scripts.colbert_control --data ../shared/data/nfcorpus --bm25-run <bm25 stage>/runs/train.trec \\
        --checkpoint <all-MiniLM-L6-v2 dir> --variants drlab noexp pylate --out outputs/analysis/colbert-control
    python -m scripts.colbert_control --evaluate outputs/analysis/colbert-control --data ../shared/data/nfcorpus

The first command needs only torch and transformers (it runs as is on a lent GPU); ``--evaluate``
scores the written runs with the library's ranx-based evaluation and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from retrievers.colbert import ColBERT
from retrievers.contrastive import window_negatives
from retrievers.data import load_dataset
from retrievers.evaluation import read_trec
from retrievers.reranking import score_query_sample, teacher_quality, train_reranker


def st53_tokenize(self, texts, padding=True):
    """sentence-transformers 5.3.0's ``models.Transformer.tokenize`` for single texts: PyLate 1.6.0 pins 5.3.0
    and, under sentence-transformers >= 6, does not pad queries to ``query_length`` (no [MASK] expansion)."""
    to_tokenize = [[str(s).strip() for s in texts]]
    if getattr(self, "do_lower_case", False):
        to_tokenize = [[s.lower() for s in col] for col in to_tokenize]
    return dict(self.tokenizer(*to_tokenize, padding=padding, truncation="longest_first", return_tensors="pt",
                               max_length=self.max_seq_length))


def pylate_colbert(checkpoint: str, dim: int, **kw):
    """``pylate.models.ColBERT`` over a plain HF checkpoint, working under sentence-transformers >= 6."""
    import inspect
    import types

    from pylate import models
    from sentence_transformers.models import Transformer

    word = Transformer(str(checkpoint))
    if "padding" not in inspect.signature(type(word).tokenize).parameters:  # sentence-transformers >= 6
        word.tokenize = types.MethodType(st53_tokenize, word)
    hidden = word.auto_model.config.hidden_size
    model = models.ColBERT(modules=[word, models.Dense(hidden, dim, bias=False)], device="cpu", **kw)
    if not hasattr(model, "_text_length"):
        model._text_length = lambda text: len(text)  # 5.3.0: characters of a str
    return model


class PyLateTeacher(torch.nn.Module):
    """PyLate's ColBERT behind dr-lab's ``score_pairs`` / ``query`` / ``doc`` interface (training loop parity)."""

    def __init__(self, checkpoint: str, linear: torch.nn.Linear, query_len: int, doc_len: int):
        super().__init__()
        self.m = pylate_colbert(checkpoint, linear.out_features, query_length=query_len, document_length=doc_len)
        self.m[1].linear.weight.data.copy_(linear.weight.data)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _encode(self, texts, is_query: bool):
        feats = self.m.tokenize(list(texts), is_query=is_query)
        feats = {k: v.to(self.device) for k, v in feats.items()}
        emb = self.m(feats)["token_embeddings"]
        keep = feats["attention_mask"].bool()  # as pylate.losses.Contrastive: skiplist on documents only,
        if not is_query:                        # every query position used under query expansion
            keep &= self.m.skiplist_mask(feats["input_ids"], self.m.skiplist)
        elif self.m.do_query_expansion:
            keep = torch.ones_like(keep)
        return torch.nn.functional.normalize(emb, dim=-1) * keep.unsqueeze(-1), keep

    def query(self, texts):
        return self._encode(texts, True)[0]

    def doc(self, texts):
        return self._encode(texts, False)

    def score_pairs(self, queries, docs):
        from retrievers.colbert import maxsim_pairs

        d, m = self.doc(docs)
        return maxsim_pairs(self.query(queries), d, m)


def build(variant: str, checkpoint: str, seed: int):
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    bb = AutoModel.from_pretrained(checkpoint, add_pooling_layer=False, dtype=torch.float32)
    model = ColBERT(bb, tok, query_expansion=variant != "noexp")
    if variant == "pylate":
        return PyLateTeacher(checkpoint, model.linear, model.cfg["query_max_len"], model.cfg["doc_max_len"])
    return model


@torch.inference_mode()
def exhaustive_search(model, queries: dict[str, str], docs: dict[str, str], k: int, batch: int = 64) -> dict:
    """Exact MaxSim of every query with every document (fp16 token matrices on the model's device)."""
    model.eval()
    ids = sorted(docs, key=lambda d: -len(docs[d]))
    chunks = []
    for lo in range(0, len(ids), batch):
        d, m = model.doc([docs[x] for x in ids[lo:lo + batch]])
        chunks.append((d.half(), m))
    out = {}
    qids = list(queries)
    for lo in range(0, len(qids), batch):
        q = model.query([queries[x] for x in qids[lo:lo + batch]]).half()
        scores = torch.cat([torch.einsum("qid,njd->qnij", q, d).amax(-1).sum(-1).float() for d, _ in chunks], dim=1)
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        for row, qid in enumerate(qids[lo:lo + batch]):
            out[qid] = {ids[j]: float(s) for s, j in zip(top.values[row].tolist(), top.indices[row].tolist())}
    return out


def train_auc(model, ds, split: str, pool: dict, n_queries: int, seed: int, depth: int = 20) -> dict:
    pos = ds.positives(split)
    scores = {}
    with torch.inference_mode():
        for q in score_query_sample(sorted(pos), n_queries, seed):
            cands = list(dict.fromkeys(pos[q] + list(pool.get(q, ()))[:depth]))
            cands = [c for c in cands if c in ds.corpus]
            s = model.score_pairs([ds.queries[q]] * len(cands), [ds.doc_text(c) for c in cands])
            scores[q] = dict(zip(cands, s.float().tolist()))
    return teacher_quality(scores, {q: set(v) for q, v in pos.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a BEIR dataset directory with a train split")
    ap.add_argument("--bm25-run", type=Path, help="the bm25 stage's runs/train.trec (negatives: ranks 1-100)")
    ap.add_argument("--checkpoint", help="the backbone (all-MiniLM-L6-v2 directory)")
    ap.add_argument("--variants", nargs="+", default=["drlab", "noexp", "pylate"])
    ap.add_argument("--steps", type=int, default=114)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--auc-queries", type=int, default=300)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--evaluate", type=Path, help="score the runs written under this directory and print a table")
    a = ap.parse_args(argv)
    data = {"name": a.data.name, "format": "beir", "path": str(a.data), "train_split": "train"}
    if a.evaluate:
        from retrievers.evaluation import evaluate

        ds = load_dataset(data, ["test"], with_corpus=False)
        print("| variant | steps | final loss | train AUC | nDCG@10 | R@100 | distinct top-10 docs |")
        print("|---|---|---|---|---|---|---|")
        for f in sorted(a.evaluate.glob("*.json")):
            rec = json.loads(f.read_text())
            agg, _ = evaluate(ds.qrels["test"], read_trec(f.with_suffix(".trec")), ["ndcg@10", "recall@100"])
            print(f"| {f.stem} | {rec['steps']} | {rec['final_loss']:.3f} | {rec['train']['auc']:.3f} | "
                  f"{agg['ndcg@10']:.4f} | {agg['recall@100']:.4f} | {rec['distinct_top10']} |")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = load_dataset(data, ["train", "test"])
    positives = ds.positives("train")
    pool = window_negatives(read_trec(a.bm25_run), positives, (1, 100))
    doc_text = {d: ds.doc_text(d) for d in ds.corpus}
    examples = [(q, d) for q, v in positives.items() for d in v if d in doc_text]
    a.out.mkdir(parents=True, exist_ok=True)
    for variant in a.variants:
        t0 = time.perf_counter()
        model = build(variant, a.checkpoint, a.seed).to(device)
        hist = train_reranker(model, examples, pool, ds.queries, doc_text, batch_size=16, n_negatives=3, epochs=1,
                              max_steps=a.steps, lr=1e-4, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0,
                              log_every=10, save_every=None, seed=a.seed, work=a.out / f"{variant}.work",
                              progress=False, name=variant)
        train_s = time.perf_counter() - t0
        run = exhaustive_search(model, {q: ds.queries[q] for q in ds.qrels["test"]}, doc_text, 100)
        top10 = {d for r in run.values() for d in sorted(r, key=r.get, reverse=True)[:10]}
        with open(a.out / f"{variant}.trec", "w") as fh:
            for q, r in run.items():
                for rank, (d, s) in enumerate(sorted(r.items(), key=lambda x: -x[1]), 1):
                    fh.write(f"{q} Q0 {d} {rank} {s:.5f} {variant}\n")
        rec = {"variant": variant, "steps": a.steps, "device": str(device), "train_seconds": round(train_s, 1),
               "final_loss": hist[-1]["loss"], "history": hist, "distinct_top10": len(top10),
               "train": train_auc(model, ds, "train", pool, a.auc_queries, a.seed)}
        (a.out / f"{variant}.json").write_text(json.dumps(rec, indent=1) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "history"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
