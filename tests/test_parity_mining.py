"""Parity of hard-negative mining (``retrievers/mining.py``) with sentence-transformers.

Reference: sentence-transformers 6.2.0, ``sentence_transformers.util.mine_hard_negatives``
(``sentence_transformers/util/hard_negatives.py``), ``sampling_strategy="top"``, exact search
(``use_faiss=False``: ``torch.topk``) and ``use_faiss=True`` (``IndexFlatIP``).

Both sides get the same *fixed* embeddings: sentence-transformers through a real
``SentenceTransformer`` made of one ``StaticEmbedding`` over a word-level vocabulary in which each
text ("q3", "d17") is one token, so a text's embedding is its row; dr-lab through a stub with
``BiEncoder``'s ``encode`` / ``doc_texts`` / ``cfg`` interface, run by the real
:func:`miner_from_config` -> :class:`DenseMiner` (fp16 embedding shards, FAISS Flat search,
:func:`select_negatives`) and :func:`run_window_pool` (the bm25-run path). Query ``i`` is the unit
vector ``e_i``; document ``j`` is ``[S[:, j], r_j e_(Q+j)]`` with ``r_j`` making it unit-norm, so the
cosine of (query ``i``, doc ``j``) is exactly ``S[i, j]``: per query a permutation of a grid of 30
values 0.026 apart, so every rank is known and no fp16 / fp32 rounding (< 2e-4) can swap two.

Tolerances: the selected negatives (ids and order) must be identical for every query; the
reported scores agree to ``atol=5e-4`` (dr-lab stores the corpus embeddings in fp16).

Semantics, and the stated differences (each pinned by a test below):

* dr-lab ``window: [lo, hi]`` is 1-based, inclusive, with ranks counted *before* positives are
  removed (a positive inside the window leaves a gap). sentence-transformers removes the positives
  first, then skips ``range_min`` (0-based count) of the remaining candidates and takes the next
  ``num_negatives`` (``range_max`` bounds the pool). So per query, with ``b`` positives ranked
  above ``lo`` and ``w`` inside ``[lo, hi]``, dr-lab's window = sentence-transformers'
  ``range_min = lo - 1 - b``, ``num_negatives = hi - lo + 1 - w``. When every query's positives
  rank above ``lo`` (b = #positives, w = 0) one global setting reproduces dr-lab; otherwise
  sentence-transformers shifts or fills the window past ``hi`` where dr-lab leaves gaps.
* Count: dr-lab returns the whole window (``n_per_query: null``) or a seeded uniform sample of
  ``n_per_query`` (numpy ``default_rng([seed, i])``), kept in rank order; it has no "top" strategy
  (a ``n_per_query`` >= the window is "top"). sentence-transformers' "random" samples the same pool
  with Python's ``random``.
* Margin: dr-lab's ``fn_margin`` drops a candidate whose *teacher* score (a JSONL file) is >= the
  query's lowest positive's minus the margin (kept when unscored), *after* windowing.
  sentence-transformers' ``absolute_margin`` drops ``score + margin > min positive score`` with
  the miner's own (or a cross-encoder's) scores, *before* taking the window: ``range_min`` then
  skips survivors, and the count is refilled from lower ranks, as far as the ``range_max +
  #positives`` candidates it retrieved reach. The criterion is the same (lowest positive as the
  reference) but for the tie ``score == min_pos - margin`` (dr-lab drops it, sentence-transformers
  keeps it; not tested: a measure-zero float case). dr-lab has no ``relative_margin`` / ``max_score`` / ``min_score``:
  a relative margin ``r`` is dr-lab's absolute ``|min_pos| * r`` for that one query.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF_DIR

st = pytest.importorskip("sentence_transformers", reason="parity tests need the dev extra")
pytest.importorskip("datasets", reason="mine_hard_negatives needs datasets")
pytest.importorskip("faiss", reason="DenseMiner searches with FAISS")

Q, N = 6, 30
GRID = np.linspace(0.38, -0.38, N)  # rank r (1-based) of every query gets GRID[r - 1]
SCORE_ATOL = 5e-4
# query -> ranks (1-based, by construction) of its positives
POS_AT_1 = {f"q{i}": [1] for i in range(Q)}
POS_MIXED = {"q0": [1], "q1": [2], "q2": [4], "q3": [1, 5], "q4": [20], "q5": [3, 9]}


def _design():
    """Fixed embeddings: cos(q_i, d_j) = S[i, j]; ORDER[i] = doc indices of query i, best first."""
    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(N) for _ in range(Q)])
    S = np.empty((Q, N))
    for i in range(Q):
        S[i, order[i]] = GRID
    emb = {f"q{i}": np.eye(Q + N)[i] for i in range(Q)}
    for j in range(N):
        v = np.zeros(Q + N)
        v[:Q] = S[:, j]
        v[Q + j] = np.sqrt(1.0 - np.sum(S[:, j] ** 2))
        emb[f"d{j}"] = v
    return S, order, {t: v.astype(np.float32) for t, v in emb.items()}


S, ORDER, EMB = _design()
DOCS = [f"d{j}" for j in range(N)]


def doc_at(qid: str, rank: int) -> str:
    return f"d{ORDER[int(qid[1:])][rank - 1]}"


def rank_of(qid: str, doc: str) -> int:
    return int(np.nonzero(ORDER[int(qid[1:])] == int(doc[1:]))[0][0]) + 1


def positives(pos_ranks):
    return {q: [doc_at(q, r) for r in ranks] for q, ranks in pos_ranks.items()}


# --------------------------------------------------------------------------- the two miners


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer, models, pre_tokenizers

    try:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import StaticEmbedding

    texts = ["[UNK]", *EMB]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(texts)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    weights = np.stack([np.zeros(Q + N, dtype=np.float32), *EMB.values()])
    model = SentenceTransformer(modules=[StaticEmbedding(tok, embedding_weights=weights)], device="cpu")
    got = model.encode_document(DOCS[:3], convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(got, np.stack([EMB[d] for d in DOCS[:3]]), atol=1e-6)  # a text -> its row
    return model


class FixedEncoder:
    """dr-lab's BiEncoder interface (what DenseMiner / miner_from_config call) over fixed embeddings."""

    def __init__(self, normalize: bool):
        from retrievers.encoder import BiEncoder

        self.cfg = {"similarity": "cos", "normalize": normalize, "doc_max_len": 16, "title_sep": " "}
        self.training = False
        self.doc_texts = BiEncoder.doc_texts.__get__(self)

    def to(self, device):
        return self

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def encode(self, texts, side, batch_size=128, device="cpu", bf16=False, progress=True, max_tokens=None):
        assert side == ("query" if texts[0].startswith("q") else "doc")
        return np.stack([EMB[t] * (1.0 if self.cfg["normalize"] else 3.0) for t in texts])  # cos: scale-free


