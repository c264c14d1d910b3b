"""Executor invariants, checked with fake stages (no retrieval code involved)."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from pipelines import executor
from pipelines import keys as keys_mod
from pipelines.executor import ConfigError, Stage, execute, plan

CHAIN = ["bm25", "pretrain", "retriever1", "eval"]  # a sub-sequence of STAGE_ORDER
READS = {
    "bm25": ("data", "pipeline.bm25"),
    "pretrain": ("pipeline.pretrain",),  # does not read the data
    "retriever1": ("data", "pipeline.retriever1"),
    "eval": ("data", "model", "pipeline.eval"),
}
# each fake stage consumes every stage before it (the real stages declare narrower uses)
USES = {"bm25": (), "pretrain": ("bm25",), "retriever1": ("bm25", "pretrain"), "eval": ("bm25", "pretrain", "retriever1")}


def make_data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "hello world"}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "hello"}\n')
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    return root


def fake_cfg(data_path: Path, chain=CHAIN, **dotted) -> DictConfig:
    cfg = OmegaConf.create(
        {
            "model": {"name": "fake", "chain": list(chain)},
            "data": {"name": "toy", "path": str(data_path), "eval_split": "test"},
            "pipeline": {
                "pretrain": {"steps": 10},
                "bm25": {"k1": 0.9, "b": 0.4},
                "retriever1": {"lr": 1e-5, "enabled": True},
                "eval": {"metrics": ["ndcg@10"]},
            },
            "runtime": {"device": "cpu", "threads": 1, "encode_batch_size": 8},
        }
    )
    for k, v in dotted.items():
        OmegaConf.update(cfg, k.replace("__", "."), v, force_add=True)
    return cfg


class Fakes:
    """Fake stages that write ``<name>.txt`` into ctx.out and count their calls."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.hooks: dict[str, object] = {}
        self.versions: dict[str, str] = {}

    def stages(self) -> dict[str, Stage]:
        return {n: Stage(n, self.versions.get(n, "1"), READS[n], self._runner(n), uses=USES[n]) for n in CHAIN}

    def _runner(self, name):
        def run(ctx):
            self.calls[name] += 1
            (ctx.out / f"{name}.txt").write_text(f"{name} {ctx.key} call {self.calls[name]}\n")
            for up, d in ctx.upstream.items():  # upstream dirs are finished ones
                assert (d / "manifest.json").exists(), f"{name} got unfinished upstream {up}"
            hook = self.hooks.get(name)
            if hook is not None:
                hook(ctx)
            return {"score": 0.25, "call": float(self.calls[name])}

        return run


@pytest.fixture
def env(tmp_path):
    data = make_data(tmp_path / "data" / "toy")
    return {
        "data": data,
        "cache": tmp_path / "out" / "cache",
        "locks": tmp_path / "out" / "locks",
        "fakes": Fakes(),
    }


def keys(items) -> dict[str, str | None]:
    return {i.stage: i.key for i in items}


def statuses(items) -> dict[str, str]:
    return {i.stage: i.status for i in items}


def do_plan(env, cfg, target="all", force=()):
    return plan(cfg, env["fakes"].stages(), target, list(force), env["cache"])


def do_run(env, cfg, target="all", force=()):
    items = do_plan(env, cfg, target, force)
    execute(cfg, env["fakes"].stages(), items, env["cache"], env["locks"])
    return items


# --------------------------------------------------------------------------- (a) caching


