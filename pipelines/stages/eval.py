"""Stage ``eval``: search the eval queries, score with ranx (= trec_eval), write a report.

The system evaluated is the chain's last retriever: the dense ``index`` stage when the chain
has one (queries encoded with the same model), otherwise the ``expand`` stage's run (BM25 over
LLM-expanded queries, reported next to plain BM25), otherwise the ``bm25`` run. With a ``rerank``
stage and ``rerank_depth`` > 0, the retriever's top ``rerank_depth`` is re-scored by the trained
teacher: its own row in the report, metrics ``rerank/<split>/<metric>`` and
``runs/<split>.rerank.trec``; ColBERT end to end (``colbert_e2e``) likewise. ``fusion`` (``rrf`` or
``wsum`` with the BM25 run, via ranx); ``unseen_subset`` also scores the eval queries none of
whose relevant documents is relevant in the train split (generalisation vs memorisation). Qrels
of both splits come through the dataset loader, whatever the format.

On STS data (``data.format: sts``) it scores sentence pairs instead: the newest checkpoint (or
``model.encoder`` as configured) encodes both sentences, and the metrics are Spearman's and Pearson's
correlation of their cosine with the gold score, per set and subset (:mod:`retrievers.sts`).

Reads ``data``, ``model.name``, ``pipeline.eval`` (+ ``model.encoder`` with an index, +
``model.teacher`` with a teacher). Uses ``index``, ``expand`` and/or ``bm25``, and ``rerank`` when it
reranks. Writes ``runs/<split>.trec``, ``metrics.json``, ``per_query.json``, ``report.md`` and
``report.png``.
"""

from __future__ import annotations

import logging

from pipelines.executor import Context, Stage, newest_checkpoint, task_of
from retrievers.data import load_dataset
from retrievers.errors import ConfigError
from retrievers.evaluation import (
    evaluate,
    fuse,
    markdown_table,
    plot_report,
    read_trec,
    recall_curve,
    save_json,
    unseen_queries,
    write_trec,
)

log = logging.getLogger("drlab")


def uses(cfg, before: list[str]) -> tuple[str, ...]:
    if task_of(cfg) == "sts":  # sentence pairs: the newest checkpoint encodes them (or model.encoder as configured)
        return newest_checkpoint(before)
    p = cfg.pipeline.eval
    out = ()
    if "index" in before:
        out += ("index",)
    if "expand" in before:  # BM25 over the LLM-expanded queries, shown next to plain BM25
        out += ("expand",)
    if "bm25" in before and (not out or p.fusion or "expand" in out):
        out += ("bm25",)
    if not out:
        raise ConfigError(
            f"stage eval evaluates a retriever, but model '{cfg.model.name}' has no index or bm25 stage enabled before "
            f"it (chain {list(cfg.model.chain)}). Fix: add index (a dense family) or bm25 to model.chain, or enable it."
        )
    if "rerank" in before and (int(p.rerank_depth or 0) > 0 or p.colbert_e2e):
        out += ("rerank",)
    return out


def reads(cfg, before: list[str]) -> tuple[str, ...]:
    if task_of(cfg) == "sts":
        return "data", "model.name", "model.encoder", "precision", "backend"
    used = uses(cfg, before)
    return (("data", "model.name", "pipeline.eval") + (("model.encoder",) if "index" in used else ())
            + (("model.teacher",) if "rerank" in used else ()))