def _dataset(pos):
    from retrievers.data import Dataset

    return Dataset("synthetic", corpus={d: {"title": "", "text": d} for d in DOCS},
                   queries={f"q{i}": f"q{i}" for i in range(Q)},
                   qrels={"train": {q: {d: 1 for d in ds} for q, ds in pos.items()}})


def drlab_mine(tmp_path: Path, pos, window, n_per_query=None, seed=0, normalize=True, **p_extra):
    """``miner_from_config`` with conf/pipeline/mine.yaml's values, ``window`` / ``n_per_query`` on top."""
    from omegaconf import OmegaConf

    from retrievers.mining import miner_from_config

    p = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "pipeline" / "mine.yaml"))
    p.update(depth=N, window=list(window), n_per_query=n_per_query, **p_extra)
    runtime = {"encode_batch_size": 7, "device": "cpu", "bf16": False, "progress": False}
    enc = FixedEncoder(normalize)
    miner = miner_from_config(_dataset(pos), "train", enc, p, seed, runtime)
    work = tmp_path / f"mine-{len(list(tmp_path.iterdir()))}"
    ranked, negs, _ = miner(enc, work)
    return ranked, negs


def st_mine(model, pos, range_min, range_max, num_negatives, use_faiss=False, strategy="top", **kw):
    """``mine_hard_negatives`` -> {qid: [(doc, score), ...]} (the order it returns)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = [(q, d) for q, ds in pos.items() for d in ds]
    ds = Dataset.from_dict({"query": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    out = mine_hard_negatives(ds, model, corpus=DOCS, range_min=range_min, range_max=range_max,
                              num_negatives=num_negatives, sampling_strategy=strategy, output_format="labeled-list",
                              output_scores=True, use_faiss=use_faiss, verbose=False, batch_size=64, **kw)
    res: dict[str, list[tuple[str, float]]] = {}
    for row in out:  # one row per (query, positive); a query's rows carry the same negatives
        negs = list(zip(row["positive"][1:], row["scores"][1:]))
        assert res.setdefault(row["query"], negs) == negs
    return res


def translate(q, ds, window):
    """dr-lab's window for query ``q`` as sentence-transformers' (range_min, num_negatives):
    ``range_min = lo - 1 - b``, ``num_negatives = hi - lo + 1 - w`` (``b`` / ``w``: its positives
    ranked above / inside the window)."""
    lo, hi = window
    ranks = [rank_of(q, d) for d in ds]
    b, w = sum(r < lo for r in ranks), sum(lo <= r <= hi for r in ranks)
    return lo - 1 - b, hi - lo + 1 - w


def st_per_query(model, pos, window, wide=False, **kw):
    """sentence-transformers run once per query with dr-lab's window translated for that query;
    ``range_max = range_min + num_negatives`` (the same pool), or the whole corpus (``wide``)."""
    out = {}
    for q, ds in pos.items():
        rmin, num = translate(q, ds, window)
        rmax = N - len(ds) if wide else rmin + num
        out[q] = st_mine(model, {q: ds}, rmin, rmax, num, **kw).get(q, []) if num else []
    return out


def _ids(negs):
    return {q: [c["id"] for c in v] for q, v in negs.items()}


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("use_faiss", [False, True], ids=["torch-topk", "faiss"])
@pytest.mark.parametrize("window", [(2, 11), (5, 9)])
def test_same_negatives_when_positives_rank_first(tmp_path, st_model, window, use_faiss):
    """Every query's positive at rank 1: dr-lab ``window [lo, hi]`` == sentence-transformers
    ``range_min = lo - 2`` (0-based, positives already out), ``num_negatives = hi - lo + 1``, "top"."""
    pos = positives(POS_AT_1)
    lo, hi = window
    ranked, negs = drlab_mine(tmp_path, pos, window)
    ref = st_mine(st_model, pos, range_min=lo - 2, range_max=hi - 1, num_negatives=hi - lo + 1, use_faiss=use_faiss)
    assert set(ref) == set(negs) == set(pos)
    for q in pos:
        assert [d for d, _ in ranked[q]][:hi] == [doc_at(q, r) for r in range(1, hi + 1)]  # the designed ranking
        assert [c["id"] for c in negs[q]] == [d for d, _ in ref[q]], q
        assert [c["rank"] for c in negs[q]] == list(range(lo, hi + 1))  # 1-based, the positive counted
        np.testing.assert_allclose([c["score"] for c in negs[q]], [s for _, s in ref[q]], atol=SCORE_ATOL)
    # the bm25-stage path: the same ranking as a TREC run, windowed by run_window_pool
    from retrievers.mining import run_window_pool, write_trec

    write_trec(tmp_path / "run.trec", ranked, "dense")
    assert run_window_pool(tmp_path / "run.trec", pos, window, "test") == _ids(negs)


@pytest.mark.parametrize("window", [(1, 10), (3, 12)])
def test_same_negatives_per_query_with_the_window_translated(tmp_path, st_model, window):
    """Positives anywhere (rank 1, 2, 4, 20, two per query): dr-lab's window equals
    sentence-transformers run per query with that query's translated range_min / num_negatives."""
    pos = positives(POS_MIXED)
    _, negs = drlab_mine(tmp_path, pos, window)
    ref = st_per_query(st_model, pos, window)
    lo, hi = window
    for q in pos:
        expect = [doc_at(q, r) for r in range(lo, hi + 1) if doc_at(q, r) not in pos[q]]
        assert [c["id"] for c in negs[q]] == expect, q
        assert [d for d, _ in ref[q]] == expect, q