def test_second_plan_is_cached_and_runs_nothing(env):
    cfg = fake_cfg(env["data"])
    first = do_run(env, cfg)
    assert statuses(first) == {n: "ran" for n in CHAIN}
    assert env["fakes"].calls == Counter({n: 1 for n in CHAIN})
    for i in first:
        assert (i.dir / "manifest.json").exists()
        assert (i.dir / f"{i.stage}.txt").exists()
        assert i.dir == env["cache"] / i.stage / i.key

    second = do_plan(env, cfg)
    assert statuses(second) == {n: "cached" for n in CHAIN}
    assert keys(second) == keys(first)
    execute(cfg, env["fakes"].stages(), second, env["cache"], env["locks"])
    assert env["fakes"].calls == Counter({n: 1 for n in CHAIN}), "cached stages must not run"
    assert all(i.metrics == {"score": 0.25, "call": 1.0} for i in second), "metrics come from the manifest"


def test_target_runs_only_upstream_closure(env):
    cfg = fake_cfg(env["data"])
    items = do_run(env, cfg, target="pretrain")
    assert [i.stage for i in items] == ["bm25", "pretrain"]
    assert set(env["fakes"].calls) == {"bm25", "pretrain"}
    assert not (env["cache"] / "eval").exists() and not (env["cache"] / "retriever1").exists()


def test_key_format(env):
    items = do_plan(env, fake_cfg(env["data"]))
    for i in items:
        name, version, digest = i.key.split("-")
        assert name == i.stage and version == "v1" and len(digest) == 12
        int(digest, 16)


# --------------------------------------------------------------------------- (b, c) keys


def test_upstream_change_changes_own_and_downstream_keys_only(env):
    base = keys(do_plan(env, fake_cfg(env["data"])))
    changed = keys(do_plan(env, fake_cfg(env["data"], pipeline__pretrain__steps=20)))
    assert changed["bm25"] == base["bm25"], "a stage before the changed one keeps its key"
    for s in ("pretrain", "retriever1", "eval"):
        assert changed[s] != base[s], f"{s} key must change when pretrain config changes"
    first = keys(do_plan(env, fake_cfg(env["data"], pipeline__bm25__k1=1.2)))
    assert all(first[s] != base[s] for s in CHAIN), "changing the first stage changes every key"


def test_downstream_change_leaves_upstream_keys(env):
    base = keys(do_plan(env, fake_cfg(env["data"])))
    r1 = keys(do_plan(env, fake_cfg(env["data"], pipeline__retriever1__lr=2e-5)))
    assert (r1["pretrain"], r1["bm25"]) == (base["pretrain"], base["bm25"])
    assert r1["retriever1"] != base["retriever1"] and r1["eval"] != base["eval"]

    ev = keys(do_plan(env, fake_cfg(env["data"], pipeline__eval__metrics=["ndcg@10", "mrr@10"])))
    assert {s: ev[s] for s in CHAIN[:-1]} == {s: base[s] for s in CHAIN[:-1]}
    assert ev["eval"] != base["eval"]


def test_unread_config_does_not_change_keys(env):
    base = keys(do_plan(env, fake_cfg(env["data"])))
    # a section nobody reads
    other = keys(do_plan(env, fake_cfg(env["data"], pipeline__rerank__depth=50)))
    assert other == base


def test_runtime_change_keeps_all_keys(env):
    cfg = fake_cfg(env["data"])
    first = do_run(env, cfg)
    cfg2 = fake_cfg(env["data"], runtime__device="cuda:1", runtime__threads=16, runtime__encode_batch_size=512)
    second = do_plan(env, cfg2)
    assert keys(second) == keys(first)
    assert statuses(second) == {n: "cached" for n in CHAIN}


def test_version_bump_changes_key(env):
    cfg = fake_cfg(env["data"])
    base = keys(do_plan(env, cfg))
    env["fakes"].versions["bm25"] = "2"
    bumped = keys(do_plan(env, cfg))
    assert all(bumped[s] != base[s] for s in CHAIN)
    assert bumped["bm25"].startswith("bm25-v2-")
    env["fakes"].versions = {"retriever1": "7"}
    bumped = keys(do_plan(env, cfg))
    assert (bumped["bm25"], bumped["pretrain"]) == (base["bm25"], base["pretrain"])
    assert bumped["retriever1"].startswith("retriever1-v7-") and bumped["eval"] != base["eval"]