def run(ctx: Context) -> dict[str, float]:
    data = ctx.get("data")
    if data["format"] == "sts":
        return run_sts(ctx, data)
    p = ctx.cfg.pipeline.eval
    split = data["eval_split"]
    metrics = list(p.metrics)
    train_split = data.get("train_split") if p.unseen_subset else None
    ds = load_dataset(data, [s for s in dict.fromkeys([split, train_split]) if s], with_corpus=False)
    qrels = ds.qrels[split]
    rt = ctx.runtime
    extra_md = ""

    systems: dict[str, dict] = {}
    if "index" in ctx.upstream:
        from retrievers.faiss_index import dense_search

        systems[ctx.cfg.model.name], extra_md = dense_search(
            ctx.upstream["index"], ctx.cfg.model.encoder, ds.split_queries(split), int(p.depth), device=str(rt.device),
            threads=int(rt.threads), encode_batch_size=int(rt.encode_batch_size))
    if "expand" in ctx.upstream:
        systems[f"bm25+{ctx.cfg.model.name}"] = read_trec(ctx.upstream["expand"] / "runs" / f"{split}.trec")
    if "bm25" in ctx.upstream:
        systems["bm25"] = read_trec(ctx.upstream["bm25"] / "runs" / f"{split}.trec")
    main_name = next(iter(systems))
    if p.fusion and len(systems) > 1:
        systems[f"{main_name}+bm25 ({p.fusion})"] = fuse(systems, p.fusion, p.get("fusion_weights"))
        main_name = f"{main_name}+bm25 ({p.fusion})"
    reranked_name = None
    rr_depth = int(p.get("rerank_depth") or 0)
    doc_text = None  # passage texts, built once, only when a teacher needs them
    if "rerank" in ctx.upstream and (rr_depth or p.get("colbert_e2e")):
        full = load_dataset(data, [split])
        doc_text = {d: full.doc_text(d) for d in full.corpus}
        del full
    if rr_depth and "rerank" in ctx.upstream:
        from retrievers.encoder import resolve_device
        from retrievers.reranking import load_teacher, rerank_run

        teacher = load_teacher(ctx.cfg.model.teacher, ctx.upstream["rerank"] / "checkpoint")
        teacher.to(resolve_device(str(ctx.runtime.device)))
        reranked_name = f"{main_name} >> rerank@{rr_depth}"
        systems[reranked_name] = rerank_run(
            teacher, systems[main_name], ds.split_queries(split), doc_text, rr_depth,
            int(p.get("rerank_batch_size", 64)), progress=bool(ctx.runtime.get("progress", True)),
        )
        del teacher
    e2e_name = None
    if p.get("colbert_e2e") and "rerank" in ctx.upstream:
        from retrievers.colbert import ColbertIndex
        from retrievers.encoder import resolve_device
        from retrievers.reranking import load_teacher

        teacher = load_teacher(ctx.cfg.model.teacher, ctx.upstream["rerank"] / "checkpoint")
        if not hasattr(teacher, "score_all"):
            raise ConfigError("pipeline.eval.colbert_e2e=true needs a ColBERT teacher (model.teacher)")
        teacher.to(resolve_device(str(ctx.runtime.device)))
        cidx = ColbertIndex(teacher, batch_size=int(p.get("rerank_batch_size", 64)))
        cidx.add(list(doc_text), list(doc_text.values()), progress=bool(ctx.runtime.get("progress", True)))
        e2e_name = "colbert (end to end)"
        systems[e2e_name] = cidx.search(ds.split_queries(split), k=int(p.depth),
                                        candidates_per_token=int(p.get("colbert_candidates", 64)))
        del cidx, teacher
    del doc_text

    (ctx.out / "runs").mkdir()
    rows: dict[str, dict[str, float]] = {}
    curves = {}
    per_query_main = {}
    subsets = {split: list(qrels)}
    if train_split:
        unseen = unseen_queries(qrels, ds.qrels[train_split])
        if unseen:
            subsets[f"{split}-unseen"] = unseen
        else:
            log.info("[eval] every %s query has a relevant document that is relevant in train: no unseen subset", split)
    out: dict[str, float] = {}
    for name, r in systems.items():
        for subset, qids in subsets.items():
            sub_qrels = {q: qrels[q] for q in qids}
            means, per_query = evaluate(sub_qrels, r, metrics)
            rows[f"{name} [{subset}, {len(qids)} q]"] = means
            if name == main_name:
                out.update({f"{subset}/{m}": v for m, v in means.items()})
                if subset == split:
                    per_query_main = per_query
            elif name == reranked_name:
                out.update({f"rerank/{subset}/{m}": v for m, v in means.items()})
            elif name == e2e_name:
                out.update({f"colbert_e2e/{subset}/{m}": v for m, v in means.items()})
            elif name == "bm25":  # the baseline next to a dense or an expanded-query system
                out.update({f"bm25/{subset}/{m}": v for m, v in means.items()})
        curves[name] = recall_curve(qrels, r)
    write_trec(systems[main_name], ctx.out / "runs" / f"{split}.trec", tag=main_name.split()[0])
    if reranked_name:
        write_trec(systems[reranked_name], ctx.out / "runs" / f"{split}.rerank.trec", tag="rerank")
    if e2e_name:
        write_trec(systems[e2e_name], ctx.out / "runs" / f"{split}.colbert_e2e.trec", tag="colbert")
    save_json(out, ctx.out / "metrics.json")
    save_json(per_query_main, ctx.out / "per_query.json")
    primary = p.get("primary", metrics[0])
    plot_report(curves, per_query_main, primary if primary in metrics else metrics[0], ctx.out / "report.png",
                title=f"{main_name} on {data['name']} ({split}, {len(qrels)} queries)")
    report = [
        f"# {ctx.cfg.model.name} on {data['name']} ({split})\n",
        markdown_table(rows, metrics),
        "\nMetrics by ranx on trec_eval's document order (score desc, doc id desc); "
        "queries without results count as 0.\n",
        "\n![recall@k and per-query distribution](report.png)\n",
    ]
    if extra_md:  # the dense index's section (sizes, latencies)
        report.append("\n" + extra_md)
    (ctx.out / "report.md").write_text("\n".join(report))
    log.info("[eval]\n%s", markdown_table(rows, metrics))
    return out


