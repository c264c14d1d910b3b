"""Stage ``eval``: search the eval queries, score with ranx (= trec_eval), write a report.

The system evaluated is the chain's last retriever: the dense ``index`` stage when the
chain has one (queries encoded with the same model), otherwise the ``bm25`` run.
With a ``rerank`` stage upstream and ``rerank_depth`` > 0, the retriever's top
``rerank_depth`` is re-scored by the trained teacher: its own row in the report, metrics
``rerank/<split>/<metric>`` and ``runs/<split>.rerank.trec``; ColBERT end to end
(``colbert_e2e``) likewise ``colbert_e2e/<split>/<metric>`` and ``runs/<split>.colbert_e2e.trec``.
Options (``pipeline.eval``): ``fusion`` (``rrf`` or ``wsum`` with the BM25 run, via
ranx), ``unseen_subset`` (also score the eval queries none of whose relevant
documents is relevant in the train split, to separate generalisation from
memorisation). Writes ``runs/<split>.trec``, ``metrics.json``, ``per_query.json``,
``report.md`` and ``report.png``.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from pipelines.data import load_dataset, read_qrels
from pipelines.evaluation import (
    evaluate,
    markdown_table,
    plot_report,
    read_trec,
    recall_curve,
    save_json,
    write_trec,
)
from pipelines.executor import ConfigError, Context, Stage

log = logging.getLogger("drlab")


def unseen_queries(eval_qrels, train_qrels) -> list[str]:
    """Eval queries none of whose relevant documents is relevant for some train query."""
    seen = {d for docs in train_qrels.values() for d, r in docs.items() if r > 0}
    return [q for q, docs in eval_qrels.items() if not any(d in seen for d, r in docs.items() if r > 0)]


def fuse(runs: dict[str, dict], method: str, weights: list[float] | None = None) -> dict:
    """ranx fusion of runs (``rrf`` or ``wsum`` on min-max normalised scores)."""
    from ranx import Run, fuse as ranx_fuse

    if method not in ("rrf", "wsum"):
        raise ValueError(f"pipeline.eval.fusion '{method}' unknown; valid choices: rrf, wsum (or null)")
    # ranx requires the same query ids in every run: a query one run has no hits for gets an empty list
    qids = sorted({q for r in runs.values() for q, d in r.items() if d})
    rs = [Run({q: dict(r.get(q) or {}) for q in qids}, name=n) for n, r in runs.items()]
    if method == "wsum":  # ranx's wsum has no default weights: equal weights unless given
        weights = [float(w) for w in weights] if weights else [1.0 / len(rs)] * len(rs)
        if len(weights) != len(rs):
            raise ValueError(f"pipeline.eval.fusion_weights has {len(weights)} weights for {len(rs)} runs {list(runs)}")
    params = {"weights": weights} if method == "wsum" else None
    norm = "min-max" if method == "wsum" else None
    fused = ranx_fuse(runs=rs, method=method, norm=norm, params=params)
    return {q: dict(d) for q, d in fused.to_dict().items()}


def run(ctx: Context) -> dict[str, float]:
    data = OmegaConf.to_container(ctx.cfg.data, resolve=True)
    p = ctx.cfg.pipeline.eval
    split = data["eval_split"]
    metrics = list(p.metrics)
    ds = load_dataset(data, [split], with_corpus=False)
    qrels = ds.qrels[split]

    systems: dict[str, dict] = {}
    if "index" in ctx.upstream:
        from pipelines.index import search_queries

        systems[ctx.cfg.model.name] = search_queries(ctx, ds.split_queries(split), depth=int(p.depth))
    if "bm25" in ctx.upstream and (not systems or p.fusion):
        systems["bm25"] = read_trec(ctx.upstream["bm25"] / "runs" / f"{split}.trec")
    if not systems:
        raise RuntimeError("eval needs an upstream 'index' or 'bm25' stage in the chain")
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
        from pipelines.rerank import load_teacher, rerank_run
        from retrievers.encoder import resolve_device

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
        from pipelines.rerank import load_teacher
        from retrievers.colbert import ColbertIndex
        from retrievers.encoder import resolve_device

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
    if p.unseen_subset and data.get("train_split"):
        from pathlib import Path

        train_qrels = read_qrels(Path(data["path"]) / "qrels" / f"{data['train_split']}.tsv")
        unseen = unseen_queries(qrels, train_qrels)
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
        curves[name] = recall_curve(qrels, r)
    write_trec(systems[main_name], ctx.out / "runs" / f"{split}.trec", tag=main_name.split()[0])
    if reranked_name:
        write_trec(systems[reranked_name], ctx.out / "runs" / f"{split}.rerank.trec", tag="rerank")
    if e2e_name:
        write_trec(systems[e2e_name], ctx.out / "runs" / f"{split}.colbert_e2e.trec", tag="colbert")
    save_json(out, ctx.out / "metrics.json")
    save_json(per_query_main, ctx.out / "per_query.json")
    primary = p.get("primary", metrics[0])
    plot_report(curves, per_query_main, primary if primary in metrics else metrics[0], ctx.out / "report.png")
    report = [
        f"# {ctx.cfg.model.name} on {data['name']} ({split})\n",
        markdown_table(rows, metrics),
        "\nMetrics by ranx on trec_eval's document order (score desc, doc id desc); "
        "queries without results count as 0.\n",
        "\n![recall@k and per-query distribution](report.png)\n",
    ]
    extra = ctx.out / "extra.md"
    if extra.exists():  # upstream-specific sections (index sizes, latencies) written by search_queries
        report.append("\n" + extra.read_text())
        extra.unlink()
    (ctx.out / "report.md").write_text("\n".join(report))
    log.info("[eval]\n%s", markdown_table(rows, metrics))
    return out


STAGE = Stage(name="eval", version="2", reads=("data", "model", "pipeline.eval"), run=run)