# --------------------------------------------------------------------------- (d) failures


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failing_stage_leaves_nothing_and_is_recomputed(env, exc):
    cfg = fake_cfg(env["data"])
    fakes = env["fakes"]

    def fail_once(ctx):
        (ctx.out / "half-written.bin").write_bytes(b"x" * 100)
        if fakes.calls["retriever1"] == 1:
            raise exc

    fakes.hooks["retriever1"] = fail_once
    items = do_plan(env, cfg)
    with pytest.raises(type(exc)):
        execute(cfg, fakes.stages(), items, env["cache"], env["locks"])
    by = {i.stage: i for i in items}
    r1 = by["retriever1"]
    assert (by["pretrain"].dir / "manifest.json").exists(), "stages before the failure stay cached"
    assert not r1.dir.exists(), "no final dir for a failed stage"
    assert not r1.dir.with_name(r1.key + ".partial").exists()
    assert not list(env["cache"].rglob("*.partial"))
    assert not (env["cache"] / "retriever1").exists() or not any(
        (p / "manifest.json").exists() for p in (env["cache"] / "retriever1").iterdir()
    )
    assert fakes.calls["eval"] == 0, "nothing after the failure runs"

    again = do_plan(env, cfg)
    assert statuses(again) == {"pretrain": "cached", "bm25": "cached", "retriever1": "run", "eval": "run"}
    execute(cfg, fakes.stages(), again, env["cache"], env["locks"])
    assert fakes.calls["retriever1"] == 2 and fakes.calls["eval"] == 1
    assert (r1.dir / "manifest.json").exists()


# --------------------------------------------------------------------------- (e, f) force, targets


def test_force_reruns_stage(env):
    cfg = fake_cfg(env["data"])
    first = do_run(env, cfg)
    forced = do_plan(env, cfg, force=["bm25"])
    assert statuses(forced) == {"bm25": "force", "pretrain": "cached", "retriever1": "cached", "eval": "cached"}
    execute(cfg, env["fakes"].stages(), forced, env["cache"], env["locks"])
    assert env["fakes"].calls["bm25"] == 2
    assert env["fakes"].calls["pretrain"] == 1 and env["fakes"].calls["eval"] == 1
    assert keys(forced) == keys(first)
    d = {i.stage: i for i in forced}["bm25"].dir
    assert (d / "manifest.json").exists()
    assert "call 2" in (d / "bm25.txt").read_text(), "the forced result replaced the old one"
    assert json.loads((d / "manifest.json").read_text())["metrics"]["call"] == 2.0
    assert not list(d.parent.glob("*.old-*")) and not list(d.parent.glob("*.partial"))


def test_force_all(env):
    cfg = fake_cfg(env["data"])
    do_run(env, cfg)
    items = do_run(env, cfg, force=["all"])
    assert statuses(items) == {n: "ran" for n in CHAIN}
    assert env["fakes"].calls == Counter({n: 2 for n in CHAIN})


def test_force_unknown_stage_lists_choices(env):
    with pytest.raises(ConfigError) as e:
        do_plan(env, fake_cfg(env["data"]), force=["bm52"])
    msg = str(e.value)
    assert "bm52" in msg
    for s in ["all", *CHAIN]:
        assert s in msg


def test_unknown_target_lists_choices(env):
    with pytest.raises(ConfigError) as e:
        do_plan(env, fake_cfg(env["data"]), target="retriever2")
    msg = str(e.value)
    assert "retriever2" in msg and "Valid choices" in msg
    for s in ["all", *CHAIN]:
        assert s in msg


def test_chain_out_of_order_or_unknown_rejected(env):
    with pytest.raises(ConfigError, match="order"):
        do_plan(env, fake_cfg(env["data"], chain=["pretrain", "bm25"]))
    with pytest.raises(ConfigError, match="valid stages"):
        do_plan(env, fake_cfg(env["data"], chain=["bm25", "bogus"]))


