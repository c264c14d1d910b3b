"""Real-data checks (``pytest -m data``): BM25 reproduces Pyserini's published BEIR numbers.

Reference numbers: Pyserini's BEIR regressions, BM25 flat and multifield on SciFact
(k1=0.9, b=0.4): nDCG@10 0.6789 (flat), Recall@100 0.9253 (flat), nDCG@10 0.6647 (multifield).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, compose

pytestmark = pytest.mark.data

DATA = Path(os.environ.get("DRLAB_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="module", autouse=True)
def need_data():
    if not (DATA / "scifact" / "corpus.jsonl").exists():
        pytest.skip(f"real data not found at {DATA} (set DRLAB_DATA_DIR)")


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DRLAB_DATA_DIR", "DRLAB_OUTPUT_DIR")}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: "), last
    return json.loads(Path(last[len("summary: "):]).read_text())


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("realdata") / "out"


def scifact_args(out: Path, *extra: str) -> list[str]:
    return ["model=bm25", "data=scifact", f"paths.data_dir={DATA}", f"paths.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def scifact_flat(out_dir) -> dict:
    return summary_of(run_cli(scifact_args(out_dir)))


def test_scifact_flat_matches_pyserini(scifact_flat):
    m = scifact_flat["metrics"]
    assert {k: v["status"] for k, v in scifact_flat["stages"].items()} == {"bm25": "ran", "eval": "ran"}
    assert round(m["test/ndcg@10"], 4) == 0.6789
    assert round(m["test/recall@100"], 4) == 0.9253


def test_scifact_flat_equals_trec_eval(scifact_flat):
    import pytrec_eval

    from retrievers.data import read_qrels
    from retrievers.evaluation import read_trec

    qrels = read_qrels(DATA / "scifact" / "qrels" / "test.tsv")
    run = read_trec(Path(scifact_flat["stages"]["eval"]["dir"]) / "runs" / "test.trec")
    assert set(run) <= set(qrels)
    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100"}).evaluate(run)
    for ours, theirs in (("test/ndcg@10", "ndcg_cut_10"), ("test/recall@100", "recall_100")):
        ref = sum(res.get(q, {}).get(theirs, 0.0) for q in qrels) / len(qrels)
        assert scifact_flat["metrics"][ours] == pytest.approx(ref, abs=1e-6), ours


def test_scifact_second_run_is_cached_and_fast(scifact_flat, out_dir):
    t0 = time.perf_counter()
    s = summary_of(run_cli(scifact_args(out_dir)))
    wall = time.perf_counter() - t0
    assert {k: v["status"] for k, v in s["stages"].items()} == {"bm25": "cached", "eval": "cached"}
    assert s["metrics"] == scifact_flat["metrics"]
    assert wall < 15, f"a fully cached run took {wall:.1f}s"


def test_experiment_flat_is_the_default_run(scifact_flat, out_dir):
    """experiment=bm25-beir-flat sets the defaults explicitly: same keys, all cached."""
    proc = run_cli(scifact_args(out_dir, "experiment=bm25-beir-flat", "dry_run=true"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("bm25", "eval"):
        key = scifact_flat["stages"][stage]["key"]
        assert re.search(rf"^\s*{stage}\s+cached\s+{key}(  <- .*)?$", proc.stdout, re.M), proc.stdout


def test_scifact_multifield_matches_pyserini(scifact_flat, out_dir):
    s = summary_of(run_cli(scifact_args(out_dir, "pipeline.bm25.fields=multifield")))
    assert {k: v["status"] for k, v in s["stages"].items()} == {"bm25": "ran", "eval": "ran"}
    assert s["stages"]["bm25"]["key"] != scifact_flat["stages"]["bm25"]["key"]
    assert round(s["metrics"]["test/ndcg@10"], 4) == 0.6647


def test_other_dataset_has_other_keys(scifact_flat, out_dir):
    proc = run_cli(["model=bm25", "data=nfcorpus", f"paths.data_dir={DATA}", f"paths.output_dir={out_dir}", "dry_run=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.split("plan:", 1)[1].strip().splitlines()[:2]}
    for stage in ("bm25", "eval"):
        assert rows[stage][1:3] == ["to", "run"], rows
        assert rows[stage][3] != scifact_flat["stages"][stage]["key"]


@pytest.mark.parametrize("name", ["scifact", "nfcorpus", "cranfield", "cisi", "vaswani", "msmarco-dl19-subset"])
def test_real_dataset_loads(name, tmp_path):
    """Each shared dataset passes validation (warnings allowed, no errors)."""
    from omegaconf import OmegaConf

    from retrievers.data import load_dataset

    if not (DATA / name).exists():
        pytest.skip(f"{name} not in {DATA}")
    cfg = compose([f"data={name}"], tmp_path, data_dir=DATA)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    splits = [s for s in (data["eval_split"], data.get("train_split")) if s]
    ds = load_dataset(data, splits)
    assert ds.corpus and ds.queries
    for s in splits:
        assert ds.qrels[s]
        assert set(ds.qrels[s]) <= set(ds.queries), "unknown queries are dropped"
        assert ds.split_queries(s)


def test_pretrained_minilm_matches_mteb(out_dir):
    """all-MiniLM-L6-v2 zero-shot on SciFact test: MTEB's published nDCG@10 0.6451 (+- 0.001)."""
    args = ["model=pretrained", "model.checkpoint=sentence-transformers/all-MiniLM-L6-v2", "data=scifact",
            "stage=eval", f"paths.data_dir={DATA}", f"paths.output_dir={out_dir}"]
    proc = run_cli(args, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = summary_of(proc)["metrics"]
    assert abs(m["test/ndcg@10"] - 0.6451) <= 0.001, m
