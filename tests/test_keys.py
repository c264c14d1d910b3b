"""Key stability on the real stages and configs: a key moves exactly when a stage's inputs move.

Each stage declares the config nodes it reads and the earlier stages it uses
(``pipelines/stages/*.py``); the key hashes those and nothing else (``pipelines/keys.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import compose

from pipelines import all_stages
from pipelines.executor import plan

STAGES = all_stages()


def keys_for(overrides: list[str], tmp_path: Path, data_dir: Path | None = None, target: str = "all") -> dict:
    cfg = compose(["data=beir", "data.name=tiny", "data.train_split=train", *overrides], tmp_path, data_dir=data_dir)
    return {i.stage: i.key for i in plan(cfg, STAGES, target, [], tmp_path / "outputs" / "cache") if i.key}


def moved(a: dict, b: dict) -> set[str]:
    return {s for s in a if a[s] != b.get(s)}


@pytest.fixture
def data(tiny_beir):
    return tiny_beir.parent


# --------------------------------------------------------------------------- unrelated changes keep keys


def test_teacher_setting_moves_only_the_teacher_and_its_consumers(tmp_path, data):
    base = keys_for(["model=simlm"], tmp_path)
    changed = keys_for(["model=simlm", "model.teacher.doc_max_len=128"], tmp_path)
    assert moved(base, changed) == {"rerank", "distill", "index", "eval"}


def test_rewriting_the_chain_keeps_the_keys_of_unchanged_stages(tmp_path, data):
    base = keys_for(["model=dpr"], tmp_path)
    longer = keys_for(["model=dpr", "model.chain=[bm25,retriever1,mine,retriever2,index,eval]"], tmp_path)
    assert longer["bm25"] == base["bm25"] and longer["retriever1"] == base["retriever1"]
    assert longer["index"] != base["index"], "index now encodes with retriever2"


def test_bm25_setting_does_not_move_a_zero_shot_index(tmp_path, data):
    chain = "model.chain=[bm25,index,eval]"
    base = keys_for(["model=pretrained", chain], tmp_path)
    changed = keys_for(["model=pretrained", chain, "pipeline.bm25.k1=1.2"], tmp_path)
    assert moved(base, changed) == {"bm25"}, "stage=all still runs bm25, but nothing here consumes it"
    assert keys_for(["model=pretrained", chain], tmp_path, target="eval").keys() == {"index", "eval"}
    fused = keys_for(["model=pretrained", chain, "pipeline.eval.fusion=rrf"], tmp_path)
    fused_k1 = keys_for(["model=pretrained", chain, "pipeline.eval.fusion=rrf", "pipeline.bm25.k1=1.2"], tmp_path)
    assert moved(fused, fused_k1) == {"bm25", "eval"}, "with fusion, eval uses bm25; the index still does not"


def test_machine_paths_never_enter_a_key(tmp_path, data):
    base = keys_for(["model=simlm"], tmp_path)
    local = keys_for(["model=simlm", "+model.local_dirs={sentence-transformers/all-MiniLM-L6-v2: /opt/models/minilm}"],
                     tmp_path)
    assert local == base


def test_runtime_and_unrelated_sections_keep_every_key(tmp_path, data):
    # precision, backend fixed: under auto the device decides fp32 or bf16, torch or OpenVINO, which keys hash
    fixed = ["model=ance", "precision=fp32", "backend=torch",
             *(f"pipeline.{s}.precision=fp32" for s in ("retriever1", "retriever2", "distill"))]
    base = keys_for(fixed, tmp_path)
    other = keys_for([*fixed, "runtime.threads=7", "runtime.device=cuda:1",
                      "runtime.encode_batch_size=9", "pipeline.rerank.lr=3e-4", "pipeline.distill.epochs=9",
                      "name=something", "logger=wandb"], tmp_path)
    assert other == base


def test_a_knob_at_its_neutral_value_keeps_the_keys_of_before(tmp_path, data, monkeypatch):
    from pipelines import keys

    base = keys_for(["model=dpr"], tmp_path)
    assert keys_for(["model=dpr", "pipeline.retriever1.length_sort=false"], tmp_path) == base
    assert moved(base, keys_for(["model=dpr", "pipeline.retriever1.length_sort=true"], tmp_path)) == {
        "retriever1", "index", "eval"}
    monkeypatch.setattr(keys, "NEUTRAL", {})  # what the key was before the knob was declared neutral
    assert moved(base, keys_for(["model=dpr"], tmp_path)) == {"retriever1", "index", "eval"}


def test_precision_moves_only_the_stages_that_encode(tmp_path, data):
    base = keys_for(["model=ance", "precision=fp32"], tmp_path)
    bf16 = keys_for(["model=ance", "precision=bf16"], tmp_path)
    assert moved(base, bf16) == {"mine", "retriever2", "index", "eval"}  # retriever2: its ANN refresh encodes


def test_pretraining_option_moves_only_pretrain_and_what_follows(tmp_path, data):
    base = keys_for(["model=simlm"], tmp_path)
    changed = keys_for(["model=simlm", "model.pretrain.loss_on_special=true"], tmp_path)
    assert "bm25" not in moved(base, changed)
    assert moved(base, changed) == set(base) - {"bm25"}


# --------------------------------------------------------------------------- real inputs move keys


@pytest.mark.parametrize(
    "override, expected",
    [
        ("pipeline.retriever1.lr=1e-5", {"retriever1", "mine", "retriever2", "index", "eval"}),
        ("pipeline.mine.window=[5,100]", {"mine", "retriever2", "index", "eval"}),
        ("pipeline.retriever2.n_negatives=2", {"retriever2", "index", "eval"}),
        ("pipeline.retriever2.refresh_every=10", {"retriever2", "index", "eval"}),
        ("pipeline.bm25.k1=1.2", {"bm25", "retriever1", "mine", "retriever2", "index", "eval"}),
        ("model.encoder.pooling=cls", {"retriever1", "mine", "retriever2", "index", "eval"}),
        ("seed=7", {"retriever1", "mine", "retriever2"} | {"index", "eval"}),
        ("index=hnsw", {"index", "eval"}),
        ("pipeline.eval.metrics=[ndcg@10]", {"eval"}),
    ],
)
def test_a_real_input_moves_its_stage_and_consumers(tmp_path, data, override, expected):
    base = keys_for(["model=ance"], tmp_path)
    assert moved(base, keys_for(["model=ance", override], tmp_path)) == expected


def test_mine_settings_enter_retriever2_only_when_it_refreshes(tmp_path, data):
    fixed = ["model=ance", "pipeline.retriever2.refresh_every=0"]
    base = keys_for(fixed, tmp_path)
    changed = keys_for([*fixed, "pipeline.mine.depth=150"], tmp_path)
    assert moved(base, changed) == {"mine", "retriever2", "index", "eval"}  # through mine's key only
    refreshing = keys_for(["model=ance"], tmp_path)
    r_changed = keys_for(["model=ance", "pipeline.mine.n_per_query=10"], tmp_path)
    assert "retriever2" in moved(refreshing, r_changed)


def test_loss_group_moves_only_distill_and_after(tmp_path, data):
    base = keys_for(["model=simlm"], tmp_path)
    changed = keys_for(["model=simlm", "loss@pipeline.distill.loss=margin_mse"], tmp_path)
    assert moved(base, changed) == {"distill", "index", "eval"}


def test_data_content_moves_every_stage_that_reads_it(tmp_path, data):
    base = keys_for(["model=dpr"], tmp_path)
    q = data / "tiny" / "queries.jsonl"
    q.write_text(q.read_text().replace("waggle dance", "waggle dances"))
    assert moved(base, keys_for(["model=dpr"], tmp_path)) == set(base)


# --------------------------------------------------------------------------- location and machine


def test_keys_do_not_depend_on_where_data_or_outputs_live(tmp_path, data):
    base = keys_for(["model=simlm"], tmp_path)
    elsewhere = tmp_path / "mnt" / "datasets"
    shutil.copytree(data, elsewhere)
    assert keys_for(["model=simlm"], tmp_path / "other-run", data_dir=elsewhere) == base
    assert keys_for(["model=simlm", f"paths.root_dir={tmp_path / 'another-checkout'}"], tmp_path) == base


def test_target_plans_only_what_it_uses(tmp_path, data):
    items = keys_for(["model=simlm"], tmp_path, target="retriever1")
    assert set(items) == {"bm25", "pretrain", "retriever1"}
    assert set(keys_for(["model=simlm"], tmp_path, target="rerank")) == {
        "bm25", "pretrain", "retriever1", "mine", "retriever2", "rerank"}


def test_file_hashes_persist_between_runs_and_follow_edits(tmp_path, data, monkeypatch):
    from pipelines import keys as K

    store = tmp_path / "fingerprints.json"
    monkeypatch.setattr(K, "FINGERPRINT_STORE", store)
    monkeypatch.setattr(K, "STORE_WRITABLE", True)  # a dry run earlier in the session leaves it False
    monkeypatch.setattr(K, "_FP_CACHE", {})
    first = K.data_fingerprint(data / "tiny")
    assert store.exists() and len(json.loads(store.read_text())) == len(first)
    monkeypatch.setattr(K, "_FP_CACHE", {})  # a new process: read from the store, not from the files
    monkeypatch.setattr(K, "_store_loaded", None)
    monkeypatch.setattr(K, "file_hash", lambda p: pytest.fail(f"{p} hashed again"))
    assert K.data_fingerprint(data / "tiny") == first
    monkeypatch.undo()
    monkeypatch.setattr(K, "FINGERPRINT_STORE", store)
    monkeypatch.setattr(K, "STORE_WRITABLE", True)
    corpus = data / "tiny" / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace("Hawaii", "Hawai'"))  # edited in the middle, same size
    assert K.data_fingerprint(data / "tiny")["corpus.jsonl"] != first["corpus.jsonl"]