# --------------------------------------------------------------------------- (g) disabled


def test_disabled_stage_is_skipped(env):
    cfg = fake_cfg(env["data"], pipeline__retriever1__enabled=False)
    items = do_run(env, cfg)
    st = statuses(items)
    assert st["retriever1"] == "disabled"
    assert {i.stage: i for i in items}["retriever1"].key is None
    assert st["pretrain"] == st["bm25"] == st["eval"] == "ran"
    assert env["fakes"].calls["retriever1"] == 0
    assert not (env["cache"] / "retriever1").exists()
    printed = executor.format_plan(do_plan(env, cfg))
    assert [ln.split()[:2] for ln in printed.splitlines()[1:]] == [
        ["bm25", "cached"], ["pretrain", "cached"], ["retriever1", "disabled"], ["eval", "cached"]
    ]


def test_disabled_target_is_an_error(env):
    with pytest.raises(ConfigError, match="disabled"):
        do_plan(env, fake_cfg(env["data"], pipeline__retriever1__enabled=False), target="retriever1")


# --------------------------------------------------------------------------- (h) manifest


def test_manifest_contents(env):
    cfg = fake_cfg(env["data"])

    def slow(ctx):
        (ctx.out / "sub").mkdir()
        (ctx.out / "sub" / "vectors.bin").write_bytes(b"\0" * 1234)
        time.sleep(0.05)

    env["fakes"].hooks["retriever1"] = slow
    items = do_run(env, cfg)
    by = {i.stage: i for i in items}
    m = json.loads((by["retriever1"].dir / "manifest.json").read_text())
    for field in ("stage", "version", "key", "upstream", "reads", "metrics", "files", "git", "packages",
                  "started", "seconds", "command"):  # fmt: skip
        assert field in m, f"manifest lacks {field}"
    assert m["stage"] == "retriever1" and m["version"] == "1" and m["key"] == by["retriever1"].key
    assert m["upstream"] == {"bm25": by["bm25"].key, "pretrain": by["pretrain"].key}
    assert m["reads"]["pipeline.retriever1"] == {"lr": 1e-5, "enabled": True}
    assert "path" not in m["reads"]["data"] and "fingerprint" in m["reads"]["data"], "data is hashed by content"
    assert m["metrics"] == {"score": 0.25, "call": 1.0}
    d = by["retriever1"].dir
    assert {k: v["size"] for k, v in m["files"].items()} == {
        "retriever1.txt": (d / "retriever1.txt").stat().st_size,
        "sub/vectors.bin": 1234,
    }
    assert set(m["git"]) >= {"commit", "dirty"}
    assert "omegaconf" not in m["packages"] and isinstance(m["packages"], dict)
    assert m["packages"], "package versions recorded"
    datetime.fromisoformat(m["started"])
    assert m["seconds"] >= 0.05
    assert isinstance(m["command"], list)
    em = json.loads((by["eval"].dir / "manifest.json").read_text())
    assert em["upstream"] == {s: by[s].key for s in ("bm25", "pretrain", "retriever1")}
    assert json.loads((by["bm25"].dir / "manifest.json").read_text())["upstream"] == {}


def test_each_stage_reports_its_own_peak_rss(env):
    """A stage that holds 400 MB reports a peak above that; the stage after it, which allocates
    nothing, reports a peak well below it (the high-water mark is reset per stage on Linux)."""
    import numpy as np

    from pipelines.executor import reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the peak RSS")
    cfg = fake_cfg(env["data"])

    def big(ctx):
        a = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
        assert a.sum() > 0

    env["fakes"].hooks["retriever1"] = big
    items = do_run(env, cfg)
    by = {i.stage: i for i in items}
    m = json.loads((by["retriever1"].dir / "manifest.json").read_text())
    assert m["peak_rss_since"] == "stage start"
    assert m["peak_rss_mb"] == by["retriever1"].peak_rss_mb
    assert by["retriever1"].peak_rss_mb > 400
    assert by["eval"].peak_rss_mb < by["retriever1"].peak_rss_mb - 300


