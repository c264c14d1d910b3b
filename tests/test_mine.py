"""Hard negatives: negative selection, the mine stage, retriever2 and the ANCE refresh (tiny models).

The refresh tests are the acceptance test of the hard-negatives issue: a refresh
changes the negatives, training continues from the step it refreshed at, a kill after
the refresh resumes at that step with the refreshed negatives (bitwise equal to an
uninterrupted run), and the asynchronous refresh runs in a second process.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_DOCS, compose, make_tiny_beir
from test_training import _Killed, _save_tiny_checkpoint, tiny_data, tiny_encoder

from retrievers.ance import AnnRefresher
from retrievers.mining import DenseMiner, overlap, read_negatives, select_negatives, write_negatives
from retrievers.training import TrainArgs, Trainer

# --------------------------------------------------------------------------- selection


def _ranked(n: int = 20) -> dict[str, list[tuple[str, float]]]:
    return {q: [(f"{q}-d{r}", 1.0 - r / 100) for r in range(1, n + 1)] for q in ("a", "b", "c")}


def test_select_negatives_window_positives_and_seeded_sampling():
    ranked = _ranked()
    positives = {"a": ["a-d4"], "b": ["b-d1"], "c": []}
    negs, stats = select_negatives(ranked, positives, (3, 10), 5, seed=1)
    for q, cands in negs.items():
        assert len(cands) == 5
        assert all(3 <= c["rank"] <= 10 for c in cands)
        assert all(c["id"] not in positives[q] for c in cands)
        assert [c["rank"] for c in cands] == sorted(c["rank"] for c in cands)  # rank order kept
        assert all(c["id"] == f"{q}-d{c['rank']}" for c in cands)  # rank counted before removing positives
    assert stats["window_candidates_mean"] == pytest.approx((7 + 8 + 8) / 3)  # a loses its positive at rank 4
    again, _ = select_negatives(ranked, positives, (3, 10), 5, seed=1)
    other, _ = select_negatives(ranked, positives, (3, 10), 5, seed=2)
    assert again == negs and other != negs
    whole, _ = select_negatives(ranked, positives, (3, 10), None, seed=1)
    assert [c["rank"] for c in whole["b"]] == list(range(3, 11))


def test_teacher_filter_drops_candidates_scored_like_a_positive():
    ranked = {"q": [("p", 0.9), ("x", 0.8), ("y", 0.7), ("z", 0.6), ("u", 0.5)]}
    teacher = {"q": {"p": 5.0, "x": 6.0, "y": 4.5, "z": 1.0}}  # u unscored
    negs, stats = select_negatives(ranked, {"q": ["p"]}, (1, 5), None, 0, teacher, fn_margin=0.0)
    assert [c["id"] for c in negs["q"]] == ["y", "z", "u"]  # x outscores the positive: a likely false negative
    assert stats["teacher_filtered"] == 1 and stats["teacher_unscored"] == 1
    negs, stats = select_negatives(ranked, {"q": ["p"]}, (1, 5), None, 0, teacher, fn_margin=1.0)
    assert [c["id"] for c in negs["q"]] == ["z", "u"]  # y is within the margin of the positive
    assert stats["teacher_filtered"] == 2


def test_negatives_file_round_trip_and_bad_line(tmp_path):
    from pipelines.executor import ConfigError

    negs, _ = select_negatives(_ranked(), {"a": ["a-d4"]}, (1, 6), 3, seed=0)
    write_negatives(tmp_path / "n.jsonl", negs, {"a": ["a-d4"]})
    pool = read_negatives(tmp_path / "n.jsonl")
    assert pool == {q: [c["id"] for c in v] for q, v in negs.items()}
    assert json.loads((tmp_path / "n.jsonl").read_text().splitlines()[0])["pos"] == ["a-d4"]
    (tmp_path / "bad.jsonl").write_text('{"qid": "a", "neg": []}\n{"qid": "b"\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        read_negatives(tmp_path / "bad.jsonl")


def test_overlap():
    assert overlap({"q": ["a", "b"]}, {"q": ["a", "c"]}) == 0.5
    assert overlap({}, {"q": ["a"]}) == 0.0


# --------------------------------------------------------------------------- dense miner


def _miner(**kw) -> DenseMiner:
    data = tiny_data()
    return DenseMiner(
        doc_ids=list(data.doc_text), doc_texts=list(data.doc_text.values()), queries=data.queries,
        positives=data.positives, depth=8, window=(2, 8), n_per_query=4, seed=0, progress=False,
        search_batch_size=5, **kw,
    )


def test_dense_miner_matches_brute_force_and_searches_in_chunks(tmp_path):
    import numpy as np

    enc = tiny_encoder(tmp_path)
    miner = _miner()
    ranked, negs, stats = miner(enc, tmp_path / "mine")
    d = enc.encode(miner.doc_texts, "doc", progress=False)
    q_ids = sorted(miner.queries)
    q = enc.encode([miner.queries[x] for x in q_ids], "query", progress=False)
    scores = q @ d.T
    for r, qid in enumerate(q_ids):
        top = np.argsort(-scores[r], kind="stable")[:8]
        assert [x for x, _ in ranked[qid]][:3] == [miner.doc_ids[i] for i in top][:3]
        assert all(c["id"] not in miner.positives[qid] and 2 <= c["rank"] <= 8 for c in negs[qid])
        assert len(negs[qid]) <= 4
    assert stats["train_queries"] == 12 and stats["depth"] == 8
    _, again, stats2 = miner(enc, tmp_path / "mine2")  # same weights: same candidates, same sample
    assert again == negs and stats2["window_overlap_with_previous"] == 1.0


# --------------------------------------------------------------------------- refresh


def _refresh_setup(tmp_path: Path, work: str, **kw):
    data = tiny_data(n_negatives=1)
    # the initial pool: each query's *last* documents (far from what a dense search returns first)
    initial = {q: [d for d in list(data.doc_text)[::-1] if d not in ps][:3] for q, ps in data.positives.items()}
    data.set_pool(initial)
    miner = _miner()
    refresher = AnnRefresher(miner, every=3, work_dir=tmp_path / work, initial_pool=initial, **kw)
    return data, initial, refresher


ARGS = dict(batch_size=4, max_steps=6, lr=2e-3, save_every=0, log_every=1, progress=False)


def test_refresh_changes_negatives_and_training_continues_from_that_step(tmp_path, caplog):
    data, initial, refresher = _refresh_setup(tmp_path, "work")
    enc = tiny_encoder(tmp_path, shared=False, dropout=0.1)
    with caplog.at_level(logging.INFO, logger="drlab"):
        result = Trainer(enc, data, TrainArgs(**ARGS), tmp_path / "work", refresher=refresher).train()
    assert result.step == 6
    recs = refresher.records()
    assert [r["step"] for r in recs] == [3]  # every 3 steps, not after the last one
    assert recs[0]["overlap_with_previous"] < 1.0  # the negatives changed
    assert "window_overlap_with_previous" not in recs[0]  # no window before the first search here
    assert data.pool != initial and data.pool == refresher.current
    rows = [json.loads(x) for x in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # no restart after the refresh
    assert "[refresh] step 3" in caplog.text
    # the new pool is what a dense search with the step-3 weights selects, from the mine window
    for q, negs in data.pool.items():
        assert all(d not in data.positives[q] for d in negs)


def test_kill_after_refresh_resumes_at_that_step_with_the_new_negatives(tmp_path, caplog):
    def fresh():
        return tiny_encoder(tmp_path, shared=False, dropout=0.1)

    data, _, refresher = _refresh_setup(tmp_path, "ref")
    reference = fresh()
    Trainer(reference, data, TrainArgs(**ARGS), tmp_path / "ref", refresher=refresher).train()

    data, _, refresher = _refresh_setup(tmp_path, "work")
    killed = Trainer(fresh(), data, TrainArgs(**ARGS), tmp_path / "work", refresher=refresher)
    orig = killed._save

    def save_then_die(opt, sched, scaler, step, epoch, pos):
        orig(opt, sched, scaler, step, epoch, pos)
        if step == 3:
            raise _Killed()

    killed._save = save_then_die
    with pytest.raises(_Killed):
        killed.train()
    refreshed = dict(data.pool)

    data, initial, refresher = _refresh_setup(tmp_path, "work")
    resumed = fresh()
    with caplog.at_level(logging.INFO, logger="drlab"):
        result = Trainer(resumed, data, TrainArgs(**ARGS), tmp_path / "work", refresher=refresher).train()
    assert result.resumed_from == 3 and result.step == 6
    assert "resuming with the negatives of the refresh at step 3" in caplog.text
    assert refresher.current == refreshed != initial
    assert [r["step"] for r in refresher.records()] == [3]  # not refreshed again
    rows = [json.loads(x) for x in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # same batches, same negatives
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_async_refresh_mines_in_a_second_process(tmp_path):
    ckpt = _save_tiny_checkpoint(tmp_path)
    cfg = {"_target_": "retrievers.dpr.build", "checkpoint": str(ckpt), "shared": True, "pooling": "mean",
           "normalize": False, "similarity": "dot", "temperature": 1.0, "query_max_len": 16, "doc_max_len": 32,
           "local_dirs": None}
    from retrievers.encoder import instantiate_encoder

    data, initial, refresher = _refresh_setup(
        tmp_path, "work", mode="async", encoder_spec=(cfg, None), max_lag=2
    )
    refresher.every = 2
    enc = instantiate_encoder(cfg)
    args = {**ARGS, "max_steps": 7}
    Trainer(enc, data, TrainArgs(**args), tmp_path / "work", refresher=refresher).train()
    recs = refresher.records()
    assert recs, "no refresh was adopted"
    assert all(r["mode"] == "async" and r["worker_pid"] != os.getpid() for r in recs)
    assert all(r["step"] >= r["requested_step"] and r["step"] - r["requested_step"] <= 2 for r in recs)
    assert data.pool != initial
    assert refresher._proc is None  # worker stopped at the end of training
    assert not list((tmp_path / "work" / "refresh").glob("request_step*.pt"))


# --------------------------------------------------------------------------- the chain


def _ance_overrides(tmp_path: Path, *extra: str) -> list[str]:
    ckpt = _save_tiny_checkpoint(tmp_path)
    return [
        "model=ance", "data=beir", "data.name=tiny", "data.train_split=test", "debug=tiny",
        f"model.checkpoint={ckpt}", "pipeline.retriever1.n_negatives=1", "pipeline.retriever1.neg_window=[1,10]",
        "pipeline.retriever1.batch_size=2", "pipeline.retriever1.max_steps=2", "pipeline.retriever1.lr=1e-3",
        "pipeline.retriever2.batch_size=2", "pipeline.retriever2.max_steps=4", "pipeline.retriever2.lr=1e-3",
        "pipeline.mine.window=[1,8]", "pipeline.mine.n_per_query=3", "pipeline.mine.depth=10",
        "pipeline.retriever2.refresh_every=2", "runtime.progress=false", *extra,
    ]


def test_ance_chain_end_to_end_cached_and_refresh_every_reruns_only_downstream(tmp_path):
    from pipelines import all_stages
    from pipelines.executor import plan
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_ance_overrides(tmp_path), tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    st = summary["stages"]
    assert [s for s in st] == ["bm25", "retriever1", "mine", "retriever2", "index", "eval"]
    mine_dir, r2_dir = Path(st["mine"]["dir"]), Path(st["retriever2"]["dir"])
    lines = [json.loads(x) for x in (mine_dir / "negatives.jsonl").read_text().splitlines()]
    assert {x["qid"] for x in lines} == {"q1", "q2", "q3", "q4"}
    for x in lines:
        assert x["neg"] and all(c["id"] not in x["pos"] and 1 <= c["rank"] <= 8 for c in x["neg"])
    assert (mine_dir / "runs" / "test.trec").exists()
    assert json.loads((mine_dir / "mine_stats.json").read_text())["peak_rss_mb"] > 0
    refresh = [json.loads(x) for x in (r2_dir / "refresh_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in refresh] == [2]
    assert 0.0 <= refresh[0]["window_overlap_with_previous"] <= 1.0  # vs the mine stage's candidate window
    assert st["retriever2"]["metrics"]["refreshes"] == 1
    assert (r2_dir / "refresh.png").exists() and (r2_dir / "checkpoint" / "head.pt").exists()
    enc_rec = json.loads((Path(st["index"]["dir"]) / "encoder.json").read_text())
    assert "retriever2" in enc_rec["checkpoint"]  # the index is built from retriever2's weights
    assert 0 <= st["eval"]["metrics"]["test/ndcg@10"] <= 1

    def statuses(c):
        return {i.stage: i.status for i in plan(c, all_stages(), "all", [], tmp_path / "outputs" / "cache")}

    assert set(statuses(cfg).values()) == {"cached"}
    changed = compose(_ance_overrides(tmp_path, "pipeline.retriever2.refresh_every=3"), tmp_path)
    assert statuses(changed) == {"bm25": "cached", "retriever1": "cached", "mine": "cached",
                                 "retriever2": "run", "index": "run", "eval": "run"}
    no_r2 = compose(_ance_overrides(tmp_path, "pipeline.mine.enabled=false", "pipeline.retriever2.enabled=false"),
                    tmp_path)
    assert statuses(no_r2)["retriever1"] == "cached" and statuses(no_r2)["index"] == "run"


def test_retriever2_without_mine_says_how_to_fix(tmp_path):
    from pipelines.executor import ConfigError
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_ance_overrides(tmp_path, "pipeline.mine.enabled=false", "stage=retriever2"), tmp_path)
    with pytest.raises(ConfigError, match="no enabled mine stage"):
        run_pipeline(cfg, tmp_path / "run")


def test_mine_from_bm25_run_and_bm25_mix(tmp_path):
    """mine with source=bm25 (no dense upstream) and retriever2 mixing BM25 negatives in."""
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(
        _ance_overrides(tmp_path, "model.chain=[bm25,mine,retriever2]", "pipeline.mine.source=bm25",
                        "pipeline.retriever2.refresh_every=0", "pipeline.retriever2.bm25_negatives=1",
                        "pipeline.retriever2.bm25_window=[1,10]"),
        tmp_path,
    )
    summary = run_pipeline(cfg, tmp_path / "run")
    stats = json.loads((Path(summary["stages"]["mine"]["dir"]) / "mine_stats.json").read_text())
    assert stats["source"].startswith("bm25")
    train = json.loads((Path(summary["stages"]["retriever2"]["dir"]) / "train_stats.json").read_text())
    assert train["bm25_negatives"] == 1 and train["n_negatives"] == 1
    assert summary["stages"]["retriever2"]["metrics"]["steps"] == 4


def test_mixed_pool_batches_take_from_both_pools():
    from retrievers.contrastive import ContrastiveData

    docs = {d: t for d, t, _ in TINY_DOCS}
    data = ContrastiveData({"q": "x"}, {"q": ["d1"]}, docs, {"q": ["d2", "d3"]}, 1, {"q": ["d4", "d5"]}, 1)
    data.pairs = data.pairs * 4
    for b in data.epoch_batches(0, 0, 2):
        for i in range(len(b)):
            group = b.doc_ids[i * b.group:(i + 1) * b.group]
            assert group[0] == "d1" and group[1] in ("d2", "d3") and group[2] in ("d4", "d5")


def test_ance_stage_with_async_refresh_worker(tmp_path):
    """refresh_mode=async from the config: the worker builds the encoder from model.encoder + retriever1."""
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_ance_overrides(tmp_path, "stage=retriever2", "pipeline.retriever2.refresh_mode=async",
                                  "pipeline.retriever2.refresh_max_lag=1"), tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    r2 = Path(summary["stages"]["retriever2"]["dir"])
    recs = [json.loads(x) for x in (r2 / "refresh_log.jsonl").read_text().splitlines()]
    assert recs and all(r["mode"] == "async" and r["worker_pid"] != os.getpid() for r in recs)
    assert recs[0]["requested_step"] == 2 and recs[0]["step"] in (2, 3)  # adopted within max_lag
