"""Stage ``expand``: an LLM writes texts for every query; BM25 searches again with the expanded queries.

The method is ``model.expand`` (LameR, HyDE, query2doc: :mod:`retrievers.expansion`), the LLM
``model.llm`` (a ``_target_`` from ``conf/llm/``: :mod:`retrievers.llm`). For the eval split's
queries: the prompt (with the query's top ``model.expand.demos`` passages of the bm25 run, cut to
``pipeline.expand.passage_chars``), ``model.expand.n`` generations, appended per batch to
``generations.jsonl`` in the work dir as they finish (a killed run resumes at the first batch with a
missing query), then the expanded query (query x ``query_repeat`` + the generations; the original
query where a generation is empty or malformed) is searched in the bm25 stage's index with
``pipeline.bm25``'s settings.

Reads ``data``, ``model.expand``, ``model.llm``, ``pipeline.expand``, ``pipeline.bm25``, ``seed``;
uses ``bm25``. Writes ``generations.jsonl``, ``queries.<split>.jsonl`` (the expanded queries),
``runs/<split>.trec``, ``expand.json`` (prompt template and LLM identity), ``generation_key.txt``.
The eval stage reports this run next to plain BM25. The generations depend on less than the stage's key:
a run that differs only in ``query_repeat`` (how the query is built from them) reuses a finished
sibling's ``generations.jsonl`` (same ``generation_key.txt``) instead of calling the LLM again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

from pipelines.executor import Context, Stage
from pipelines.keys import digest

log = logging.getLogger("drlab")


def run(ctx: Context) -> dict[str, float]:
    from hydra.utils import instantiate

    from retrievers import bm25
    from retrievers.data import load_dataset
    from retrievers.evaluation import read_trec
    from retrievers.expansion import build_prompt, expanded_query, generate_all

    data, m, p, pb = ctx.get("data"), ctx.get("model.expand"), ctx.get("pipeline.expand"), ctx.cfg.pipeline.bm25
    split = data["eval_split"]
    ds = load_dataset(data, [split], with_corpus=int(m["demos"]) > 0)
    queries = ds.split_queries(split)
    demos = {q: [] for q in queries}
    if int(m["demos"]) > 0:
        run_ = read_trec(ctx.upstream["bm25"] / "runs" / f"{split}.trec")
        for q in queries:
            ranked = sorted(run_.get(q, {}).items(), key=lambda x: -x[1])[: int(m["demos"])]
            demos[q] = [ds.doc_text(d) for d, _ in ranked]
    prompts = {q: build_prompt(m["prompt"], queries[q], demos[q], int(p["passage_chars"])) for q in queries}
    llm = instantiate(ctx.cfg.model.llm)
    log.info("[expand] %s: %d queries x %d generations with %s", m["method"], len(prompts), int(m["n"]), llm.identity)
    gen_key = _generation_key(ctx)
    (ctx.out / "generation_key.txt").write_text(gen_key + "\n")
    done_before = ctx.sibling_with("generation_key.txt", gen_key)
    if done_before is not None and not (ctx.work / "generations.jsonl").exists():
        ctx.work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(done_before / "generations.jsonl", ctx.work / "generations.jsonl")
        log.info("[expand] reusing the generations of %s (same prompts, LLM and settings; only the query "
                 "build differs)", done_before.name)
    t0 = time.perf_counter()
    gens = generate_all(llm, prompts, int(m["n"]), ctx.work / "generations.jsonl",
                        progress=bool(ctx.runtime.get("progress", True)))
    gen_s = time.perf_counter() - t0
    with open(ctx.out / "generations.jsonl", "w", encoding="utf-8") as fh:
        for q in sorted(gens):
            fh.write(json.dumps({**gens[q], "prompt": prompts[q]}) + "\n")
    fallback = [q for q in queries if not any(t.strip() for t in gens[q]["texts"])]
    malformed = [q for q in queries if gens[q]["error"]]
    if fallback:
        log.warning("[expand] %d queries fall back to their original text (%d malformed answers; e.g. %s: %s)",
                    len(fallback), len(malformed), fallback[0], gens[fallback[0]]["error"] or "empty generation")
    expanded = {q: expanded_query(queries[q], gens[q]["texts"], int(m["query_repeat"])) for q in queries}
    with open(ctx.out / f"queries.{split}.jsonl", "w", encoding="utf-8") as fh:
        for q in sorted(expanded):
            fh.write(json.dumps({"_id": q, "text": expanded[q]}) + "\n")
    (ctx.out / "runs").mkdir()
    bm25.search(ctx.upstream["bm25"] / "index", expanded, ctx.out / "runs" / f"{split}.trec", k1=float(pb.k1),
                b=float(pb.b), hits=int(pb.hits), fields=pb.fields, remove_query=bool(pb.remove_query),
                threads=int(ctx.runtime.threads), log_path=ctx.out / "bm25.log")
    (ctx.out / "expand.json").write_text(json.dumps({"method": m["method"], "prompt": m["prompt"],
                                                      "llm": llm.identity}, indent=2) + "\n")
    return {"queries": float(len(queries)), "fallback_queries": float(len(fallback)),
            "malformed_answers": float(len(malformed)), "generate_seconds": round(gen_s, 1),
            "seconds_per_query": round(gen_s / max(1, len(queries)), 3),
            "mean_query_words": round(sum(len(v.split()) for v in expanded.values()) / max(1, len(expanded)), 1)}


def _generation_key(ctx: Context) -> str:
    """What the LLM's texts depend on: everything this stage reads except how the query is built from them
    (``query_repeat``). ``pipeline.bm25`` enters through the bm25 stage's key (it made the demonstrations)."""
    expand = {k: v for k, v in ctx.inputs["model.expand"].items() if k != "query_repeat"}
    return digest({"data": ctx.inputs["data"], "expand": expand, "llm": ctx.inputs["model.llm"],
                   "pipeline": ctx.inputs["pipeline.expand"], "seed": ctx.inputs["seed"],
                   "bm25": ctx.upstream["bm25"].name}, n=16)


STAGE = Stage(name="expand", version="1",
              reads=("data", "model.expand", "model.llm", "pipeline.expand", "pipeline.bm25", "seed"),
              run=run, uses=("bm25",))
