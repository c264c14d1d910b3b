"""STS data and evaluation (retrievers/sts.py): the file format and its errors, the SentEval scores
(per subset, mean, weighted mean, pooled), parity with sentence-transformers' EmbeddingSimilarityEvaluator,
and STS data in a chain: only pretrain and eval apply, and STS datasets that pre-train on the same
sentences share one pretrain stage."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF_DIR, REPO, compose, make_tiny_bert
from omegaconf import OmegaConf
from scipy.stats import pearsonr, spearmanr

from retrievers.data import DataError
from retrievers.errors import ConfigError
from retrievers.sts import read_pairs, score_set, text_sentences

PAIRS = [
    ("a man is playing a guitar", "a man plays the guitar", 4.8),
    ("a woman is slicing an onion", "a woman cuts an onion", 4.2),
    ("a dog runs in the park", "a cat sleeps on the sofa", 0.6),
    ("the market fell sharply today", "stocks dropped today", 3.9),
    ("a child is reading a book", "a man is playing a guitar", 0.2),
    ("two men are cooking rice", "a woman is slicing an onion", 1.1),
    ("the sun rises in the east", "the sun sets in the west", 1.8),
    ("a bird sings on a branch", "a bird is singing in a tree", 4.5),
]


def write_sts(path: Path, pairs=PAIRS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
    return path


@pytest.fixture
def tiny_sts(tmp_path):
    """<tmp>/data/sts/{tiny/{train,test}.tsv, other/test.tsv}: two sets, like ../shared/data/sts."""
    root = tmp_path / "data" / "sts"
    write_sts(root / "tiny" / "train.tsv", PAIRS[:6])
    write_sts(root / "tiny" / "test.tsv")
    write_sts(root / "other" / "test.tsv", PAIRS[::-1])
    return root


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), [f"{a} {b}" for a, b, _ in PAIRS])


def sts_overrides(root: Path, *extra: str) -> list[str]:
    return ["data=stsb", "data.name=tiny", "data.sets=[tiny]", f"data.text.path={root / 'tiny'}",
            "runtime.progress=false", *extra]


# ----------------------------------------------------------------------------- the file format


@pytest.mark.parametrize("body, match", [
    ("s1\ts2\tscore\na\tb\t1\n", ":1: header"),
    ("sentence1\tsentence2\tscore\na\tb\tgood\n", ":2: score 'good' is not a number"),
    ("sentence1\tsentence2\tscore\na\tb\t1\nc\t2\n", ":3: 2 tab-separated fields"),
    ("sentence1\tsentence2\tscore\na\t \t1\n", ":2: an empty sentence"),
    ("sentence1\tsentence2\tscore\n", "no sentence pairs"),
])
def test_a_malformed_sts_file_names_file_and_line(tmp_path, body, match):
    f = tmp_path / "test.tsv"
    f.write_text(body)
    with pytest.raises(DataError, match=match) as e:
        read_pairs(f)
    assert str(f) in str(e.value)


def test_pre_training_text_is_both_sentences_of_every_pair_without_scores(tmp_path):
    write_sts(tmp_path / "train.tsv", PAIRS[:2])
    assert text_sentences({"path": str(tmp_path), "split": "train"}) == [PAIRS[0][0], PAIRS[0][1], PAIRS[1][0],
                                                                           PAIRS[1][1]]


# ----------------------------------------------------------------------------- the scores


def test_scores_per_subset_mean_weighted_mean_and_pooled():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 10)
    pred = gold + rng.normal(0, 2, 10)
    r = score_set(pred, gold, {"a": [2, 4], "b": [5, 11]})  # header = line 1: pairs 0-2 and 3-9
    assert r["spearman"] == pytest.approx(spearmanr(pred, gold)[0])
    assert r["pearson"] == pytest.approx(pearsonr(pred, gold)[0])
    sa, sb = spearmanr(pred[:3], gold[:3])[0], spearmanr(pred[3:], gold[3:])[0]
    assert r["subsets"]["a"]["spearman"] == pytest.approx(sa)
    assert r["spearman_mean"] == pytest.approx((sa + sb) / 2)
    assert r["spearman_wmean"] == pytest.approx((3 * sa + 7 * sb) / 10)
    with pytest.raises(DataError, match="cover 9 pairs"):
        score_set(pred, gold, {"a": [2, 4], "b": [5, 10]})


def test_sts_eval_equals_sentence_transformers_embedding_similarity_evaluator(tmp_path, bert):
    """Same tiny BERT and pooling, STS-B-style pairs: dr-lab's Spearman and Pearson of the cosine equal
    sentence-transformers' EmbeddingSimilarityEvaluator (the evaluator of the SG-BERT code and of SBERT).
    Mean pooling: a random BERT's [CLS] vectors are all alike (cosines 0.99999), so their correlations
    would compare float32 rounding, not the evaluation."""
    pytest.importorskip("sentence_transformers", reason="parity tests need the dev extra")
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    from retrievers.sgopt import build
    from retrievers.sts import evaluate_sts

    write_sts(tmp_path / "tiny" / "test.tsv")
    ours = evaluate_sts(build(str(bert), pooling="mean", normalize=True, similarity="cos", temperature=0.05,
                              query_max_len=64, doc_max_len=64, local_dirs=None),
                        {"path": str(tmp_path), "sets": ["tiny"], "eval_split": "test"}, batch_size=3, device="cpu",
                        progress=False)["tiny"]
    model = SentenceTransformer(modules=[models.Transformer(str(bert), max_seq_length=64),
                                         models.Pooling(32, pooling_mode="mean")], device="cpu")
    ev = EmbeddingSimilarityEvaluator([a for a, _, _ in PAIRS], [b for _, b, _ in PAIRS], [s / 5 for *_, s in PAIRS],
                                      name="tiny")
    ref = ev(model)
    assert ours["spearman"] == pytest.approx(ref["tiny_spearman_cosine"], abs=1e-6)
    assert ours["pearson"] == pytest.approx(ref["tiny_pearson_cosine"], abs=1e-5)


# ----------------------------------------------------------------------------- STS data in a chain


def _plan(overrides, tmp_path, stage="all"):
    from pipelines import all_stages
    from pipelines.executor import plan

    cfg = compose(overrides + [f"stage={stage}"], tmp_path)
    return {i.stage: i for i in plan(cfg, all_stages(), stage, [], tmp_path / "cache")}


def test_on_sts_data_only_pretrain_and_eval_run(tmp_path, tiny_sts, bert):
    items = _plan(["model=sgopt", f"model.checkpoint={bert}", *sts_overrides(tiny_sts)], tmp_path)
    assert {k: v.status for k, v in items.items()} == {"pretrain": "run", "index": "n/a", "eval": "run"}
    assert items["eval"].uses == ("pretrain",)
    with pytest.raises(ConfigError, match="does not run on sts data"):
        _plan(["model=sgopt", f"model.checkpoint={bert}", *sts_overrides(tiny_sts)], tmp_path, stage="index")


def test_sts_sets_that_pre_train_on_the_same_sentences_share_one_pretrain_stage(tmp_path, tiny_sts, bert):
    base = ["model=sgopt", f"model.checkpoint={bert}", *sts_overrides(tiny_sts)]
    one = _plan(base, tmp_path)
    two = _plan(base + ["data.name=both", "data.sets=[tiny,other]"], tmp_path)
    assert one["pretrain"].key == two["pretrain"].key
    assert one["eval"].key != two["eval"].key
    # a retrieval dataset that names the same sentences reuses it (pre-train on STS-B, evaluate on SciFact)
    beir = _plan(["model=sgopt", f"model.checkpoint={bert}", "data=beir", "data.name=tiny",
                  f"+data.text={{path:{tiny_sts / 'tiny'},split:train}}"], tmp_path)
    assert beir["pretrain"].key == one["pretrain"].key and beir["index"].status == "run"
    write_sts(tiny_sts / "tiny" / "train.tsv", PAIRS[:5])  # the pre-training sentences changed
    assert _plan(base, tmp_path)["pretrain"].key != one["pretrain"].key
    with pytest.raises(ConfigError, match="data.text=null"):
        _plan(base + ["data.text=null"], tmp_path)


def test_sgopt_on_sts_runs_end_to_end(tmp_path, tiny_sts, bert):
    from pipelines.runner import run_pipeline

    cfg = compose(["model=sgopt", f"model.checkpoint={bert}", "debug=tiny", "model.pretrain.projection_dim=16",
                   *sts_overrides(tiny_sts, "data.sets=[tiny,other]")], tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    assert summary["stages"]["pretrain"]["metrics"]["steps"] == 4
    m = summary["metrics"]
    assert -1 <= m["test/spearman"] <= 1 and m["test/spearman"] == m["tiny/spearman"]
    assert "other/pearson" in m
    out = Path(summary["stages"]["eval"]["dir"])
    assert (out / "report.png").stat().st_size > 0 and "Spearman" in (out / "report.md").read_text()


def test_a_retrieval_stage_on_sts_data_says_why(tmp_path, tiny_sts, bert):
    from retrievers.data import load_dataset

    cfg = compose(["model=dpr", *sts_overrides(tiny_sts)], tmp_path)
    with pytest.raises(DataError, match="Only the pretrain and eval stages"):
        load_dataset(OmegaConf.to_container(cfg.data, resolve=True), ["test"])


# ----------------------------------------------------------------------------- the shipped data configs

STS_CONFIGS = ["stsb", "sickr", "sts12", "sts13", "sts14", "sts15", "sts16", "sts"]
SHARED = Path(os.environ.get("DRLAB_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.mark.parametrize("name", STS_CONFIGS)
def test_every_sts_config_reads_its_files_and_its_subsets_cover_them(tmp_path, name):
    assert (CONF_DIR / "data" / f"{name}.yaml").exists()
    if not (SHARED / "sts" / "stsb" / "test.tsv").exists():
        pytest.skip(f"no STS data under {SHARED}/sts")
    data = OmegaConf.to_container(compose([f"data={name}"], tmp_path, data_dir=SHARED).data, resolve=True)
    assert data["format"] == "sts" and data["sets"][0] == ("stsb" if name == "sts" else name)
    for s in data["sets"]:
        a, _, gold = read_pairs(Path(data["path"]) / s / "test.tsv")
        score_set(gold, gold, (data.get("subsets") or {}).get(s))  # raises when the ranges miss a pair
    assert len(text_sentences(data["text"])) == 2 * 5749  # STS-B train, scores dropped