def test_cosine_without_normalising_encoder(tmp_path, st_model):
    """dr-lab ``similarity: cos, normalize: false`` (unit-normed shards and queries) ranks as
    sentence-transformers' cosine."""
    pos = positives(POS_AT_1)
    _, negs = drlab_mine(tmp_path, pos, (2, 8), normalize=False)
    ref = st_mine(st_model, pos, range_min=0, range_max=7, num_negatives=7)
    assert _ids(negs) == {q: [d for d, _ in v] for q, v in ref.items()}
    for q in pos:
        np.testing.assert_allclose([c["score"] for c in negs[q]], [s for _, s in ref[q]], atol=SCORE_ATOL)


# --------------------------------------------------------------------------- stated differences


def test_difference_positives_removed_after_the_window(tmp_path, st_model):
    """One global sentence-transformers setting cannot express dr-lab's window when positives fall
    inside or above it: it shifts (positive above) or refills past ``hi`` (positive inside)."""
    pos = positives(POS_MIXED)
    lo, hi = 3, 12
    _, negs = drlab_mine(tmp_path, pos, (lo, hi))
    ref = st_mine(st_model, pos, range_min=lo - 1, range_max=hi, num_negatives=hi - lo + 1)  # the naive mapping
    got = _ids(negs)
    # q0 (positive at 1 < lo): dr-lab ranks 3..12; ST skips 2 *non-positives* -> ranks 4..13
    assert [rank_of("q0", d) for d in got["q0"]] == list(range(3, 13))
    assert [rank_of("q0", d) for d, _ in ref["q0"]] == list(range(4, 14))
    # q2 (positive at 4, inside): dr-lab leaves a gap (9 negatives); ST takes 10, past hi
    assert [rank_of("q2", d) for d in got["q2"]] == [3, *range(5, 13)]
    assert [rank_of("q2", d) for d, _ in ref["q2"]] == [3, *range(5, 14)]
    # q4 (positive at 20, below the window): the only query on which the naive mapping agrees
    assert got["q4"] == [d for d, _ in ref["q4"]]
    assert sum(got[q] != [d for d, _ in ref[q]] for q in pos) == 5


