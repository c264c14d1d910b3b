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


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DRLAB_DATA_DIR", "DRLAB_OUTPUT_DIR")}
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


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