def run_sts(ctx: Context, data: dict) -> dict[str, float]:
    """Sentence pairs: Spearman / Pearson of the cosine with the gold scores (:mod:`retrievers.sts`)."""
    from retrievers.encoder import instantiate_encoder, resolve_device
    from retrievers.openvino_backend import planned as planned_backend
    from retrievers.precision import choose, precision_metrics
    from retrievers.sts import evaluate_sts, flat_metrics, markdown, plot, read_pairs, set_file

    rt = ctx.runtime
    ckpt = ctx.checkpoint()
    encoder = instantiate_encoder(ctx.cfg.model.encoder, checkpoint=ckpt)
    device = resolve_device(str(rt.device))
    encoder.to(device)
    encoder.backend = planned_backend(str(ctx.get("backend")), str(device))
    a, b, _ = read_pairs(set_file(data, data["sets"][0], data["eval_split"]))  # the check's sample
    bf16, prec = choose(str(ctx.get("precision")), encoder, a + b, "query", device=device,
                        batch_size=int(rt.encode_batch_size), who="eval")
    results = evaluate_sts(encoder, data, batch_size=int(rt.encode_batch_size), device=device, bf16=bf16,
                           progress=bool(rt.get("progress", True)))
    out = {**flat_metrics(results, data["eval_split"]), **precision_metrics(prec)}
    save_json(out, ctx.out / "metrics.json")
    save_json({n: {"cosine": r["cosine"].tolist(), "gold": r["gold"].tolist()} for n, r in results.items()},
              ctx.out / "per_pair.json")
    who = f"checkpoint {ckpt.parent.name}" if ckpt else ctx.cfg.model.encoder.get("checkpoint", "")
    title = f"{ctx.cfg.model.name} ({who}) on {data['name']} ({data['eval_split']})"
    plot(results, ctx.out / "report.png", title)
    table = markdown(results)
    (ctx.out / "report.md").write_text(
        f"# {title}\n\n{table}\n\nCosine of the two sentences' vectors (pooling: "
        f"{encoder.cfg.get('pooling')}) against the gold score; Spearman's and Pearson's correlation x 100.\n"
        "\n![cosine vs gold](report.png)\n")
    log.info("[eval]\n%s", table)
    return out


STAGE = Stage(name="eval", version="3", reads=reads, run=run, uses=uses, tasks=("retrieval", "sts"))
