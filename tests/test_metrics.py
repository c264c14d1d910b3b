"""retrievers.evaluation against trec_eval (pytrec_eval), including score ties."""

from __future__ import annotations

import random

import pytest
import pytrec_eval  # dev extra (pytrec-eval-terrier): the trec_eval reference

from retrievers.evaluation import evaluate, read_trec, recall_curve, trec_order, write_trec

PYTREC = {"ndcg@10": "ndcg_cut_10", "recall@100": "recall_100", "map": "map", "recall@10": "recall_10"}


def random_case(seed: int, n_queries: int = 40, n_docs: int = 300):
    """Graded qrels and a run with many ties (scores rounded to one decimal)."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]  # d1, d10, d100 ...: string order != numeric order
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(n_queries):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 25))
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        if all(r == 0 for r in qrels[qid].values()):
            qrels[qid][judged[0]] = 1
        retrieved = rng.sample(docs, rng.randint(5, 150))
        # bias toward relevant docs so metrics are not all ~0
        retrieved += [d for d in judged if rng.random() < 0.6]
        run[qid] = {d: round(rng.random() * 2, 1) for d in retrieved}
    qrels["q_empty_run"] = {"d5": 1, "d7": 2}  # in qrels, no results: counts as 0 (trec_eval -c)
    run["q_not_judged"] = {"d1": 1.0, "d2": 0.5}  # results without qrels: ignored
    return qrels, run


def trec_mrr_at_10(qrels, run) -> dict[str, float]:
    """trec_eval-style reciprocal rank cut at 10: order by score desc, then doc id desc."""
    out = {}
    for qid, judged in qrels.items():
        ranked = sorted(run.get(qid, {}).items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:10]
        out[qid] = next((1.0 / r for r, (d, _) in enumerate(ranked, 1) if judged.get(d, 0) > 0), 0.0)
    return out


def pytrec_per_query(qrels, run, measures: set[str]) -> dict[str, dict[str, float]]:
    ev = pytrec_eval.RelevanceEvaluator(qrels, measures)
    res = ev.evaluate({q: d for q, d in run.items() if d})
    # pytrec_eval leaves out qrels queries without results; trec_eval -c counts them as 0
    return {q: {m: res.get(q, {}).get(m, 0.0) for m in measures} for q in qrels}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_equals_trec_eval_with_ties(seed):
    qrels, run = random_case(seed)
    n_ties = sum(len(d) - len(set(d.values())) for d in run.values())
    assert n_ties > 100, "the case must exercise tie-breaking"

    metrics = ["ndcg@10", "recall@100", "mrr@10", "map"]
    means, per_query = evaluate(qrels, run, metrics)
    ref = pytrec_per_query(qrels, run, {PYTREC[m] for m in metrics if m in PYTREC})
    mrr = trec_mrr_at_10(qrels, run)

    assert set(per_query) == set(qrels), "one row per judged query, none for unjudged ones"
    for m in metrics:
        ref_q = {q: (mrr[q] if m == "mrr@10" else ref[q][PYTREC[m]]) for q in qrels}
        ref_mean = sum(ref_q.values()) / len(qrels)  # averaged over ALL qrels queries
        assert means[m] == pytest.approx(ref_mean, abs=1e-9), m
        for q in qrels:
            assert per_query[q][m] == pytest.approx(ref_q[q], abs=1e-9), (m, q)
    for m in metrics:
        assert per_query["q_empty_run"][m] == 0.0
    assert means["ndcg@10"] > 0.05, "a non-trivial case"


def test_tie_order_matters_and_is_trec_evals():
    """Two docs tied at the top: trec_eval ranks the larger doc id first."""
    qrels = {"q": {"a": 1}}
    tied = {"q": {"a": 1.0, "b": 1.0}}
    means, _ = evaluate(qrels, tied, ["mrr@10", "ndcg@10"])
    assert means["mrr@10"] == pytest.approx(0.5)  # "b" > "a": b is ranked first
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut_10"}).evaluate(tied)["q"]
    assert means["mrr@10"] == pytest.approx(ref["recip_rank"])
    assert means["ndcg@10"] == pytest.approx(ref["ndcg_cut_10"])
    means_b, _ = evaluate({"q": {"b": 1}}, tied, ["mrr@10"])
    assert means_b["mrr@10"] == 1.0


def test_queries_without_results_count_as_zero():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    run = {"q1": {"d1": 3.0, "d9": 1.0}, "q2": {}, "q3": {"d3": 1.0}}
    means, per_query = evaluate(qrels, run, ["recall@100", "mrr@10"])
    assert means == {"recall@100": 0.5, "mrr@10": 0.5}
    assert per_query == {"q1": {"recall@100": 1.0, "mrr@10": 1.0}, "q2": {"recall@100": 0.0, "mrr@10": 0.0}}


def test_empty_run_is_all_zero():
    means, _ = evaluate({"q1": {"d1": 1}}, {}, ["ndcg@10"])
    assert means == {"ndcg@10": 0.0}


def test_trec_order():
    assert trec_order({"a": 1.0, "c": 2.0, "b": 2.0, "d10": 1.0, "d9": 1.0}) == [
        ("c", 2.0), ("b", 2.0), ("d9", 1.0), ("d10", 1.0), ("a", 1.0)
    ]  # fmt: skip


def test_write_read_trec_roundtrip(tmp_path):
    _, run = random_case(7, n_queries=5)
    run = {q: {d: round(s + i * 1e-3, 6) for i, (d, s) in enumerate(docs.items())} for q, docs in run.items()}
    path = tmp_path / "run.trec"
    write_trec(run, path, tag="mine")
    assert read_trec(path) == run
    lines = path.read_text().splitlines()
    assert len(lines) == sum(len(d) for d in run.values())
    first_q = next(iter(run))
    rows = [ln.split() for ln in lines if ln.split()[0] == first_q]
    assert [r[1] for r in rows] == ["Q0"] * len(rows) and {r[5] for r in rows} == {"mine"}
    assert [int(r[3]) for r in rows] == list(range(1, len(rows) + 1)), "ranks 1..n"
    assert [r[2] for r in rows] == [d for d, _ in trec_order(run[first_q])], "written in trec_eval order"
    assert not list(tmp_path.glob("*.tmp"))


def test_write_trec_depth(tmp_path):
    run = {"q1": {f"d{i}": float(i) for i in range(20)}}
    write_trec(run, tmp_path / "r.trec", depth=5)
    back = read_trec(tmp_path / "r.trec")
    assert back == {"q1": {f"d{i}": float(i) for i in range(15, 20)}}


def test_read_trec_rejects_bad_line(tmp_path):
    p = tmp_path / "bad.trec"
    p.write_text("q1 Q0 d1 1 1.0 tag\nq1 Q0 d2 2 0.5\n")
    with pytest.raises(ValueError, match=r"bad\.trec:2"):
        read_trec(p)


@pytest.mark.parametrize("seed", [3, 4])
def test_recall_curve_monotonic(seed):
    qrels, run = random_case(seed)
    ks = (1, 5, 10, 20, 50, 100, 200)
    curve = recall_curve(qrels, run, ks=ks)
    assert list(curve) == list(ks)
    vals = [curve[k] for k in ks]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:])), vals
    assert vals[-1] > vals[0]
    ref = pytrec_per_query(qrels, run, {"recall_10"})
    assert curve[10] == pytest.approx(sum(v["recall_10"] for v in ref.values()) / len(qrels), abs=1e-9)


def test_the_report_figure_names_system_dataset_and_split(tmp_path, monkeypatch):
    import matplotlib.figure

    from retrievers.evaluation import plot_report

    titles = []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: titles.append(t) or real(self, t, **kw))
    plot_report({"dpr": {1: 0.5, 10: 0.9}}, {"q1": {"ndcg@10": 0.5}}, "ndcg@10", tmp_path / "r.png",
                title="dpr on scifact (test, 300 queries)")
    assert titles == ["dpr on scifact (test, 300 queries)"] and (tmp_path / "r.png").stat().st_size > 0
