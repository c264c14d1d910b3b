"""Stage ``bm25``: Lucene index of the corpus and top-k BM25 runs (Pyserini/Anserini).

Writes ``index/`` (a Lucene index Pyserini's ``LuceneSearcher`` opens as is),
``runs/<split>.trec`` for the eval split and, when the dataset has one, the train
split (hard negatives for ``retriever1``), and ``bm25.log`` (Anserini's output).
"""

from __future__ import annotations

import logging
import shutil

from omegaconf import OmegaConf

from pipelines.executor import Context, Stage
from retrievers import bm25
from retrievers.data import load_dataset

log = logging.getLogger("drlab")


def splits_of(data) -> list[str]:
    return [s for s in dict.fromkeys([data.get("eval_split"), data.get("train_split")]) if s]


def run(ctx: Context) -> dict[str, float]:
    data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    p = ctx.cfg.pipeline.bm25
    splits = splits_of(data)
    ds = load_dataset(data, splits)
    coll = ctx.work / "collection"
    n_docs = bm25.write_collection(bm25.iter_docs(ds.corpus), coll, fields=p.fields)
    log.info("[bm25] indexing %d documents (%s)", n_docs, p.fields)
    logfile = ctx.out / "bm25.log"
    threads = int(ctx.runtime.threads)
    bm25.build_index(coll, ctx.out / "index", p.fields, threads, logfile)
    shutil.rmtree(coll)
    (ctx.out / "runs").mkdir()
    for split in splits:
        queries = ds.split_queries(split)
        log.info("[bm25] searching %d %s queries (k1=%s b=%s, top %d)", len(queries), split, p.k1, p.b, p.hits)
        bm25.search(
            ctx.out / "index",
            queries,
            ctx.out / "runs" / f"{split}.trec",
            k1=float(p.k1),
            b=float(p.b),
            hits=int(p.hits),
            fields=p.fields,
            remove_query=bool(p.remove_query),
            threads=threads,
            log_path=logfile,
        )
    return {"docs": float(n_docs)}


STAGE = Stage(name="bm25", version="1", reads=("data", "pipeline.bm25"), run=run, uses=())
