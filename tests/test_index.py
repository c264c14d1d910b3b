"""The ``index`` stage and dense search: exact Flat search, float16 shards, rank sharding,
HNSW / IVF-PQ, the stage end to end through the runner, and resume after a kill.

Everything runs on a tiny random BERT (2 layers, hidden 32) built from a config and a
vocabulary written here, and a 12-document BEIR dataset written into ``tmp_path``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, component

from retrievers import embeddings, faiss_index
from retrievers.errors import IndexBuildError

DOCS = [
    ("d1", "Volcanoes", "Basaltic lava flows from shield volcanoes in Hawaii erupt gently."),
    ("d2", "Penguins", "Emperor penguins huddle through the Antarctic winter to keep warm."),
    ("d3", "Sourdough", "A sourdough starter ferments flour and water with wild yeast."),
    ("d4", "Chess", "The Sicilian defence is a sharp reply to the king pawn opening."),
    ("d5", "Glaciers", "Glaciers carve U-shaped valleys as the ice slowly grinds the rock."),
    ("d6", "Bees", "Honeybees communicate the direction of nectar with a waggle dance."),
    ("d7", "Telescopes", "Refracting telescopes use lenses while reflecting telescopes use mirrors."),
    ("d8", "Coffee", "Arabica coffee beans are roasted to develop aroma and bitterness."),
    ("d9", "Tides", "Ocean tides rise and fall under the gravitational pull of the moon."),
    ("d10", "Origami", "Origami cranes are folded from a single square sheet of paper."),
    ("d11", "Cheese", "Cheddar cheese is aged for months in cool caves to sharpen its flavour."),
    ("d12", "", "The river delta spreads sediment across a wide fertile floodplain."),
]
QUERIES = {
    "q1": "waggle dance of honeybees",
    "q2": "emperor penguins antarctic winter",
    "q3": "sourdough starter wild yeast",
    "q4": "ocean tides and the moon",
}
QRELS = {"q1": {"d6": 1}, "q2": {"d2": 1}, "q3": {"d3": 2}, "q4": {"d9": 1}}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """OpenMP spin-waiting makes FAISS slow on a busy 2-core machine; one thread is plenty here."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer BERT (hidden 32) + WordPiece vocab of the corpus words, saved as an HF dir."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    words = set()
    for _, t, x in DOCS:
        words |= set(re.findall(r"\w+", f"{t} {x}".lower()))
    for q in QUERIES.values():
        words |= set(re.findall(r"\w+", q.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as `vocab` (and ignores `vocab_file`); 4.x as `vocab_file`
    kw = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tok = BertTokenizerFast(**{kw: str(out / "vocab.txt")})
    assert tok.convert_tokens_to_ids("penguins") == vocab.index("penguins")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return component(["model=pretrained"], "model.encoder", checkpoint=str(tiny_model), query_max_len=32,
                     doc_max_len=64)


@pytest.fixture
def texts(encoder) -> list[str]:
    return encoder.doc_texts([{"title": t, "text": x} for _, t, x in DOCS])


def write_beir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n" for d, t, x in DOCS))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, ds in QRELS.items() for d, r in ds.items())
    )
    return root


def compose(tmp_path: Path, tiny_model: Path, *extra: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    data_dir = tmp_path / "data"
    if not (data_dir / "tiny").exists():
        write_beir(data_dir / "tiny")
    overrides = [
        "model=pretrained",
        f"model.checkpoint={tiny_model}",
        "data=beir",
        "data.name=tiny",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'out'}",
        "stage=eval",
        "runtime.threads=1",
        "pipeline.eval.depth=10",
        "pipeline.eval.metrics=[ndcg@10,recall@10]",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


# --------------------------------------------------------------------------- encoding and search


def test_flat_search_is_exact_brute_force(encoder, texts):
    docs = encoder.encode(texts, "doc", batch_size=4, progress=False)
    queries = encoder.encode(list(QUERIES.values()), "query", batch_size=4, progress=False)
    index, params = faiss_index.build_index([docs], "Flat", progress=False)
    assert params["factory"] == "Flat" and params["ntotal"] == len(DOCS)
    D, I = faiss_index.search(index, queries, k=5, chunk=3)  # chunks of 3 queries: 2 search calls
    scores = queries @ docs.T
    want = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(I, want)
    np.testing.assert_allclose(D, np.take_along_axis(scores, want, axis=1), rtol=1e-5, atol=1e-5)


def test_encode_matches_unbatched_forward(encoder, texts):
    """Length-sorted batches with padding give each text the embedding it gets alone."""
    together = encoder.encode(texts, "doc", batch_size=5, progress=False)
    alone = np.concatenate([encoder.encode([t], "doc", batch_size=1, progress=False) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_float16_shards_and_doc_ids_round_trip(encoder, texts, tmp_path):
    ids = [d for d, _, _ in DOCS]
    full = encoder.encode(texts, "doc", batch_size=4, progress=False)
    info = embeddings.encode_corpus(encoder, texts, ids, tmp_path, shard_size=5, batch_size=4, progress=False)
    assert info["shards"] == ["shard_000.npy", "shard_001.npy", "shard_002.npy"]
    assert info["encoded"] == 12 and info["reused"] == 0 and info["dim"] == 32
    parts = [np.load(tmp_path / "embeddings" / s) for s in info["shards"]]
    assert [p.shape for p in parts] == [(5, 32), (5, 32), (2, 32)]
    assert all(p.dtype == np.float16 for p in parts)
    np.testing.assert_allclose(np.concatenate(parts).astype(np.float32), full, rtol=2e-3, atol=2e-3)

    odd = ["a b", "ünïcode", "x\ty", "42"]
    embeddings.write_doc_ids(odd, tmp_path / "doc_ids.txt")
    assert embeddings.read_doc_ids(tmp_path / "doc_ids.txt") == odd
    with pytest.raises(IndexBuildError, match="line break"):
        embeddings.write_doc_ids(["bad\nid"], tmp_path / "x.txt")
    with pytest.raises(IndexBuildError, match="float32"):
        embeddings._to_storage(np.array([[1e6]], dtype=np.float32), "float16")


def test_two_rank_shards_merge_to_single_process(encoder, texts):
    single = encoder.encode(texts, "doc", batch_size=4, progress=False)
    parts = [embeddings.encode_corpus_shard(encoder, texts, r, 2, batch_size=4, progress=False) for r in range(2)]
    assert [len(p) for p in parts] == [6, 6]
    np.testing.assert_allclose(embeddings.merge_shards(parts), single, atol=1e-5)
    # uneven split: contiguous slices covering every row once
    bounds = [embeddings.shard_bounds(7, r, 3) for r in range(3)]
    assert bounds == [(0, 2), (2, 4), (4, 7)]


def _rank_worker(rank: int, world: int, model_dir: str, work: str, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        enc = component(["model=pretrained"], "model.encoder", checkpoint=model_dir, query_max_len=32,
                        doc_max_len=64)
        texts = enc.doc_texts([{"title": t, "text": x} for _, t, x in DOCS])
        embeddings.encode_corpus(enc, texts, [d for d, _, _ in DOCS], Path(work), shard_size=5, batch_size=4, progress=False)
    finally:
        dist.destroy_process_group()


def test_rank_aware_encode_corpus_with_a_fake_process_group(encoder, texts, tmp_path, monkeypatch):
    """The torch.distributed path of encode_corpus, ranks run one after the other in-process.

    Rank 1 writes its slice of every shard (its barriers are no-ops here), then rank 0
    writes its slices and merges; the shards equal a single-process run's.
    """
    ids = [d for d, _, _ in DOCS]

    class FakeDist:
        barriers = 0

        def barrier(self):
            FakeDist.barriers += 1

    for rank in (1, 0):
        monkeypatch.setattr(embeddings, "_dist", lambda rank=rank: (rank, 2, FakeDist()))
        info = embeddings.encode_corpus(encoder, texts, ids, tmp_path / "dist", shard_size=5, batch_size=4, progress=False)
        assert info["encoded"] == 12 and info["shards"] == ["shard_000.npy", "shard_001.npy", "shard_002.npy"]
    assert FakeDist.barriers == 2 * 2 * 3  # two per shard and rank
    monkeypatch.setattr(embeddings, "_dist", lambda: (0, 1, None))
    single = embeddings.encode_corpus(encoder, texts, ids, tmp_path / "one", shard_size=5, batch_size=4, progress=False)
    emb = tmp_path / "dist" / "embeddings"
    assert sorted(p.name for p in emb.glob("*.npy")) == single["shards"]  # rank slices merged, then removed
    for s in single["shards"]:
        np.testing.assert_allclose(
            np.load(emb / s).astype(np.float32), np.load(tmp_path / "one" / "embeddings" / s).astype(np.float32),
            atol=2e-3,
        )


@pytest.mark.skipif(not os.environ.get("DRLAB_TEST_DIST"), reason="spawns 2 processes (~20 s); DRLAB_TEST_DIST=1 runs it")
def test_two_gloo_ranks_write_the_same_shards_as_one_process(encoder, texts, tiny_model, tmp_path):
    """torch.distributed (gloo, 2 CPU processes): each rank encodes its slice, rank 0 merges."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tiny_model), str(tmp_path / "dist"), str(tmp_path / "store")), nprocs=2)
    single = embeddings.encode_corpus(
        encoder, texts, [d for d, _, _ in DOCS], tmp_path / "one", shard_size=5, batch_size=4, progress=False
    )
    emb = tmp_path / "dist" / "embeddings"
    assert sorted(p.name for p in emb.glob("*.npy")) == single["shards"]  # rank slices merged and removed
    for s in single["shards"]:
        np.testing.assert_allclose(
            np.load(emb / s).astype(np.float32), np.load(tmp_path / "one" / "embeddings" / s).astype(np.float32),
            atol=2e-3,
        )


def test_hnsw_and_ivfpq_build_and_search():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]

    def recall(I):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, exact)])

    shards = [x[:1000].astype(np.float16), x[1000:].astype(np.float16)]  # stored as float16
    hnsw, hp = faiss_index.build_index(shards, "HNSW32", ef_construction=80, ef_search=64, progress=False)
    assert hp["ef_search"] == 64 and faiss_index._hnsw(hnsw).hnsw.efSearch == 64
    assert faiss_index._hnsw(hnsw).hnsw.efConstruction == 80
    assert recall(faiss_index.search(hnsw, q, 10)[1]) >= 0.95

    ivf, vp = faiss_index.build_index(shards, "IVF256,PQ8", nprobe=16, progress=False)
    # 3000 points < 39 x 256: nlist and the PQ codebooks are clamped and the notes say so
    assert vp["factory"] == "IVF76,PQ8x6" and len(vp["clamped"]) == 2
    assert vp["nprobe"] == 16 and faiss_index._ivf(ivf).nprobe == 16
    D, I = faiss_index.search(ivf, q, 10)
    assert I.shape == (50, 10) and (I >= 0).all() and recall(I) >= 0.3

    with pytest.raises(IndexBuildError, match="index_factory"):
        faiss_index.build_index(shards, "IVF4,PQ5", progress=False)  # 5 does not divide 32


def test_sharded_search_equals_one_flat_index():
    """search_shards (a Flat index per stored shard, merged at search time) returns what one Flat index over
    the whole corpus returns: the same ids and scores, best first, also with k larger than a shard."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2500, 16)).astype(np.float16)
    q = rng.standard_normal((40, 16)).astype(np.float32)
    shards = [x[:1000], x[1000:1900], x[1900:]]
    whole, _ = faiss_index.build_index([x], "Flat", progress=False)
    for k in (10, 700):
        D, I = faiss_index.search(whole, q, k)
        Ds, Is = faiss_index.search_shards(shards, q, k, chunk=7)
        np.testing.assert_allclose(Ds, D, rtol=1e-5, atol=1e-5)
        assert (Is == I).mean() > 0.999  # ties between equal fp16 scores may swap
        assert (np.diff(Ds, axis=1) <= 1e-6).all()


def test_clamp_factory_leaves_big_corpora_alone():
    assert faiss_index.clamp_factory("IVF256,PQ32", 1_000_000) == ("IVF256,PQ32", [])
    assert faiss_index.clamp_factory("HNSW32", 10) == ("HNSW32", [])
    built, notes = faiss_index.clamp_factory("IVF65536,PQ64x8", 12)
    assert built == "IVF1,PQ64x1" and len(notes) == 2


# --------------------------------------------------------------------------- the stage


def test_index_stage_end_to_end(tmp_path, tiny_model):
    from pipelines.runner import run_pipeline

    cfg = compose(tmp_path, tiny_model)
    summary = run_pipeline(cfg, tmp_path / "run")
    assert "test/ndcg@10" in summary["metrics"]
    d = Path(summary["stages"]["index"]["dir"])
    for f in ("index.faiss", "doc_ids.txt", "encoder.json", "index_stats.json", "index_params.json", "manifest.json"):
        assert (d / f).exists(), f
    assert embeddings.read_doc_ids(d / "doc_ids.txt") == [x for x, _, _ in DOCS]
    rec = json.loads((d / "encoder.json").read_text())
    assert rec["kind"] == "model" and rec["model"] == str(tiny_model)
    stats = json.loads((d / "index_stats.json").read_text())
    assert stats["index_type"] == "flat" and stats["vectors"] == 12 and stats["index_bytes"] > 0
    assert stats["docs_per_s"] > 0 and stats["encode_seconds"] >= 0 and stats["build_seconds"] >= 0
    shards, ids = embeddings.load_embeddings(d)
    assert shards[0].dtype == np.float16 and len(ids) == 12
    ev = Path(summary["stages"]["eval"]["dir"])
    report = (ev / "report.md").read_text()
    assert "## Dense index" in report and "ms/query" in report
    assert not (ev / "extra.md").exists()

    # the eval run equals a brute-force search over the stored vectors with the recorded encoder
    enc = component(["model=pretrained"], "model.encoder", checkpoint=str(tiny_model))
    q = enc.encode(list(QUERIES.values()), "query", progress=False)
    stored = np.concatenate(shards).astype(np.float32)
    from retrievers.evaluation import read_trec

    run = read_trec(ev / "runs" / "test.trec")
    for qi, qid in enumerate(QUERIES):
        top = [ids[j] for j in np.argsort(-(stored @ q[qi]), kind="stable")[:10]]
        got = sorted(run[qid], key=run[qid].get, reverse=True)
        assert got == top

    # index=hnsw on the same encoder/data: a new index stage that reuses the stored vectors
    summary2 = run_pipeline(compose(tmp_path, tiny_model, "index=hnsw"), tmp_path / "run2")
    d2 = Path(summary2["stages"]["index"]["dir"])
    assert d2 != d
    stats2 = json.loads((d2 / "index_stats.json").read_text())
    assert stats2["index_type"] == "hnsw" and stats2["docs_encoded"] == 0 and stats2["reused_from"] == str(d)
    assert summary2["metrics"]["test/ndcg@10"] == pytest.approx(summary["metrics"]["test/ndcg@10"])


@pytest.mark.slow
def test_index_stage_resumes_from_shards_after_a_kill(tmp_path, tiny_model, monkeypatch):
    from pipelines.runner import run_pipeline
    from retrievers.encoder import BiEncoder

    cfg = compose(tmp_path, tiny_model, "pipeline.index.shard_size=5", "pipeline.index.reuse_embeddings=false",
                  "precision=fp32")  # no bf16 check: it would be the first doc encode
    calls: list[int] = []
    original = BiEncoder.encode

    def killed_after_first_shard(self, texts, side, *a, **kw):
        if side == "doc" and calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(len(texts))
        return original(self, texts, side, *a, **kw)

    monkeypatch.setattr(BiEncoder, "encode", killed_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "run")
    work = next((tmp_path / "out" / "cache" / "index").glob("*.work"))
    assert sorted(p.name for p in (work / "embeddings").glob("*.npy")) == ["shard_000.npy"]
    assert not list((tmp_path / "out" / "cache" / "index").glob("*.partial"))

    counted: list[int] = []

    def counting(self, texts, side, *a, **kw):
        if side == "doc":
            counted.append(len(texts))
        return original(self, texts, side, *a, **kw)

    monkeypatch.setattr(BiEncoder, "encode", counting)
    summary = run_pipeline(cfg, tmp_path / "run2")
    assert counted == [5, 2]  # shards 1 and 2 only: shard 0 came from the work dir
    stats = json.loads((Path(summary["stages"]["index"]["dir"]) / "index_stats.json").read_text())
    assert stats["docs_reused"] == 5 and stats["docs_encoded"] == 7
    assert not work.exists()  # the executor removes the work dir once the stage is finished
    assert "test/ndcg@10" in summary["metrics"]


def test_fusion_handles_missing_queries_and_default_weights():
    """eval's fuse: a query one run has no hits for, wsum without weights (ranx rejected both)."""
    from retrievers.evaluation import fuse

    dense = {"q1": {"d1": 0.9, "d2": 0.5, "d3": 0.1}, "q2": {"d3": 0.7, "d1": 0.2}}
    bm25 = {"q1": {"d2": 9.0, "d3": 3.0, "d1": 1.0}}  # no hits for q2
    # (rrf goes through the same query alignment; its numba compilation takes ~10 s, so not here)
    ws = fuse({"dense": dense, "bm25": bm25}, "wsum")
    assert set(ws) == {"q1", "q2"} and sorted(ws["q2"], key=ws["q2"].get, reverse=True) == ["d3", "d1"]
    assert ws["q1"]["d2"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    ws = fuse({"dense": dense, "bm25": bm25}, "wsum", [1.0, 0.0])
    assert max(ws["q1"], key=ws["q1"].get) == "d1"
    with pytest.raises(ValueError, match="fusion_weights"):
        fuse({"dense": dense, "bm25": bm25}, "wsum", [1.0])