# --------------------------------------------------------------------------- (i) stage view


def test_stage_sees_only_declared_reads(env):
    cfg = fake_cfg(env["data"])
    seen = {}

    def probe_bm25(ctx):
        seen["bm25_top"] = set(ctx.cfg.keys())
        assert ctx.cfg.pipeline.bm25.k1 == 0.9
        assert ctx.cfg.data.path == str(env["data"])
        assert ctx.runtime.threads == 1 and ctx.cfg.runtime.device == "cpu"
        with pytest.raises((ConfigAttributeError, ConfigKeyError)):
            ctx.cfg.pipeline.pretrain  # noqa: B018  another stage's section
        with pytest.raises((ConfigAttributeError, ConfigKeyError)):
            ctx.cfg.model  # noqa: B018  not declared
        with pytest.raises((ConfigAttributeError, ConfigKeyError)):
            ctx.cfg["pipeline"]["retriever1"]
        seen["bm25_ok"] = True

    def probe_pretrain(ctx):
        seen["pretrain_top"] = set(ctx.cfg.keys())
        with pytest.raises((ConfigAttributeError, ConfigKeyError)):
            ctx.cfg.data  # noqa: B018
        seen["pretrain_ok"] = True

    env["fakes"].hooks.update(bm25=probe_bm25, pretrain=probe_pretrain)
    do_run(env, cfg, target="pretrain")
    assert seen["bm25_ok"] and seen["pretrain_ok"]
    assert seen["bm25_top"] == {"data", "pipeline", "runtime", "gates"}  # runtime, gates: shown, never hashed
    assert seen["pretrain_top"] == {"pipeline", "runtime", "gates"}


def test_missing_read_is_a_config_error(env):
    cfg = fake_cfg(env["data"])
    del cfg.pipeline["bm25"]
    with pytest.raises(ConfigError, match=r"pipeline.bm25.*read by stage 'bm25'.*drop 'bm25' from model.chain"):
        do_plan(env, cfg)


# --------------------------------------------------------------------------- (k) leftovers


def test_leftover_partial_is_not_finished_and_is_replaced(env):
    cfg = fake_cfg(env["data"])
    key = keys(do_plan(env, cfg))["bm25"]
    partial = env["cache"] / "bm25" / f"{key}.partial"
    partial.mkdir(parents=True)
    (partial / "stale.txt").write_text("from a killed run")
    (partial / "manifest.json").write_text("{}")  # even a manifest inside .partial does not count
    items = do_plan(env, cfg)
    assert statuses(items)["bm25"] == "run"
    execute(cfg, env["fakes"].stages(), items, env["cache"], env["locks"])
    final = env["cache"] / "bm25" / key
    assert env["fakes"].calls["bm25"] == 1
    assert not partial.exists()
    assert not (final / "stale.txt").exists()
    assert json.loads((final / "manifest.json").read_text())["key"] == key


def test_final_dir_without_manifest_is_not_finished(env):
    cfg = fake_cfg(env["data"])
    key = keys(do_plan(env, cfg))["bm25"]
    final = env["cache"] / "bm25" / key
    final.mkdir(parents=True)
    (final / "bm25.txt").write_text("incomplete")
    items = do_plan(env, cfg)
    assert statuses(items)["bm25"] == "run"
    execute(cfg, env["fakes"].stages(), items, env["cache"], env["locks"])
    assert (final / "manifest.json").exists()
    assert "incomplete" not in (final / "bm25.txt").read_text()
    assert not list(final.parent.glob("*.old-*"))