def test_difference_count_sampling(tmp_path, st_model):
    """dr-lab samples ``n_per_query`` uniformly (seeded, per query) and keeps rank order; no "top"
    unless n >= the window. Both libraries' random samples come from the same window pool."""
    pos = positives(POS_AT_1)
    window, n = (2, 21), 5
    _, whole = drlab_mine(tmp_path, pos, window)
    _, s0 = drlab_mine(tmp_path, pos, window, n_per_query=n, seed=0)
    _, s0b = drlab_mine(tmp_path, pos, window, n_per_query=n, seed=0)
    _, s1 = drlab_mine(tmp_path, pos, window, n_per_query=n, seed=1)
    _, top = drlab_mine(tmp_path, pos, window, n_per_query=20)  # n == window size: the whole window
    assert s0 == s0b and s0 != s1 and top == whole
    random.seed(0)
    ref_random = st_mine(st_model, pos, range_min=0, range_max=20, num_negatives=n, strategy="random")
    ref_top = st_mine(st_model, pos, range_min=0, range_max=20, num_negatives=20)
    assert _ids(whole) == {q: [d for d, _ in v] for q, v in ref_top.items()}
    for q in pos:
        pool = [c["id"] for c in whole[q]]
        for sample in (s0[q], s1[q]):
            ids = [c["id"] for c in sample]
            assert len(ids) == n and set(ids) <= set(pool)
            assert ids == sorted(ids, key=pool.index)  # rank order kept
        ref_ids = [d for d, _ in ref_random[q]]
        assert len(ref_ids) == n and set(ref_ids) <= set(pool) and ref_ids == sorted(ref_ids, key=pool.index)


def _teacher_file(tmp_path: Path) -> str:
    import json

    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps({"qid": f"q{i}", "scores": {d: float(S[i, j]) for j, d in enumerate(DOCS)}})
                            + "\n" for i in range(Q)))
    return str(path)


GAP = float(GRID[0] - GRID[1])
MARGIN = 2.5 * GAP  # halfway between grid values: no candidate sits within rounding of the threshold


