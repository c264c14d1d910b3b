"""Every config group's `_target_` instantiates, every family's chain runs end to end on the tiny
fixtures (``debug=tiny``, a random 2-layer BERT), and a chain reaches eval on MS MARCO TSV and
DPR JSON data as well as BEIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    CONF_DIR,
    TINY_DOCS,
    TINY_QUERIES,
    TINY_TEST_QRELS,
    TINY_TRAIN_QRELS,
    compose,
    make_tiny_beir,
    make_tiny_bert,
    make_tiny_lm,
    tiny_llm_overrides,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

FAMILIES = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
LLM_FAMILIES = {f for f in FAMILIES if "/llm@model.llm" in (CONF_DIR / "model" / f"{f}.yaml").read_text()}
TEXTS = [f"{t} {x}" for _, t, x in TINY_DOCS] + [q for _, q in TINY_QUERIES]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), TEXTS, punctuation=True)


def targets(node, path=""):
    """Every (dotted path, node) with a ``_target_`` in a plain config tree."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            yield from targets(v, f"{path}.{k}" if path else k)


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("lm"))


def _weights(family: str, bert: Path, lm: Path) -> list[str]:
    """The tiny random weights for a family: its BERT checkpoint, or its LLM (the expansion families)."""
    if family in LLM_FAMILIES:
        return tiny_llm_overrides(lm)
    return [f"model.checkpoint={bert}"] if family != "bm25" else []


@pytest.mark.parametrize("family", FAMILIES)
def test_every_target_of_a_family_instantiates(tmp_path, bert, lm, family):
    cfg = compose([f"model={family}", *_weights(family, bert, lm)], tmp_path)
    tree = OmegaConf.to_container(cfg, resolve=True)
    found = dict(targets(tree))
    assert "pipeline.distill.loss" in found
    assert family == "bm25" or {"model.encoder", "model.teacher", "model.llm"} & set(found), found
    for path, _node in found.items():
        obj = instantiate(OmegaConf.select(cfg, path))
        assert obj is not None, path


@pytest.mark.parametrize("group, package", [("teacher", "model.teacher"), ("loss", "pipeline.distill.loss")])
def test_every_option_of_the_component_groups_instantiates(tmp_path, bert, group, package):
    for option in _group_options(group):
        cfg = compose(["model=simlm", f"model.checkpoint={bert}", f"{group}@{package}={option}"], tmp_path)
        obj = instantiate(OmegaConf.select(cfg, package))
        assert type(obj).__name__.lower().replace("_", "") != "dictconfig", option


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bm25"])
def test_every_family_chain_runs_end_to_end(tmp_path, bert, lm, family):
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    base = [f"model={family}", "data=beir", "data.name=tiny", "data.train_split=train", "debug=tiny",
            *_weights(family, bert, lm), "runtime.progress=false"]
    tree = OmegaConf.to_container(compose(base, tmp_path))["model"]
    small = (["model.encoder.doc_max_len=32"] if "encoder" in tree else []) \
        + (["model.teacher.dim=8", "model.teacher.doc_max_len=32"] if "dim" in tree.get("teacher", {}) else []) \
        + (["model.pretrain.queue_size=8"] if "queue_size" in tree.get("pretrain", {}) else []) \
        + (["model.pretrain.projection_dim=16"] if "projection_dim" in tree.get("pretrain", {}) else [])
    cfg = compose(base + small, tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    assert set(summary["stages"]) == set(cfg.model.chain)
    assert all(s["status"] == "ran" for s in summary["stages"].values())
    assert 0.0 <= summary["metrics"]["test/ndcg@10"] <= 1.0


def _write_msmarco(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "collection.tsv").write_text("".join(f"{d}\t{t}. {x}\n" for d, t, x in TINY_DOCS))
    q = dict(TINY_QUERIES)
    for _split, qrels, name in (("train", TINY_TRAIN_QRELS, "train"), ("dev", TINY_TEST_QRELS, "dev.small")):
        (root / f"queries.{name}.tsv").write_text("".join(f"{k}\t{q[k]}\n" for k in qrels))
        (root / f"qrels.{name}.tsv").write_text("".join(f"{k}\t0\t{d}\t{r}\n" for k, v in qrels.items()
                                                         for d, r in v.items()))


def _write_dpr(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "psgs_w100.tsv").write_text("id\ttext\ttitle\n" + "".join(f"{d}\t{x}\t{t}\n" for d, t, x in TINY_DOCS))
    q = dict(TINY_QUERIES)
    for split, qrels in (("train", TINY_TRAIN_QRELS), ("dev", TINY_TEST_QRELS)):
        items = [{"id": k, "question": q[k], "positive_ctxs": [{"passage_id": d} for d in v],
                  "hard_negative_ctxs": []} for k, v in qrels.items()]
        (root / f"biencoder-nq-{split}.json").write_text(json.dumps(items))


@pytest.mark.slow
@pytest.mark.parametrize("data, writer", [("msmarco-passage", _write_msmarco), ("nq", _write_dpr)])
def test_a_chain_reaches_eval_on_every_dataset_format(tmp_path, bert, data, writer):
    """The dpr chain (bm25 negatives, training, index, eval with its unseen subset) on MS MARCO TSV and DPR JSON."""
    from pipelines.runner import run_pipeline

    writer(tmp_path / "data" / data)
    cfg = compose(["model=dpr", f"data={data}", "debug=tiny", f"model.checkpoint={bert}", "runtime.progress=false",
                   "model.encoder.doc_max_len=32"], tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    assert list(summary["stages"]) == ["bm25", "retriever1", "index", "eval"]
    split = cfg.data.eval_split
    assert 0.0 <= summary["metrics"][f"{split}/ndcg@10"] <= 1.0
    assert f"{split}-unseen/ndcg@10" in summary["metrics"], "the unseen subset reads train qrels through the loader"