def test_work_dir_is_resumed_then_removed(env):
    cfg = fake_cfg(env["data"])
    key = keys(do_plan(env, cfg))["pretrain"]
    work = env["cache"] / "pretrain" / f"{key}.work"
    work.mkdir(parents=True)
    (work / "checkpoint.pt").write_text("step 5")
    seen = {}
    env["fakes"].hooks["pretrain"] = lambda ctx: seen.update(ckpt=(ctx.work / "checkpoint.pt").read_text())
    do_run(env, cfg, target="pretrain")
    assert seen["ckpt"] == "step 5", "the stage is handed its work dir to resume from"
    assert not work.exists(), "the work dir is removed once the stage finished"


def test_work_dir_survives_failure(env):
    cfg = fake_cfg(env["data"])

    def crash_after_checkpoint(ctx):
        (ctx.work / "checkpoint.pt").write_text("step 3")
        raise RuntimeError("killed")

    env["fakes"].hooks["pretrain"] = crash_after_checkpoint
    items = do_plan(env, cfg, target="pretrain")
    with pytest.raises(RuntimeError, match="killed"):
        execute(cfg, env["fakes"].stages(), items, env["cache"], env["locks"])
    pre = {i.stage: i for i in items}["pretrain"]
    work = pre.dir.with_name(pre.key + ".work")
    assert (work / "checkpoint.pt").read_text() == "step 3"
    assert not (pre.dir / "manifest.json").exists()


# --------------------------------------------------------------------------- (l) data fingerprint


def test_data_content_changes_key_but_location_does_not(env, tmp_path):
    chain = ["pretrain", "retriever1", "eval"]  # the first stage does not read data
    base = keys(do_plan(env, fake_cfg(env["data"], chain=chain)))

    # same bytes elsewhere: same keys (no machine path in the key)
    moved = make_data(tmp_path / "elsewhere" / "deeper" / "toy")
    assert keys(do_plan(env, fake_cfg(moved, chain=chain))) == base

    # a README next to the data is not data
    (env["data"] / "PROVENANCE.md").write_text("where this came from\n")
    assert keys(do_plan(env, fake_cfg(env["data"], chain=chain))) == base

    # one byte changed (same size) in place, in the same process
    corpus = env["data"] / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace("hello world", "hello worle"))
    changed = keys(do_plan(env, fake_cfg(env["data"], chain=chain)))
    assert changed["pretrain"] == base["pretrain"], "a stage that does not read data keeps its key"
    assert changed["retriever1"] != base["retriever1"], "a stage that reads data gets a new key"
    assert changed["eval"] != base["eval"]

    # and the moved copy still has the old keys
    assert keys(do_plan(env, fake_cfg(moved, chain=chain))) == base


def test_data_fingerprint_is_relative_and_content_based(tmp_path):
    a = make_data(tmp_path / "a" / "toy")
    b = make_data(tmp_path / "b" / "toy")
    fa, fb = keys_mod.data_fingerprint(a), keys_mod.data_fingerprint(b)
    assert fa == fb
    assert set(fa) == {"corpus.jsonl", "queries.jsonl", "qrels/test.tsv"}
    (b / "qrels" / "test.tsv").write_text("q1\td1\t2\n")
    assert keys_mod.data_fingerprint(b)["qrels/test.tsv"] != fa["qrels/test.tsv"]


# (m) concurrency: tests/test_locks.py (N processes on one cache, a job killed mid-stage)


