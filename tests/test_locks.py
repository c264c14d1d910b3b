"""Stage locks for a shared output directory (pipelines/locks.py): exclusive across processes, a dead
holder's lock is broken (at once on this host, after ``stale_after`` without heartbeat from another
host), a live holder's heartbeat keeps its lock, and N concurrent processes on a shared cache compute
every stage exactly once and publish nothing half-written, also when one of them is killed mid-stage."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipelines.executor import Stage, execute, plan
from pipelines.locks import HOST, StageLock, read_holder


def _hold(path: str, seconds: float, stale_after: float, ready) -> None:
    with StageLock(path, stale_after=stale_after):
        ready.set()
        time.sleep(seconds)


def _holder_process(path: Path, seconds: float, stale_after: float = 600):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold, args=(str(path), seconds, stale_after, ready))
    p.start()
    assert ready.wait(60)
    return p


def _fake_lock(path: Path, host: str, pid: int, age_s: float) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-11-30T00:00:00+00:00", "token": "old"}))
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_a_held_lock_excludes_and_names_its_holder(tmp_path):
    path = tmp_path / "k.lock"
    p = _holder_process(path, seconds=3)
    holder = read_holder(path)
    assert holder["host"] == HOST and holder["pid"] == p.pid
    with pytest.raises(TimeoutError, match=f"pid {p.pid}"):
        StageLock(path).acquire(timeout=0.3)
    p.join()
    with StageLock(path).acquire(timeout=5):  # released on exit
        assert read_holder(path)["pid"] == os.getpid()
    assert not path.exists()


def test_a_dead_holder_on_this_host_is_broken_at_once(tmp_path, caplog):
    path = tmp_path / "k.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_lock(path, HOST, dead.pid, age_s=0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="drlab"), StageLock(path, stale_after=600).acquire(timeout=5):
        assert read_holder(path)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 3
    assert f"process {dead.pid} on this host is gone" in caplog.text


def test_another_hosts_lock_is_broken_only_after_its_heartbeat_stops(tmp_path, caplog):
    path = tmp_path / "k.lock"
    _fake_lock(path, "node-7", 12345, age_s=5)  # heartbeat 5 s ago: live
    with pytest.raises(TimeoutError, match="node-7"):
        StageLock(path, stale_after=60).acquire(timeout=0.3)
    _fake_lock(path, "node-7", 12345, age_s=3600)  # an hour without heartbeat: a dead host
    with caplog.at_level(logging.WARNING, logger="drlab"), StageLock(path, stale_after=60).acquire(timeout=5):
        assert read_holder(path)["host"] == HOST
    assert "no heartbeat for" in caplog.text and "node-7" in caplog.text


def test_the_heartbeat_keeps_a_long_held_lock_from_going_stale(tmp_path):
    path = tmp_path / "k.lock"
    p = _holder_process(path, seconds=2.5, stale_after=0.6)  # holds 4x longer than stale_after
    time.sleep(1.0)
    with pytest.raises(TimeoutError):
        StageLock(path, stale_after=0.6).acquire(timeout=0.8)
    p.join()


def test_release_never_removes_a_lock_someone_else_took(tmp_path, caplog):
    path = tmp_path / "k.lock"
    lock = StageLock(path, stale_after=600).acquire()
    _fake_lock(path, "node-9", 1, age_s=0)  # as if broken and re-taken while this process stalled
    with caplog.at_level(logging.ERROR, logger="drlab"):
        lock.release()
    assert read_holder(path)["host"] == "node-9"
    assert "was broken while this process held it" in caplog.text


# --------------------------------------------------------------------------- N processes, one cache


def _counting_run(ctx):
    time.sleep(float(ctx.runtime.sleep))
    (ctx.out / "half.txt").write_text("written before the stage finished")
    with open(ctx.runtime.counter, "a") as fh:
        fh.write(f"{ctx.stage} {ctx.key}\n")
    (ctx.out / "result.txt").write_text(ctx.key)
    return {}


STAGES = {
    "bm25": Stage("bm25", "1", ("pipeline.bm25",), _counting_run),
    "eval": Stage("eval", "1", ("pipeline.eval",), _counting_run),
}


def _cfg(root: Path, k1: float, sleep: float):
    return OmegaConf.create({
        "model": {"name": "fake", "chain": ["bm25", "eval"]},
        "pipeline": {"bm25": {"k1": k1}, "eval": {"metrics": ["ndcg@10"]}},
        "runtime": {"counter": str(root / "counter.txt"), "sleep": sleep, "lock_stale_s": 600},
    })


def _worker(root: str, k1: float, sleep: float, barrier) -> None:
    root_p = Path(root)
    cfg = _cfg(root_p, k1, sleep)
    if barrier is not None:
        barrier.wait(timeout=60)
    items = plan(cfg, STAGES, "all", [], root_p / "cache")
    execute(cfg, STAGES, items, root_p / "cache", root_p / "locks")


def _published(root: Path) -> list[Path]:
    return [d for s in (root / "cache").iterdir() for d in s.iterdir()]


def test_n_processes_on_one_cache_compute_each_stage_once(tmp_path):
    """Six processes, two configs: bm25 differs between them (k1), eval is the same stage for all."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), k1, 0.5, barrier)) for k1 in (0.9, 1.2) * 3]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * 6
    runs = (tmp_path / "counter.txt").read_text().splitlines()
    assert len(runs) == len(set(runs)) == 3, f"bm25 x 2 keys + eval x 1 key, each once: {runs}"
    finals = _published(tmp_path)
    assert len(finals) == 3 and all((d / "manifest.json").exists() and "." not in d.name for d in finals)
    assert not list((tmp_path / "locks").glob("*.lock")), "every lock released"


@pytest.mark.slow
def test_a_job_killed_mid_stage_leaves_a_lock_the_next_job_breaks(tmp_path, caplog):
    ctx = multiprocessing.get_context("spawn")
    victim = ctx.Process(target=_worker, args=(str(tmp_path), 0.9, 30.0, None))
    victim.start()
    locks = tmp_path / "locks"
    deadline = time.monotonic() + 60
    while not (locks.exists() and list(locks.glob("*.lock"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    while not list((tmp_path / "cache").glob("*/*.partial/half.txt")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    assert list(locks.glob("*.lock")), "a SIGKILLed holder leaves its lock file behind"
    with caplog.at_level(logging.WARNING, logger="drlab"):
        _worker(str(tmp_path), 0.9, 0.0, None)
    assert f"process {victim.pid} on this host is gone" in caplog.text
    finals = [d for d in _published(tmp_path) if "." not in d.name]
    assert len(finals) == 2 and all((d / "manifest.json").exists() for d in finals)
    assert not list((tmp_path / "cache").glob("*/*.partial")), "the killed job's half-written dir is never published"
