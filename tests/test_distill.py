"""ColBERT late interaction, the cross-encoder reranker and the distillation losses (tiny models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_DOCS, TINY_QUERIES, component, make_tiny_bert

from retrievers.colbert import ColBERT, ColbertIndex, group_ce_loss, maxsim_all, maxsim_pairs
from retrievers.losses import group_scores, kl_teacher_student, margin_mse, simlm_loss, tct_inbatch_kd

DOCS = [f"{t}. {x}" for _, t, x in TINY_DOCS]
QUERIES = [q for _, q in TINY_QUERIES]


@pytest.fixture
def colbert(tmp_path) -> ColBERT:
    ckpt = make_tiny_bert(tmp_path / "bert", DOCS + QUERIES, punctuation=True)
    return component(["model=colbert"], "model.teacher", checkpoint=str(ckpt), dim=8, query_max_len=12, doc_max_len=24)


# --------------------------------------------------------------------------- MaxSim


def test_maxsim_equals_hand_computation():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # 1 query, 2 tokens
    d = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [9.0, 9.0], [0.0, 0.0]]])
    m = torch.tensor([[True, True, True], [True, False, False]])  # doc 2: only its first token is real
    # doc 1: token 1 best match = max(0.6, 1, 0) = 1; token 2 = max(0.8, 0, -1) = 0.8 -> 1.8
    # doc 2: only [0, 1]: token 1 -> 0, token 2 -> 1 -> 1.0 (the masked [9, 9] must not count)
    assert maxsim_all(q, d, m).tolist() == [[pytest.approx(1.8), pytest.approx(1.0)]]
    assert maxsim_pairs(q.expand(2, -1, -1), d, m).tolist() == [pytest.approx(1.8), pytest.approx(1.0)]


def test_colbert_query_augmentation_markers_and_punctuation(colbert):
    tq = colbert.tokenize_queries(["waggle dance"])
    ids = tq["input_ids"][0].tolist()
    assert len(ids) == 12 and ids[1] == colbert.q_id
    assert ids[-1] == colbert.tokenizer.mask_token_id and ids.count(colbert.tokenizer.mask_token_id) >= 6
    q = colbert.query(["waggle dance"])
    assert q.shape == (1, 12, 8)
    assert torch.allclose(q.norm(dim=-1), torch.ones(1, 12), atol=1e-5)  # every position, [MASK]s too
    td = colbert.tokenize_docs(["Bees, honeybees!"])
    assert td["input_ids"][0, 1].item() == colbert.d_id
    d, keep = colbert.doc(["Bees, honeybees!"])
    toks = colbert.tokenizer.convert_ids_to_tokens(td["input_ids"][0])
    dropped = [t for t, k in zip(toks, keep[0].tolist()) if not k]
    assert "," in dropped and "!" in dropped and "bees" not in dropped
    assert torch.all(d[0][~keep[0]] == 0)


def test_colbert_scores_agree_and_save_load(colbert, tmp_path):
    with torch.no_grad():
        all_ = colbert.score_all(QUERIES[:2], DOCS[:3])
        pairs = colbert.score_pairs([QUERIES[0]] * 3, DOCS[:3])
    np.testing.assert_allclose(all_[0].numpy(), pairs.numpy(), rtol=1e-5)
    colbert.save(tmp_path / "ck")
    again = ColBERT.load(tmp_path / "ck")
    with torch.no_grad():
        np.testing.assert_allclose(again.score_all(QUERIES[:2], DOCS[:3]).numpy(), all_.numpy(), rtol=1e-5)


def test_colbert_end_to_end_index_equals_exhaustive_maxsim(colbert):
    idx = ColbertIndex(colbert, batch_size=5)
    ids = [d for d, _, _ in TINY_DOCS]
    idx.add(ids, DOCS)
    run = idx.search({"q1": QUERIES[0]}, k=5, candidates_per_token=100)  # every token: exhaustive
    with torch.no_grad():
        full = colbert.score_all([QUERIES[0]], DOCS)[0].numpy()
    want = [ids[i] for i in np.argsort(-full)[:5]]
    assert list(run["q1"]) == want


def test_colbert_without_query_expansion_scores_real_tokens_only(colbert, tmp_path):
    """query_expansion=false drops the [MASK] positions: since they are never attended to, the real
    tokens' vectors are the same, and the score is the expansion score minus the [MASK]s' share. The
    end-to-end index skips the zero rows and still equals exhaustive MaxSim."""
    colbert.save(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "colbert.json").read_text())
    (tmp_path / "ck" / "colbert.json").write_text(json.dumps({**cfg, "query_expansion": False}))
    plain = ColBERT.load(tmp_path / "ck")
    with torch.no_grad():
        real = colbert.tokenize_queries(QUERIES[:3])["attention_mask"].bool()
        q = colbert.query(QUERIES[:3]) * real.unsqueeze(-1)
        d, m = colbert.doc(DOCS)
        np.testing.assert_allclose(plain.score_all(QUERIES[:3], DOCS).numpy(), maxsim_all(q, d, m).numpy(), rtol=1e-5)
        assert plain.query(QUERIES[:1]).shape[1] < colbert.cfg["query_max_len"]
    idx = ColbertIndex(plain, batch_size=5)
    ids = [d for d, _, _ in TINY_DOCS]
    idx.add(ids, DOCS)
    run = idx.search({"q1": QUERIES[0]}, k=5, candidates_per_token=100)
    with torch.no_grad():
        full = plain.score_all([QUERIES[0]], DOCS)[0].numpy()
    assert list(run["q1"]) == [ids[i] for i in np.argsort(-full)[:5]]


def test_control_script_exhaustive_search_equals_score_all(colbert):
    from scripts.colbert_control import exhaustive_search

    docs = {d: f"{t}. {x}" for d, t, x in TINY_DOCS}
    run = exhaustive_search(colbert, {"q1": QUERIES[0], "q2": QUERIES[1]}, docs, k=4, batch=3)
    with torch.no_grad():
        full = colbert.score_all(QUERIES[:2], list(docs.values())).numpy()
    for row, q in enumerate(["q1", "q2"]):
        want = [list(docs)[i] for i in np.argsort(-full[row])[:4]]
        assert list(run[q]) == want
        np.testing.assert_allclose([run[q][d] for d in want], np.sort(full[row])[::-1][:4], rtol=2e-3)  # fp16 tokens


def test_group_ce_trains_colbert(colbert):
    opt = torch.optim.AdamW(colbert.parameters(), lr=5e-3)
    qs, pos, neg = QUERIES[:4], [DOCS[5], DOCS[1], DOCS[2], DOCS[8]], [DOCS[0], DOCS[3], DOCS[4], DOCS[6]]
    losses = []
    for _ in range(15):
        s = torch.stack([colbert.score_pairs(qs, pos), colbert.score_pairs(qs, neg)], dim=1)
        loss = group_ce_loss(s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


# --------------------------------------------------------------------------- losses


def test_kl_is_zero_when_distributions_match_and_positive_otherwise():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    assert kl_teacher_student(s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_teacher_student(s, s + 5.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant
    t = torch.tensor([[3.0, 2.0, 1.0], [0.5, 0.0, -1.0]])
    p = torch.softmax(t[0], 0)
    want = float((p * (torch.log_softmax(t[0], 0) - torch.log_softmax(s[0], 0))).sum()) / 2
    assert kl_teacher_student(s, t).item() == pytest.approx(want, rel=1e-5)


def test_simlm_loss_is_kl_plus_alpha_ce():
    torch.manual_seed(0)
    n, g = 3, 4
    scores = torch.randn(n, n * g)
    own = group_scores(scores, g)
    assert torch.equal(own[1], scores[1, 4:8])
    loss = simlm_loss(scores, own.clone(), g, alpha=0.2)
    ce = torch.nn.functional.cross_entropy(scores, torch.arange(n) * g)
    assert loss.item() == pytest.approx(0.2 * ce.item(), rel=1e-5)  # teacher = student: only the CE term


def test_tct_inbatch_kd_covers_all_n_by_n_pairs():
    n = 4
    student = torch.zeros(n, n, requires_grad=True)
    teacher = torch.randn(n, n)
    loss = tct_inbatch_kd(student, teacher)
    loss.backward()
    # every one of the N x N pairs gets a gradient (in-batch negatives are distilled, not only the diagonal)
    assert (student.grad.abs() > 0).sum().item() == n * n
    want = float(np.mean([
        (torch.softmax(teacher[i], 0) * (torch.log_softmax(teacher[i], 0) - math.log(1 / n))).sum() for i in range(n)
    ]))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="teacher scores"):
        tct_inbatch_kd(torch.zeros(n, n), torch.zeros(n, n - 1))


def test_margin_mse():
    s = torch.tensor([[2.0, 1.0, 0.0]])
    t = torch.tensor([[5.0, 4.0, 1.0]])  # margins: student 1, 2 ; teacher 1, 4
    assert margin_mse(s, t).item() == pytest.approx((0 + 4) / 2)


# --------------------------------------------------------------------------- cross-encoder


def test_cross_encoder_scores_pairs_trains_and_saves(tmp_path):
    from retrievers.cross_encoder import CrossEncoder

    ckpt = make_tiny_bert(tmp_path / "bert", DOCS + QUERIES)
    ce = component(["model=simlm", "teacher@model.teacher=cross_encoder"], "model.teacher", checkpoint=str(ckpt),
                   max_len=48)
    opt = torch.optim.AdamW(ce.parameters(), lr=5e-3)
    qs, pos, neg = QUERIES[:4], [DOCS[5], DOCS[1], DOCS[2], DOCS[8]], [DOCS[0], DOCS[3], DOCS[4], DOCS[6]]
    first = None
    for _ in range(15):
        s = torch.stack([ce.score_pairs(qs, pos), ce.score_pairs(qs, neg)], dim=1)
        loss = group_ce_loss(s)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    ce.save(tmp_path / "ce")
    assert (tmp_path / "ce" / "config.json").exists()
    again = CrossEncoder.load(tmp_path / "ce")
    with torch.no_grad():
        np.testing.assert_allclose(again.score_pairs(qs, pos).numpy(), ce.score_pairs(qs, pos).numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- the rerank stage


@pytest.mark.parametrize("teacher", ["cross_encoder", "colbert"])
def test_rerank_stage_trains_teacher_writes_scores_and_eval_reranks(tmp_path, teacher):
    import json
    from pathlib import Path

    from conftest import compose, make_tiny_beir

    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    ckpt = make_tiny_bert(tmp_path / "bert", DOCS + QUERIES, punctuation=True)
    extra = ["model.teacher.dim=8", "model.teacher.query_max_len=12", "model.teacher.doc_max_len=32"] \
        if teacher == "colbert" else ["model.teacher.max_len=48"]
    cfg = compose([
        "model=bm25", "data=beir", "data.name=tiny", "data.train_split=test", "debug=tiny",
        "model.chain=[bm25,rerank,eval]", f"+teacher@model.teacher={teacher}",
        f"+model.checkpoint={ckpt}", "+model.local_dirs={}", *extra,
        "pipeline.rerank.max_steps=3", "pipeline.rerank.batch_size=2", "pipeline.rerank.n_negatives=2",
        "pipeline.rerank.lr=1e-3", "pipeline.rerank.log_every=1", "pipeline.rerank.neg_window=[1,10]",
        "pipeline.eval.rerank_depth=5", "runtime.progress=false",
        *(["pipeline.eval.colbert_e2e=true", "pipeline.eval.colbert_candidates=4"] if teacher == "colbert" else []),
    ], tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    st = summary["stages"]
    out = Path(st["rerank"]["dir"])
    lines = [json.loads(x) for x in (out / "teacher_scores.jsonl").read_text().splitlines()]
    test_qrels = {"q1": "d6", "q2": "d2", "q3": "d3", "q4": "d9"}
    assert {x["qid"] for x in lines} == set(test_qrels)
    assert all(test_qrels[x["qid"]] in x["scores"] for x in lines)  # positives + BM25 candidates
    assert st["rerank"]["metrics"]["pairs_scored"] == sum(len(x["scores"]) for x in lines)
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    m = st["eval"]["metrics"]
    assert "rerank/test/ndcg@10" in m and 0 <= m["rerank/test/ndcg@10"] <= 1
    from retrievers.evaluation import read_trec, trec_order

    rr = read_trec(Path(st["eval"]["dir"]) / "runs" / "test.rerank.trec")
    first = read_trec(Path(st["bm25"]["dir"]) / "runs" / "test.trec")
    for q, docs in first.items():
        before = [d for d, _ in trec_order(docs)]
        after = [d for d, _ in trec_order(rr[q])]
        assert sorted(after[:5]) == sorted(before[:5])  # the top 5 re-ordered among themselves
        assert after[5:] == before[5:]  # deeper hits kept, in the first stage's order
    assert "rerank@5" in (Path(st["eval"]["dir"]) / "report.md").read_text()
    if teacher == "colbert":  # end to end: its own run file and metrics, MaxSim-ranked
        e2e = read_trec(Path(st["eval"]["dir"]) / "runs" / "test.colbert_e2e.trec")
        assert set(e2e) == set(test_qrels) and "colbert_e2e/test/ndcg@10" in m

    # scripts/compare.py puts the second-stage rows next to the first stage
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import compare

    variants = ["rerank"] + (["colbert_e2e"] if teacher == "colbert" else [])
    text = compare.main([str(tmp_path / "run"), *(f"{tmp_path / 'run'}:{v}" for v in variants), "--metrics", "ndcg@10"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "run" not in line]
    assert len(rows) == 1 + len(variants)
    assert f"{m['test/ndcg@10']:.4f}" in rows[0] and f"{m['rerank/test/ndcg@10']:.4f}" in rows[1]
    # --fuse: one more row, the RRF of the retriever and its reranked run (ranx), equal to fusing by hand
    run_dir = str(tmp_path / "run")
    text = compare.main([run_dir, "--fuse", f"{run_dir},{run_dir}:rerank", "--metrics", "ndcg@10"])
    fused_row = [line for line in text.splitlines() if "(rrf)" in line]
    assert len(fused_row) == 1
    from retrievers.evaluation import evaluate, fuse

    ev = Path(st["eval"]["dir"])
    by_hand = fuse({"a": read_trec(ev / "runs" / "test.trec"), "b": read_trec(ev / "runs" / "test.rerank.trec")}, "rrf")
    from conftest import TINY_TEST_QRELS

    assert f"{evaluate(TINY_TEST_QRELS, by_hand, ['ndcg@10'])[0]['ndcg@10']:.4f}" in fused_row[0]
    if teacher == "cross_encoder":  # no end-to-end row in this run: the error names the file and the option
        with pytest.raises(SystemExit, match="test.colbert_e2e.trec.*colbert_e2e"):
            compare.main([f"{tmp_path / 'run'}:colbert_e2e", "--metrics", "ndcg@10"])


# --------------------------------------------------------------------------- distill + families


def _family_overrides(tmp_path, family: str, *extra: str) -> list[str]:
    ckpt = make_tiny_bert(tmp_path / "bert", DOCS + QUERIES, punctuation=True)
    small = ["pipeline.retriever1.max_steps=2", "pipeline.retriever1.batch_size=2", "pipeline.retriever1.neg_window=[1,10]",
             "pipeline.retriever2.max_steps=2", "pipeline.retriever2.batch_size=2", "pipeline.mine.window=[1,8]",
             "pipeline.mine.depth=10", "pipeline.mine.n_per_query=4", "pipeline.rerank.max_steps=2",
             "pipeline.rerank.batch_size=2", "pipeline.rerank.n_negatives=2", "pipeline.rerank.neg_window=[1,10]",
             "pipeline.distill.max_steps=3", "pipeline.distill.batch_size=2", "pipeline.distill.log_every=1",
             "pipeline.distill.lr=1e-3", "pipeline.eval.rerank_depth=4"]
    if family == "tct_colbert":
        small += ["model.teacher.dim=8", "model.teacher.query_max_len=12", "model.teacher.doc_max_len=32"]
    else:  # SimLM with the cross-encoder (its ColBERT default is the path tct_colbert runs)
        small += ["teacher@model.teacher=cross_encoder", "model.teacher.max_len=48"]
    return [f"model={family}", "data=beir", "data.name=tiny", "data.train_split=test", "debug=tiny",
            f"model.checkpoint={ckpt}", "model.encoder.query_max_len=16", "model.encoder.doc_max_len=32",
            "runtime.progress=false", *small, *extra]


@pytest.mark.parametrize("family,extra", [
    ("simlm", ["pipeline.distill.n_negatives=2"]),
    pytest.param("simlm", ["pipeline.distill.n_negatives=2", "loss@pipeline.distill.loss=margin_mse",
                           "model.chain=[bm25,mine,rerank,distill,index,eval]", "pipeline.mine.source=dense"],
                 marks=pytest.mark.slow),
    ("tct_colbert", ["pipeline.distill.n_negatives=0"]),
    ("tct_colbert", ["pipeline.distill.n_negatives=1", "pipeline.distill.neg_window=[1,10]"]),
])
def test_family_chains_distil_end_to_end(tmp_path, family, extra):
    import json
    from pathlib import Path

    from conftest import compose, make_tiny_beir

    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_family_overrides(tmp_path, family, *extra), tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    st = summary["stages"]
    assert st["distill"]["metrics"]["steps"] == 3
    d = Path(st["distill"]["dir"])
    rows = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    enc = json.loads((Path(st["index"]["dir"]) / "encoder.json").read_text())
    assert "distill" in enc["checkpoint"]  # the index holds the student's vectors
    assert "rerank/test/ndcg@10" in st["eval"]["metrics"]


def test_distill_without_rerank_says_how_to_fix(tmp_path):
    from conftest import compose, make_tiny_beir

    from pipelines.executor import ConfigError
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_family_overrides(tmp_path, "tct_colbert", "model.chain=[bm25,distill,index,eval]"), tmp_path)
    with pytest.raises(ConfigError, match="no rerank stage"):
        run_pipeline(cfg, tmp_path / "run")


def test_teacher_gate_stops_before_distill_and_loses_nothing(tmp_path):
    """gates.teacher_min_auc: a teacher at or below the floor stops the chain before distill, naming the
    measured AUC and the fix; the trained teacher stays cached, and the gate never enters a key."""
    from conftest import compose, make_tiny_beir

    from pipelines import all_stages
    from pipelines.executor import plan
    from pipelines.runner import run_pipeline
    from retrievers.errors import GateError

    make_tiny_beir(tmp_path / "data" / "tiny")
    over = _family_overrides(tmp_path, "simlm", "pipeline.distill.n_negatives=2")  # mined: the teacher scores negatives
    closed = compose(over + ["gates.teacher_min_auc=1.01"], tmp_path)  # no AUC reaches 1.01
    with pytest.raises(GateError, match=r"AUC [01]\.\d{3} \(0\.5 = chance\).*gates\.teacher_min_auc=null"):
        run_pipeline(closed, tmp_path / "run1")
    opened = compose(over + ["gates.teacher_min_auc=null"], tmp_path)
    keys = [{i.stage: i.key for i in plan(c, all_stages(), "all", [], tmp_path / "outputs" / "cache")}
            for c in (closed, opened)]
    assert keys[0] == keys[1]
    st = run_pipeline(opened, tmp_path / "run2")["stages"]
    assert st["rerank"]["status"] == "cached" and st["distill"]["status"] == "ran"
    auc = st["rerank"]["metrics"]["train_auc"]
    assert 0.0 <= auc <= 1.0
    passing = compose(over + [f"gates.teacher_min_auc={auc}"], tmp_path)  # a cached distill is served, never re-gated
    assert run_pipeline(passing, tmp_path / "run3")["stages"]["distill"]["status"] == "cached"


def test_score_query_sample_is_seeded_ordered_and_checked():
    from pipelines.executor import ConfigError
    from retrievers.reranking import score_query_sample

    qids = [f"q{i:03d}" for i in range(50)]
    assert score_query_sample(qids, None, 1) == qids and score_query_sample(qids, 80, 1) == qids
    a, b, c = score_query_sample(qids, 10, 1), score_query_sample(qids, 10, 1), score_query_sample(qids, 10, 2)
    assert a == b and a != c  # the seed decides which queries
    assert len(a) == 10 and a == sorted(a) and set(a) <= set(qids)
    with pytest.raises(ConfigError, match="score_queries=0"):
        score_query_sample(qids, 0, 1)


@pytest.mark.parametrize("overrides,loss,n_neg", [
    (["model=tct_colbert"], "InBatchKD", 0),                                    # TCT-ColBERT: in-batch KD
    (["model=tct_colbert", "pipeline.distill.n_negatives=1"], "InBatchKD", 1),   # the HN variant
    (["model=tct_colbert", "loss@pipeline.distill.loss=group_kl", "pipeline.distill.n_negatives=7"], "GroupKL", 7),
    (["model=simlm"], "GroupKL", 7),                                             # SimLM: group KL over teacher scores
    (["model=simlm", "loss@pipeline.distill.loss=margin_mse"], "MarginMSE", 7),
])
def test_the_family_yaml_chooses_the_distill_loss(tmp_path, overrides, loss, n_neg):
    """The loss is a `_target_` component the family YAML selects (conf/loss/); code tests no strings."""
    from conftest import compose
    from hydra.utils import instantiate

    cfg = compose([*overrides, "data=scifact"], tmp_path)
    assert type(instantiate(cfg.pipeline.distill.loss)).__name__ == loss
    assert cfg.pipeline.distill.n_negatives == n_neg


def test_teacher_quality_against_its_chance_rate():
    """AUC is 1 for a teacher that puts every positive first, 0.5 for one that ties everything,
    0 for an inverted one; the top-1 chance rate is the share of positives among the candidates."""
    from retrievers.reranking import teacher_quality

    pos = {"q1": {"a", "b"}, "q2": {"x"}}
    perfect = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}, "q2": {"x": 1.0, "y": 0.0}}
    m = teacher_quality(perfect, pos)
    assert m == {"top1_is_positive": 1.0, "top1_chance": (0.5 + 0.5) / 2, "auc": 1.0}
    tied = {q: {d: 0.0 for d in v} for q, v in perfect.items()}
    assert teacher_quality(tied, pos)["auc"] == 0.5
    inverted = {q: {d: -s for d, s in v.items()} for q, v in perfect.items()}
    m = teacher_quality(inverted, pos)
    assert m["auc"] == 0.0 and m["top1_is_positive"] == 0.0
    # q1: one of two positives above both negatives, the other below one: (1 + 1 + 1 + 0) / 4
    mixed = {"q1": {"a": 3.0, "c": 2.0, "b": 1.0, "d": 0.0}}
    assert teacher_quality(mixed, pos)["auc"] == 0.75


def test_teacher_quality_script_reads_a_stage_dir(tmp_path, capsys):
    import importlib.util
    import json

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("tq", REPO / "scripts" / "teacher_quality.py")
    tq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tq)
    stage = tmp_path / "rerank-v1-abc"
    stage.mkdir()
    (stage / "manifest.json").write_text(json.dumps({"reads": {"data": {"name": "toy", "train_split": "train"}}}))
    (stage / "teacher_scores.jsonl").write_text(json.dumps({"qid": "q1", "scores": {"a": 1.0, "b": 0.0}}) + "\n")
    data = tmp_path / "toy"
    (data / "qrels").mkdir(parents=True)
    (data / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta\t1\n")
    tq.main([str(stage), "--data-dir", str(data)])
    out = json.loads(capsys.readouterr().out)
    assert out == {"stage": "rerank-v1-abc", "queries": 1, "top1_is_positive": 1.0, "top1_chance": 0.5, "auc": 1.0}
    with pytest.raises(SystemExit, match="qrels/train.tsv does not exist"):
        tq.main([str(stage), "--data-dir", str(tmp_path / "nowhere")])