# --------------------------------------------------------------------------- verified cache hits


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":  # cut at a line boundary, as a killed copy would
        path.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 1] if b"\n" in data[:-1] else b"")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flip":  # same size, one byte changed
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "empty", "delete"])
def test_a_damaged_artifact_is_detected_by_size_and_recomputed(env, how):
    cfg = fake_cfg(env["data"])
    first = {i.stage: i for i in do_run(env, cfg)}
    target = first["bm25"].dir / "bm25.txt"
    (first["bm25"].dir / "bm25.txt").write_text("line one\nline two\n" * 3)  # a multi-line artifact ...
    manifest = json.loads((first["bm25"].dir / "manifest.json").read_text())
    manifest["files"]["bm25.txt"] = {"size": target.stat().st_size, "blake2b": executor.file_hash(target)}
    (first["bm25"].dir / "manifest.json").write_text(json.dumps(manifest))  # ... recorded as written
    _damage(target, how)
    assert statuses(do_plan(env, cfg))["bm25"] == "damaged", "the plan (and a dry run) sees it"
    second = {i.stage: i for i in do_run(env, cfg)}
    assert second["bm25"].status == "ran" and env["fakes"].calls["bm25"] == 2
    assert list(env["cache"].joinpath("bm25").glob("*.damaged-*")), "the damaged dir is kept aside, not reused"
    assert (second["bm25"].dir / "bm25.txt").read_text().startswith("bm25 ")


def test_same_size_corruption_is_caught_with_verify_and_strict_stops(env):
    cfg = fake_cfg(env["data"])
    first = {i.stage: i for i in do_run(env, cfg)}
    _damage(first["retriever1"].dir / "retriever1.txt", "flip")
    assert statuses(do_plan(env, cfg))["retriever1"] == "cached", "sizes match: only the hash can tell"
    do_run(env, cfg)
    assert env["fakes"].calls["retriever1"] == 1, "without verify, a same-size change goes unseen"
    strict = fake_cfg(env["data"], verify=True, strict=True)
    with pytest.raises(executor.DamagedCacheError, match=r"(?s)retriever1\.txt: content differs.*force=\[retriever1\]"):
        do_run(env, strict)
    verified = fake_cfg(env["data"], verify=True)
    items = {i.stage: i for i in do_run(env, verified)}
    assert items["retriever1"].status == "ran" and items["bm25"].status == "cached"


def test_manifest_records_size_and_hash_of_every_artifact(env):
    items = {i.stage: i for i in do_run(env, fake_cfg(env["data"]))}
    d = items["eval"].dir
    files = json.loads((d / "manifest.json").read_text())["files"]
    assert files == {"eval.txt": {"size": (d / "eval.txt").stat().st_size, "blake2b": executor.file_hash(d / "eval.txt")}}


def test_cache_verify_and_gc_commands(env, tmp_path, capsys):
    from pipelines import cache as cache_cli

    out = env["cache"].parent
    items = {i.stage: i for i in do_run(env, fake_cfg(env["data"]))}
    assert cache_cli.main(["verify", "--outputs", str(out)]) == 0
    _damage(items["eval"].dir / "eval.txt", "flip")
    assert cache_cli.main(["verify", "--outputs", str(out), "--sizes-only"]) == 0
    assert cache_cli.main(["verify", "--outputs", str(out)]) == 1
    assert "eval.txt: content differs" in capsys.readouterr().out
    # a run summary references bm25 and pretrain; leftovers and the rest are listed, then removed
    (out / "runs" / "r1").mkdir(parents=True)
    (out / "runs" / "r1" / "summary.json").write_text(json.dumps({"stages": {
        s: {"dir": str(items[s].dir)} for s in ("bm25", "pretrain")}}))
    (items["eval"].dir.parent / f"{items['eval'].key}.partial").mkdir()
    (items["eval"].dir.parent / f"{items['eval'].key}.work").mkdir()
    assert cache_cli.main(["gc", "--outputs", str(out)]) == 0
    listed = capsys.readouterr().out
    assert ".partial" in listed and ".work" in listed and "unreferenced" in listed
    assert items["bm25"].key not in listed and items["pretrain"].key not in listed
    cache_cli.main(["gc", "--outputs", str(out), "--remove"])
    left = sorted(p.name for p in cache_cli.entries(out / "cache"))
    assert left == sorted([items["bm25"].key, items["pretrain"].key])