def survivors(q, ds, depth, margin=MARGIN):
    """Query ``q``'s non-positives ranked 1..``depth`` scored below its lowest positive minus ``margin``."""
    min_pos = min(GRID[rank_of(q, d) - 1] for d in ds)
    return [d for d in (doc_at(q, r) for r in range(1, depth + 1)) if d not in ds
            and GRID[rank_of(q, d) - 1] < min_pos - margin]


def test_margin_criterion_equals_absolute_and_relative_margin(tmp_path, st_model):
    """The filter itself: dr-lab ``fn_margin`` with teacher scores = the miner's cosines, over the
    whole ranking, drops exactly what ``absolute_margin`` drops (lowest positive as the reference,
    two positives for q3 / q5); a ``relative_margin`` r is dr-lab's ``|min_pos| * r`` per query."""
    pos = positives(POS_MIXED)
    teacher = _teacher_file(tmp_path)
    _, negs = drlab_mine(tmp_path, pos, (1, N), teacher_scores=teacher, fn_margin=MARGIN)
    whole = {q: N - len(ds) for q, ds in pos.items()}
    for q, ds in pos.items():
        ref = st_mine(st_model, {q: ds}, 0, whole[q], whole[q], absolute_margin=MARGIN)
        assert [c["id"] for c in negs[q]] == [d for d, _ in ref[q]] == survivors(q, ds, N), q
    rel = 0.4
    for q, ds in pos.items():
        min_pos = min(GRID[rank_of(q, d) - 1] for d in ds)
        bar = min_pos - abs(min_pos) * rel
        assert np.min(np.abs(GRID - bar)) > 1e-3  # the threshold is not on a grid value
        _, mine_q = drlab_mine(tmp_path, {q: ds}, (1, N), teacher_scores=teacher, fn_margin=abs(min_pos) * rel)
        ref = st_mine(st_model, {q: ds}, 0, whole[q], whole[q], relative_margin=rel)
        assert [c["id"] for c in mine_q[q]] == [d for d, _ in ref.get(q, [])], q


def test_difference_margin_applied_after_the_window(tmp_path, st_model):
    """dr-lab windows the raw ranking, then filters (fewer negatives, never outside ``[lo, hi]``).
    sentence-transformers filters the ``range_max + #positives + 1`` candidates it retrieved first, then
    skips ``range_min`` *survivors* and takes ``num_negatives``: with the translated window it skips
    past filtered candidates; with a wider ``range_max`` it also keeps the count by reaching past ``hi``."""
    pos = positives(POS_MIXED)
    window = (3, 12)
    teacher = _teacher_file(tmp_path)
    _, plain = drlab_mine(tmp_path, pos, window)
    _, filt = drlab_mine(tmp_path, pos, window, teacher_scores=teacher, fn_margin=MARGIN)
    ref_plain = st_per_query(st_model, pos, window)
    ref_tight = st_per_query(st_model, pos, window, absolute_margin=MARGIN)
    ref_wide = st_per_query(st_model, pos, window, wide=True, absolute_margin=MARGIN)
    differ = 0
    for q, ds in pos.items():
        window_negs = [c["id"] for c in plain[q]]
        assert window_negs == [d for d, _ in ref_plain[q]]  # no margin: the same
        rmin, num = translate(q, ds, window)
        mine = [c["id"] for c in filt[q]]
        assert mine == [d for d in window_negs if d in survivors(q, ds, N)]  # dr-lab: the window, filtered
        # ST 6.3 retrieves range_max + #positives + 1 (`num_extra_candidates`: one slot for the query's
        # own text, should it be in the corpus) and filters those
        assert [d for d, _ in ref_tight[q]] == survivors(q, ds, rmin + num + len(ds) + 1)[rmin:rmin + num]
        assert [d for d, _ in ref_wide[q]] == survivors(q, ds, N)[rmin:rmin + num]
        differ += mine != [d for d, _ in ref_tight[q]]
        if q != "q4":  # (q4's positive is at rank 20: the margin leaves nothing above rank 23)
            assert len(mine) < len(window_negs) == len(ref_wide[q])  # ST keeps the count ...
            assert any(rank_of(q, d) > window[1] for d, _ in ref_wide[q])  # ... reaching past hi
    assert differ >= 4
