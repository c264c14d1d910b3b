"""The reference registry (conf/reproductions.yaml): every entry composes, its metric is one its run
reports, every full-scale recipe dry-runs, and the README's table is the registry's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, TINY_DOCS, TINY_QUERIES, TINY_TEST_QRELS, compose, make_tiny_beir
from hydra.errors import HydraException

from scripts.verify import command_of, load_registry, readme_table

ENTRIES = load_registry()
FULL = [e for e in ENTRIES if e["cost"] in ("gpu-hours", "cluster")]


def _compose(e: dict, tmp_path: Path):
    return compose([a.replace("'", "") if "prefix" not in a else a for a in command_of(e)], tmp_path)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_every_entry_composes_and_reports_its_metric(entry, tmp_path):
    try:
        cfg = _compose(entry, tmp_path)
    except HydraException as err:
        pytest.fail(f"{entry['name']}: {err}")
    assert cfg.data.name == entry["data"]
    computed = ["spearman", "pearson"] if cfg.data.format == "sts" else list(cfg.pipeline.eval.metrics)
    assert entry["metric"] in computed, f"{entry['name']}: eval does not compute {entry['metric']}"
    key = entry.get("key") or f"{entry['split']}/{entry['metric']}"
    assert key.split("/")[-2] == cfg.data.eval_split, f"{entry['name']}: {key} is not on data.eval_split"
    assert entry["provenance"]["source"] and entry["provenance"].get("ref")
    if entry.get("measured_in") == "fp32":  # rows measured before precision: auto reproduce in fp32 + torch
        own = "pipeline.retriever1.precision=bf16" in entry["command"]  # ... unless the row itself said bf16
        assert (cfg.precision, cfg.backend, cfg.pipeline.retriever1.precision) == ("fp32", "torch",
                                                                                   "bf16" if own else "fp32")


def test_an_entrys_own_setting_wins_over_the_fp32_pins():
    """The pins stand for the defaults of 2026-11-30; a setting the row's command makes is what was measured."""
    e = {"measured_in": "fp32", "command": ["model=simlm", "pipeline.retriever1.precision=bf16"]}
    got = command_of(e)
    assert "pipeline.retriever1.precision=bf16" in got and "pipeline.retriever1.precision=fp32" not in got
    assert {"precision=fp32", "backend=torch", "pipeline.retriever2.precision=fp32"} <= set(got)
    assert command_of({"command": ["model=simlm"]}) == ["model=simlm"]


def _placeholder(data_dir: Path, name: str) -> None:
    """A tiny stand-in in the dataset's own format, so that a full-scale recipe can be planned here."""
    root = data_dir / name
    q = dict(TINY_QUERIES)
    if name == "msmarco-passage":
        root.mkdir(parents=True)
        (root / "collection.tsv").write_text("".join(f"{d}\t{x}\n" for d, _, x in TINY_DOCS))
        for split, qrels in (("train", {"q5": {"d10": 1}}), ("dev.small", TINY_TEST_QRELS)):
            (root / f"queries.{split}.tsv").write_text("".join(f"{k}\t{q[k]}\n" for k in qrels))
            (root / f"qrels.{split}.tsv").write_text("".join(f"{k}\t0\t{d}\t1\n" for k, v in qrels.items() for d in v))
    elif name == "nq":
        root.mkdir(parents=True)
        (root / "psgs_w100.tsv").write_text("id\ttext\ttitle\n" + "".join(f"{d}\t{x}\t{t}\n" for d, t, x in TINY_DOCS))
        for split in ("train", "dev"):
            items = [{"question": q[k], "positive_ctxs": [{"passage_id": d} for d in v]} for k, v in TINY_TEST_QRELS.items()]
            (root / f"biencoder-nq-{split}.json").write_text(json.dumps(items))
    else:
        make_tiny_beir(root)


@pytest.mark.parametrize("entry", FULL, ids=[e["name"] for e in FULL])
def test_every_full_scale_recipe_dry_runs(entry, tmp_path):
    from pipelines.runner import run_pipeline

    _placeholder(tmp_path / "data", entry["data"])
    cfg = compose([*command_of(entry), "dry_run=true"], tmp_path)
    plan = run_pipeline(cfg, tmp_path / "run")["plan"]
    assert [p["stage"] for p in plan if p["status"] != "disabled"] == [s for s in cfg.model.chain
                                                                          if cfg.pipeline[s].enabled]
    assert not (tmp_path / "outputs" / "cache").exists()


def test_the_readme_table_is_the_registry():
    text = (REPO / "README.md").read_text()
    block = readme_table(ENTRIES)
    first, last = block.splitlines()[0], block.splitlines()[-1]
    assert first in text and last in text, "README.md lacks the registry block: python -m scripts.verify --readme"
    current = text[text.index(first): text.index(last) + len(last)]
    assert current == block, "README.md's registry table differs from conf/reproductions.yaml: " \
                             "paste the output of python -m scripts.verify --readme"


def test_verify_passes_fails_and_skips(tmp_path, tiny_beir, capsys, monkeypatch):
    """The runner end to end on a tiny registry: a row within its tolerance passes, one outside it fails
    (exit 1), one whose weights are absent is skipped with the reason. (On SciFact, --override
    pipeline.bm25.k1=1.2 fails bm25-flat-scifact: the closing note of issue 15.)"""
    import scripts.verify as v

    monkeypatch.setattr(v, "load_registry", lambda: [
        {"name": "bm25-tiny", "command": ["model=bm25", "data=beir", "data.name=tiny", "debug=tiny"], "data": "tiny",
         "split": "test", "metric": "ndcg@10", "expected": 1.0, "tolerance": 0.0001, "cost": "cpu-minutes",
         "provenance": {"source": "test", "ref": "tiny"}},
        {"name": "needs-gpu-weights", "command": ["model=pretrained"], "data": "tiny", "split": "test", "metric": "ndcg@10",
         "expected": 0.5, "tolerance": 0.01, "cost": "cpu-minutes", "needs": ["weights:no-such/model"],
         "provenance": {"source": "test", "ref": "x"}},
    ])
    args = ["--quick", "--outputs", str(tmp_path / "out"), "--data-dir", str(tiny_beir.parent)]
    monkeypatch.setenv("DRLAB_DATA_DIR", str(tiny_beir.parent))
    assert v.main(args) == 0
    out = capsys.readouterr().out
    assert "| bm25-tiny | ndcg@10 | 1.0000 ± 0.0001 | 1.0000 | +0.0000 | pass |" in out
    assert "skipped (needs weights no-such/model" in out
    entries = v.load_registry()
    entries[0]["expected"] = 0.9
    monkeypatch.setattr(v, "load_registry", lambda: entries)
    assert v.main(args) == 1
    assert "| bm25-tiny | ndcg@10 | 0.9000 ± 0.0001 | 1.0000 | +0.1000 | fail |" in capsys.readouterr().out
    written = (tmp_path / "out" / "tables" / "verify-quick.md").read_text()
    assert "| bm25-tiny | ndcg@10 | 0.9000 ± 0.0001 | 1.0000 | +0.1000 | fail |" in written
    env = next(line for line in written.splitlines() if line.startswith("Environment: commit "))
    assert "torch " in env and "transformers " in env  # the versions the table was measured with
