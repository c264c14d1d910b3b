"""Faults: a killed run leaves no orphan and loses nothing; bad runs never take over the pointers.

The kill -9 suite over five points of a chain is marked ``faults`` (``make test-faults``); the
orphan check and the run-record checks are fast and run in ``make test``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_tiny_beir, tiny_overrides, write_jsonl


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DRLAB_DATA_DIR", "DRLAB_OUTPUT_DIR", "DRLAB_FAILPOINT")}
    return {**env, **extra}


def _cli(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_kill_9_during_bm25_leaves_no_java_process(tmp_path):
    root = make_tiny_beir(tmp_path / "data" / "tiny")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    filler = [{"_id": f"n{i}", "title": "", "text": " ".join(words[(i + j) % 11] for j in range(60))} for i in range(150000)]
    corpus = root / "corpus.jsonl"
    write_jsonl(root / "filler.jsonl", filler)  # enough text that indexing outlasts the poll below
    corpus.write_text(corpus.read_text() + (root / "filler.jsonl").read_text())
    (root / "filler.jsonl").unlink()
    run = _cli([*tiny_overrides(), f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}"])
    java, deadline = None, time.time() + 120
    while java is None and time.time() < deadline and run.poll() is None:
        java = next((c for c in _children(run.pid) if "io.anserini" in _cmdline(c)), None)
        time.sleep(0.05)
    assert java is not None, f"the run never started its Java BM25 process: {run.stdout.read().decode()[-2000:]}"
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    deadline = time.time() + 1.0  # the kernel's SIGKILL is immediate; without it the JVM indexes on for seconds
    while _alive(java) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(java), f"java (pid {java}) outlived its killed parent"
    assert not list((tmp_path / "out" / "cache").glob("bm25/*/manifest.json")), "nothing finished"


def test_a_failed_run_keeps_the_pointers_of_the_last_good_one(tmp_path, tiny_beir):
    from conftest import compose

    from pipelines.runner import run_pipeline

    cfg = compose(tiny_overrides(), tmp_path)
    good = run_pipeline(cfg, tmp_path / "runs" / "good")
    out = tmp_path / "outputs"
    pointer = json.loads((out / "experiments" / "bm25-tiny.json").read_text())
    assert good["status"] == "ok" and pointer["run_dir"] == str(tmp_path / "runs" / "good")
    bad = compose([*tiny_overrides(), "pipeline.eval.metrics=[not-a-metric@10]"], tmp_path)
    with pytest.raises(Exception, match="not-a-metric"):  # noqa: B017  whatever ranx raises for it
        run_pipeline(bad, tmp_path / "runs" / "bad")
    failed = json.loads((tmp_path / "runs" / "bad" / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["error"] and failed["metrics"] == {}
    assert json.loads((out / "experiments" / "bm25-tiny.json").read_text()) == pointer
    assert os.readlink(out / "latest").endswith("good")


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_their_own_run_dirs(tmp_path, tiny_beir):
    base = [*tiny_overrides(), f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}",
            "hydra.run.dir=${paths.output_dir}/runs/fixed-second_${drlab_uid:}"]
    runs = [_cli(base), _cli(base)]
    for r in runs:
        assert r.wait(timeout=300) == 0, r.stdout.read().decode()[-3000:]
    dirs = sorted((tmp_path / "out" / "runs").iterdir())
    assert len(dirs) == 2 and all((d / "summary.json").exists() for d in dirs)


def test_a_dry_run_writes_no_run_directory_and_never_downloads(tmp_path):
    proc = _cli(["model=bm25", "data=beir", "data.name=absent-set", f"paths.data_dir={tmp_path / 'data'}",
                 f"paths.output_dir={tmp_path / 'out'}", "dry_run=true"])
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 2 and "absent-set" in out and "is incomplete" in out, out[-2000:]
    assert not (tmp_path / "data" / "absent-set").exists(), "nothing downloaded into the data directory"
    assert not (tmp_path / "out").exists(), "no run directory, no cache, no log"


# --------------------------------------------------------------------------- the fault suite (make test-faults)
# A dpr chain on the tiny fixtures (bm25 -> retriever1 -> index -> eval, a random 2-layer BERT), run
# as `python run.py` processes. Each fault is injected, the same command is re-run, and its metrics
# must equal those of an uninterrupted run.

FAULT_KILLS = {  # point of the chain -> how the run is killed there (DRLAB_FAILPOINT, or a live JVM)
    "during bm25": "java",
    "mid-training": "checkpoint:retriever1:2",
    "between .partial and the rename": "before_rename:retriever1",
    "during index": "shard:0",
    "during eval": "after_run:eval",
}
DAMAGE = {  # artifact kind -> (stage, file, how)
    "BM25 TREC run": ("bm25", "runs/test.trec", "truncate"),
    "checkpoint weights": ("retriever1", "checkpoint/query_encoder/model.safetensors", "flip"),
    "FAISS index": ("index", "index.faiss", "truncate"),
    "doc ids": ("index", "doc_ids.txt", "delete"),
    "metrics.json": ("eval", "metrics.json", "empty"),
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from conftest import TINY_DOCS, TINY_QUERIES, make_tiny_bert

    root = tmp_path_factory.mktemp("faults")
    make_tiny_beir(root / "data" / "tiny")
    bert = make_tiny_bert(root / "bert", [f"{t} {x}" for _, t, x in TINY_DOCS] + [q for _, q in TINY_QUERIES])
    args = ["model=dpr", "data=beir", "data.name=tiny", "data.train_split=train", "debug=tiny", f"model.checkpoint={bert}",
            f"paths.data_dir={root / 'data'}", "model.encoder.doc_max_len=32", "pipeline.retriever1.max_steps=6",
            "pipeline.index.shard_size=4", "runtime.progress=false"]
    ref = _finish(args, root / "reference")
    return {"args": args, "root": root, "reference": ref}


def _finish(args: list[str], out: Path) -> dict:
    proc = _cli([*args, f"paths.output_dir={out}"])
    text = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, text[-3000:]
    return json.loads(Path(text.strip().splitlines()[-1].split("summary: ", 1)[1]).read_text())


def _killed(args: list[str], out: Path, how: str) -> int:
    run = _cli([*args, f"paths.output_dir={out}"], env=_env(**({} if how == "java" else {"DRLAB_FAILPOINT": how})))
    if how == "java":
        java = None
        while java is None and run.poll() is None:
            java = next((c for c in _children(run.pid) if "io.anserini" in _cmdline(c)), None)
            time.sleep(0.01)
        assert java is not None, "bm25 finished before it could be killed"
        run.send_signal(signal.SIGKILL)
    run.wait(timeout=600)
    return run.returncode


@pytest.mark.faults
@pytest.mark.parametrize("point", list(FAULT_KILLS))
def test_kill_9_then_rerun_equals_an_uninterrupted_run(chain, point, tmp_path):
    out = tmp_path / "out"
    assert _killed(chain["args"], out, FAULT_KILLS[point]) == -signal.SIGKILL
    assert not list(out.glob("runs/*/summary.json")) or all(
        json.loads(p.read_text())["status"] != "ok" for p in out.glob("runs/*/summary.json"))
    again = _finish(chain["args"], out)
    assert again["metrics"] == chain["reference"]["metrics"], point
    for s, st in again["stages"].items():
        assert st["key"] == chain["reference"]["stages"][s]["key"]
    assert not list(out.glob("cache/*/*.partial")), "no half-written stage is left behind"


@pytest.mark.faults
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_artifact_is_detected_and_recomputed(chain, kind, tmp_path):
    from test_executor import _damage

    out = tmp_path / "out"
    first = _finish(chain["args"], out)
    stage, rel, how = DAMAGE[kind]
    _damage(Path(first["stages"][stage]["dir"]) / rel, how)
    args = [*chain["args"], "verify=true"] if how == "flip" else chain["args"]
    again = _finish(args, out)
    assert again["stages"][stage]["status"] == "ran", f"{kind}: the damaged {rel} was reused"
    assert list(out.glob(f"cache/{stage}/*.damaged-*")), "set aside for inspection"
    assert again["metrics"] == chain["reference"]["metrics"]


@pytest.mark.faults
def test_concurrent_runs_on_overlapping_chains_compute_each_stage_once(chain, tmp_path):
    out = tmp_path / "out"
    bm25_only = [a for a in chain["args"] if not a.startswith(("model=", "model.", "pipeline.retriever1"))]
    commands = [chain["args"], chain["args"], ["model=bm25", *bm25_only]]  # two identical + one sharing bm25
    procs = [_cli([*c, f"paths.output_dir={out}"]) for c in commands]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), [t[-2000:] for t in logs]
    for stage in ("bm25", "retriever1", "index"):
        ran = sum(f"[{stage}] running ->" in t for t in logs)
        assert ran == 1, f"{stage} ran {ran} times"
    summaries = [json.loads(Path(t.strip().splitlines()[-1].split("summary: ", 1)[1]).read_text()) for t in logs]
    assert summaries[0]["metrics"] == summaries[1]["metrics"] == chain["reference"]["metrics"]


def test_bad_values_stop_before_work_with_the_key_and_the_fix(tmp_path, tiny_beir):
    base = [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}", "dry_run=true"]
    cases = {
        "pipeline.bm25.k1=abc": "config key 'pipeline.bm25.k1' expects a number (conf/ default: 0.9), got 'abc'",
        "pipeline.retriever1.neg_window=5": "expects a list",
        "pipeline.bm25.k=1": "Did you mean 'pipeline.bm25.k1'?",
    }
    for arg, msg in cases.items():
        proc = _cli(["model=dpr", "data=beir", "data.name=tiny", arg, *base])
        out = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 2 and msg in out and "Traceback" not in out, (arg, out[-1500:])
    proc = _cli(["model=bm25", "data=beir", *base])
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 2 and "data.name is not set" in out and "data=beir data.name=" in out, out[-1500:]
    assert not (tmp_path / "out").exists()


def test_help_describes_the_run_keys_with_examples():
    proc = _cli(["--help"])
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0
    for word in ("model=<family>", "data=<dataset>", "stage=<target>", "dry_run=true", "force=[<stage>]", "Examples:",
                 "python run.py -m model=dpr,ance"):
        assert word in out, word


@pytest.mark.slow
def test_sweep_jobs_get_their_own_experiment_names(tmp_path, tiny_beir):
    proc = _cli(["-m", *tiny_overrides(), "pipeline.bm25.k1=0.9,0.8", f"paths.data_dir={tmp_path / 'data'}",
                 f"paths.output_dir={tmp_path / 'out'}"])
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    names = sorted(p.stem for p in (tmp_path / "out" / "experiments").glob("*.json"))
    assert names == ["bm25-tiny-pipeline.bm25.k1=0.8", "bm25-tiny-pipeline.bm25.k1=0.9"], names
