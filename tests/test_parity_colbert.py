"""Parity of dr-lab's ColBERT (``retrievers/colbert.py``) with PyLate 1.6.0.

Reference: PyLate 1.6.0 (lightonai/pylate), ``pylate/models/colbert.py`` (``ColBERT.__init__``:
prefix ids, ``pad_token_id = mask_token_id``, ``skiplist``, defaults; ``ColBERT.tokenize``: prefix
insertion after [CLS], ``padding="max_length"`` for queries, ``attend_to_expansion_tokens``;
``ColBERT.encode``: query masks (all True), document masks (skiplist AND attention), L2
normalisation), ``pylate/models/Dense.py`` (the bias-free projection) and
``pylate/scores/colbert.py`` (``colbert_scores``, ``colbert_scores_pairwise``).

Both sides use the same tiny random 2-layer BERT directory (``conftest.make_tiny_bert``, the vocab
holds ``[unused0]``/``[unused1]`` and every ASCII punctuation character), the same tokenizer files,
and the same projection weights (dr-lab's ``linear`` is copied into PyLate's ``Dense``). PyLate is
configured as dr-lab's defaults are: ``query_prefix="[unused0]"``, ``document_prefix="[unused1]"``,
the same query/document lengths, query expansion on, expansion tokens not attended to (PyLate's
default), ``skiplist_words = string.punctuation`` (PyLate's default).

Compared: query token ids / attention masks (marker, [MASK] augmentation to the fixed length,
[SEP], truncation), normalised query token vectors at every position (expansion included),
document ids / kept-token masks (marker, punctuation skiplist, [CLS]/[SEP] kept), normalised
document token vectors at kept positions, and MaxSim scores (pairwise and all-vs-all).
Tolerance: ``atol = 1e-5`` (``rtol = 1e-5``) on unit vectors and on scores (sums of <= 16
cosines); ids and masks must be equal exactly.

dr-lab's ``query_expansion: false`` is compared with PyLate's ``do_query_expansion=False`` the
same way. Differences from PyLate's *defaults* that are intentional are pinned by the
``test_difference_*`` tests (markers, padded-batch MaxSim, OOV punctuation in the skiplist,
document pad id, the attend-to-expansion switch).

Compatibility note: PyLate 1.6.0 pins ``sentence-transformers==5.3.0``; this venv has it installed
with ``--no-deps`` next to a newer sentence-transformers (6.x) whose ``Transformer.tokenize``
drops the ``padding="max_length"`` argument (queries would not be padded to ``query_length``),
which has no ``SentenceTransformer._text_length`` (``encode`` fails) and which builds
Transformer + Pooling for a plain HF directory (``ColBERT(model_name_or_path=dir)`` fails). So the
PyLate model is built from explicit modules (``Transformer`` + PyLate ``Dense``), and where the
installed sentence-transformers lacks them, ``Transformer.tokenize`` and ``_text_length`` get
sentence-transformers 5.3.0's implementations (copied below, verbatim in behaviour). All of
PyLate's own code runs unmodified.
"""

from __future__ import annotations

import inspect
import string
from pathlib import Path

import pytest
import torch
from conftest import TINY_DOCS, TINY_QUERIES, make_tiny_bert

pylate = pytest.importorskip("pylate")

ATOL = RTOL = 1e-5
QL, DL, DIM = 16, 24, 16
LONG_DOC = ("Glaciers, rivers and tides: ocean water rises; the moon pulls! Penguins huddle, bees dance "
            "(a waggle dance) and coffee beans are roasted - slowly - for aroma.")
DOCS = [f"{t}. {x}" for _, t, x in TINY_DOCS[:6]] + [LONG_DOC, "Chess?"]
QUERIES = [q for _, q in TINY_QUERIES] + [
    "bees?",  # one word and punctuation: queries keep punctuation
    "waggle dance of honeybees and emperor penguins in the antarctic winter with sourdough starter",  # > QL
]


def _pylate(bert: Path, dim: int = DIM, **kw):
    """PyLate ColBERT over ``bert`` with a ``dim`` projection (weights set by the caller)."""
    from scripts.colbert_control import pylate_colbert

    model = pylate_colbert(bert, dim, **kw)
    model.eval()
    return model


def _drlab(bert: Path, **kw):
    from retrievers.colbert import build

    args = dict(checkpoint=str(bert), dim=DIM, query_max_len=QL, doc_max_len=DL, mask_punctuation=True,
                query_expansion=True, local_dirs=None)  # expansion: the paper's and PyLate's default
    model = build(**{**args, **kw})
    model.eval()
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("colbert_bert"), DOCS + QUERIES, hidden=32, seed=7, punctuation=True)


@pytest.fixture(scope="module")
def pair(bert):
    """(dr-lab ColBERT, PyLate ColBERT) with the same backbone, tokenizer and projection."""
    dr = _drlab(bert)
    pl = _pylate(bert, query_prefix="[unused0]", document_prefix="[unused1]", query_length=QL, document_length=DL)
    with torch.no_grad():
        pl[1].linear.weight.copy_(dr.linear.weight)
    # the same backbone weights (PyLate re-adds the markers: already in the vocab, so no resize)
    sd_dr, sd_pl = dr.backbone.state_dict(), pl[0].auto_model.state_dict()
    assert len(dr.tokenizer) == len(pl.tokenizer)
    for k, v in sd_dr.items():
        assert torch.equal(v, sd_pl[k]), k
    return dr, pl


def _pl_encode(pl, texts, is_query):
    """PyLate's unfiltered per-text outputs (``output_value=None``): embeddings, ids, attention, masks."""
    out = pl.encode(texts, is_query=is_query, output_value=None, convert_to_tensor=True, batch_size=64)
    return {k: torch.stack(v) for k, v in out.items()}  # one batch: every row has the same length


# ---------------------------------------------------------------------------------------------- queries
def test_query_tokens_match_pylate(pair):
    dr, pl = pair
    mine = dr.tokenize_queries(QUERIES)
    ref = pl.tokenize(QUERIES, is_query=True)
    assert torch.equal(mine["input_ids"], ref["input_ids"])
    assert torch.equal(mine["attention_mask"], ref["attention_mask"])
    # what both do, spelled out
    ids, att = mine["input_ids"], mine["attention_mask"]
    tok = dr.tokenizer
    assert ids.shape == (len(QUERIES), QL)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, 1] == tok.convert_tokens_to_ids("[unused0]")).all()
    assert pl.query_prefix_id == dr.q_id == tok.convert_tokens_to_ids("[unused0]")
    for row, a in zip(ids, att):
        n = int(a.sum())
        assert row[n - 1] == tok.sep_token_id  # [CLS] [Q] q... [SEP], truncated ones too
        assert (row[n:] == tok.mask_token_id).all() and (a[n:] == 0).all()  # [MASK] expansion, not attended
    assert int(att[-1].sum()) == QL  # the long query is truncated to QL (no expansion left)
    assert int(att[QUERIES.index("bees?")].sum()) == 5  # [CLS] [Q] bees ? [SEP]


def test_query_embeddings_match_pylate(pair):
    dr, pl = pair
    ref = _pl_encode(pl, QUERIES, is_query=True)
    assert ref["masks"].all()  # PyLate scores every query position, the [MASK] expansion included
    with torch.no_grad():
        mine = dr.query(QUERIES)
    assert mine.shape == ref["token_embeddings"].shape == (len(QUERIES), QL, DIM)
    torch.testing.assert_close(mine.norm(dim=-1), torch.ones(len(QUERIES), QL), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(mine, ref["token_embeddings"], atol=ATOL, rtol=RTOL)


# -------------------------------------------------------------------------------------------- documents
def test_doc_tokens_and_mask_match_pylate(pair):
    dr, pl = pair
    mine = dr.tokenize_docs(DOCS)
    ref = pl.tokenize(DOCS, is_query=False)
    att = mine["attention_mask"]
    assert torch.equal(att, ref["attention_mask"])
    real = att.bool()
    assert torch.equal(mine["input_ids"][real], ref["input_ids"][real])
    # the kept-token mask: PyLate's skiplist AND attention vs dr-lab's doc() mask
    with torch.no_grad():
        _, keep = dr.doc(DOCS)
    ref_mask = pl.skiplist_mask(ref["input_ids"], pl.skiplist) & ref["attention_mask"].bool()
    assert torch.equal(keep, ref_mask)
    tok, ids = dr.tokenizer, mine["input_ids"]
    assert dr.d_id == pl.document_prefix_id == tok.convert_tokens_to_ids("[unused1]")
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, 1] == dr.d_id).all()
    assert keep[:, :2].all()  # [CLS] and [D] are kept
    punct = {tok.convert_tokens_to_ids(c) for c in string.punctuation}
    assert punct == dr.skip_ids == set(pl.skiplist)
    n_punct = 0
    for row, a, k in zip(ids, att, keep):
        n = int(a.sum())
        assert row[n - 1] == tok.sep_token_id and k[n - 1]  # [SEP] kept
        for t, kk in zip(row[:n].tolist(), k[:n].tolist()):
            assert kk == (t not in punct)
            n_punct += t in punct
    assert n_punct >= 10
    assert int(att[DOCS.index(LONG_DOC)].sum()) == DL  # truncated to DL, ending in [SEP]


def test_doc_embeddings_match_pylate(pair):
    dr, pl = pair
    ref = _pl_encode(pl, DOCS, is_query=False)
    with torch.no_grad():
        emb, keep = dr.doc(DOCS)
    assert torch.equal(keep, ref["masks"].bool())
    torch.testing.assert_close(emb[keep], ref["token_embeddings"][keep], atol=ATOL, rtol=RTOL)
    assert (emb[~keep] == 0).all()
    # PyLate's default (filtered) output is exactly dr-lab's kept rows
    filtered = pl.encode(DOCS, is_query=False, convert_to_tensor=True, batch_size=64)
    for e, k, f in zip(emb, keep, filtered):
        torch.testing.assert_close(e[k], f, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------ MaxSim
def test_maxsim_matches_pylate(pair):
    from pylate.scores import colbert_scores, colbert_scores_pairwise

    from retrievers.colbert import maxsim_all, maxsim_pairs

    dr, pl = pair
    n = min(len(QUERIES), len(DOCS))
    pq = pl.encode(QUERIES, is_query=True, convert_to_tensor=True, batch_size=64)
    pd = pl.encode(DOCS, is_query=False, convert_to_tensor=True, batch_size=64)  # unpadded per doc
    ref_pairs = colbert_scores_pairwise(pq[:n], pd[:n])
    ref_all = torch.cat([colbert_scores(torch.stack(pq), d[None], backend="torch") for d in pd], dim=1)
    with torch.no_grad():
        q = dr.query(QUERIES)
        d, m = dr.doc(DOCS)
        pairs = maxsim_pairs(q[:n], d[:n], m[:n])
        allv = maxsim_all(q, d, m)
        torch.testing.assert_close(dr.score_pairs(QUERIES[:n], DOCS[:n]), pairs, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(dr.score_all(QUERIES, DOCS), allv, atol=ATOL, rtol=RTOL)
    assert allv.shape == (len(QUERIES), len(DOCS))
    torch.testing.assert_close(pairs, ref_pairs, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(allv, ref_all, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(allv.diagonal()[:n], pairs, atol=ATOL, rtol=RTOL)
    assert allv.std() > 1e-3  # not a degenerate (constant) comparison


def test_maxsim_expansion_tokens_count_in_both(pair):
    """A short query's score is the sum over all QL positions, expansion included, in both."""
    from pylate.scores import colbert_scores

    dr, pl = pair
    short = ["bees?"]
    with torch.no_grad():
        q = dr.query(short)
        d, m = dr.doc(DOCS)
    att = dr.tokenize_queries(short)["attention_mask"][0].bool()
    sim = torch.einsum("id,bjd->bij", q[0], d).masked_fill(~m[:, None, :], float("-inf")).max(dim=2).values
    real_only, expansion = sim[:, att].sum(1), sim[:, ~att].sum(1)
    assert int((~att).sum()) == QL - 5
    ref = torch.cat([colbert_scores(q, dd[mm][None], backend="torch") for dd, mm in zip(d, m)], dim=1)[0]
    torch.testing.assert_close(real_only + expansion, ref, atol=ATOL, rtol=RTOL)
    assert (expansion.abs() > 1e-3).all()  # the [MASK] positions contribute


def test_no_query_expansion_matches_pylate(bert, pair):
    """dr-lab ``query_expansion: false`` vs PyLate ``do_query_expansion=False``: queries are padded to
    the batch's longest only and score with their real tokens (dr-lab: zero vectors at padding,
    which add 0 to MaxSim; PyLate: masks = attention mask, padding dropped)."""
    from pylate.scores import colbert_scores


    dr0, _ = pair
    dr = _drlab(bert, query_expansion=False)
    pl = _pylate(bert, query_prefix="[unused0]", document_prefix="[unused1]", query_length=QL, document_length=DL,
                 do_query_expansion=False)
    with torch.no_grad():
        dr.linear.weight.copy_(dr0.linear.weight)
        pl[1].linear.weight.copy_(dr0.linear.weight)
    mine = dr.tokenize_queries(QUERIES)
    ref = pl.tokenize(QUERIES, is_query=True)
    att = mine["attention_mask"]
    assert torch.equal(att, ref["attention_mask"]) and att.shape[1] == QL  # the long query sets the width
    assert torch.equal(mine["input_ids"][att.bool()], ref["input_ids"][att.bool()])
    assert not (mine["input_ids"] == dr.tokenizer.mask_token_id).any()  # no [MASK] expansion in dr-lab
    out = _pl_encode(pl, QUERIES, is_query=True)
    assert torch.equal(out["masks"], att.bool())  # PyLate keeps the real tokens only
    pq = pl.encode(QUERIES, is_query=True, convert_to_tensor=True, batch_size=64)
    pd = pl.encode(DOCS, is_query=False, convert_to_tensor=True, batch_size=64)
    with torch.no_grad():
        q = dr.query(QUERIES)
        d, m = dr.doc(DOCS)
    real = att.bool()
    torch.testing.assert_close(q[real], out["token_embeddings"][real], atol=ATOL, rtol=RTOL)
    assert (q[~real] == 0).all()
    from retrievers.colbert import maxsim_all

    ref_all = torch.stack([torch.cat([colbert_scores(qq[None], dd[None], backend="torch")[0] for dd in pd])
                           for qq in pq])
    torch.testing.assert_close(maxsim_all(q, d, m), ref_all, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------- intentional differences
def test_difference_default_markers(bert):
    """PyLate's default markers are new tokens "[Q] " / "[D] " (added to the vocab, their embedding
    rows freshly initialised); dr-lab uses BERT's [unused0] / [unused1] as the original ColBERT code
    (PyLate uses those too, but only when loading a stanford-nlp ColBERT checkpoint)."""
    from retrievers.colbert import D_MARKER, Q_MARKER

    pl = _pylate(bert)
    dr = _drlab(bert)
    assert (pl.query_prefix, pl.document_prefix) == ("[Q] ", "[D] ")
    assert (Q_MARKER, D_MARKER) == ("[unused0]", "[unused1]")
    assert pl.query_prefix_id >= dr.backbone.config.vocab_size  # a new row
    assert dr.q_id < dr.backbone.config.vocab_size and dr.d_id < dr.backbone.config.vocab_size
    # the other defaults agree: lengths 32 / 180, projection 128, expansion on and not attended
    assert (pl.query_length, pl.document_length) == (32, 180)
    assert pl.do_query_expansion is True and pl.attend_to_expansion_tokens is False
    from retrievers.colbert import ColBERT

    sig = inspect.signature(ColBERT.__init__).parameters
    assert (sig["query_max_len"].default, sig["doc_max_len"].default, sig["dim"].default) == (32, 180, 128)
    assert inspect.signature(type(pl).__init__).parameters["bias"].default is False  # bias-free, as dr-lab


def test_difference_padded_batch_maxsim():
    """PyLate's ``colbert_scores(..., documents_mask=...)`` (used by its losses and by
    ``pylate.rank.rerank``, which zero-pads) *multiplies* masked similarities by 0, so a masked or
    padded doc position acts as a similarity-0 token: a query token whose best real match is
    negative scores 0. dr-lab masks with -inf (exact ``max`` over the real doc tokens, the paper's
    definition and ColBERTv2's ``colbert_score_reduce``); it equals PyLate on unpadded inputs."""
    from pylate.scores import colbert_scores

    from retrievers.colbert import maxsim_all

    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    d = torch.tensor([[[-0.6, -0.8], [0.6, -0.8], [0.0, 0.0]]])  # 3rd position masked (punctuation / pad)
    m = torch.tensor([[True, True, False]])
    assert maxsim_all(q, d, m).item() == pytest.approx(0.6 - 0.8)  # best real doc token per query token
    assert colbert_scores(q, d, documents_mask=m.float(), backend="torch").item() == pytest.approx(0.6 + 0.0)
    assert colbert_scores(q, d[:, :2], backend="torch").item() == pytest.approx(maxsim_all(q, d, m).item())


def test_difference_oov_punctuation_skiplist(tmp_path):
    """PyLate builds its skiplist with ``convert_tokens_to_ids``: a punctuation character missing from
    the vocab maps to [UNK], so PyLate drops every [UNK] document token. dr-lab skips only punctuation
    that is a real single vocab token. (BERT's uncased vocab, all-MiniLM-L6-v2's, holds all 32 ASCII
    punctuation characters, so real checkpoints are not affected.)"""
    bert = make_tiny_bert(tmp_path / "nopunct", DOCS, hidden=16, seed=1, punctuation=False)
    dr = _drlab(bert)
    pl = _pylate(bert, query_prefix="[unused0]", document_prefix="[unused1]", query_length=QL, document_length=DL)
    unk = dr.tokenizer.unk_token_id
    assert unk in pl.skiplist and unk not in dr.skip_ids
    docs = ["penguins zzzqqq huddle"]  # an OOV word -> [UNK]
    batch = dr.tokenize_docs(docs)
    with torch.no_grad():
        _, keep = dr.doc(docs)
    is_unk = batch["input_ids"] == unk
    assert is_unk.any()
    ref = pl.skiplist_mask(batch["input_ids"], pl.skiplist) & batch["attention_mask"].bool()
    assert keep[is_unk].all() and not ref[is_unk].any()
    assert torch.equal(keep[~is_unk], ref[~is_unk])


def test_difference_doc_pad_id(pair):
    """PyLate sets ``tokenizer.pad_token_id = mask_token_id``, so documents padded within a batch get
    [MASK] ids; dr-lab pads them with [PAD]. Those positions are unattended and masked out, so the
    kept embeddings are the same (test_doc_embeddings_match_pylate)."""
    dr, pl = pair
    mine, ref = dr.tokenize_docs(DOCS), pl.tokenize(DOCS, is_query=False)
    pad = mine["attention_mask"] == 0
    assert pad.any()
    assert (mine["input_ids"][pad] == dr.tokenizer.pad_token_id).all()
    assert (ref["input_ids"][pad] == dr.tokenizer.mask_token_id).all()


def test_difference_attend_to_expansion_tokens(bert, pair):
    """dr-lab always keeps the query's pad attention mask ([MASK] positions are not attended to as
    keys), PyLate's default; PyLate's ``attend_to_expansion_tokens=True`` (no dr-lab switch) changes
    every query vector, so the parity above is sensitive to this choice."""
    dr, _ = pair
    pl = _pylate(bert, query_prefix="[unused0]", document_prefix="[unused1]", query_length=QL, document_length=DL,
                 attend_to_expansion_tokens=True)
    with torch.no_grad():
        pl[1].linear.weight.copy_(dr.linear.weight)
        mine = dr.query(QUERIES[:3])
    ref = pl.tokenize(QUERIES[:3], is_query=True)
    assert torch.equal(ref["input_ids"], dr.tokenize_queries(QUERIES[:3])["input_ids"])
    assert ref["attention_mask"].all() and not dr.tokenize_queries(QUERIES[:3])["attention_mask"].all()
    other = _pl_encode(pl, QUERIES[:3], is_query=True)["token_embeddings"]
    assert (mine - other).abs().amax() > 1e-3


def test_environment_unshimmed_pylate_does_not_expand_queries(bert):
    """Why the shim above exists: with sentence-transformers >= 6 (PyLate 1.6.0 pins 5.3.0), PyLate's
    ``ColBERT.tokenize(is_query=True)`` pads queries to the batch's longest only, not to
    ``query_length``: a PyLate model built here without the shim gets no fixed [MASK] expansion."""
    from pylate import models
    from sentence_transformers.models import Transformer

    if "padding" in inspect.signature(Transformer.tokenize).parameters:
        pytest.skip("the installed sentence-transformers honours padding='max_length'")
    word = Transformer(str(bert))
    pl = models.ColBERT(modules=[word, models.Dense(32, DIM, bias=False)], device="cpu", query_prefix="[unused0]",
                        document_prefix="[unused1]", query_length=QL, document_length=DL)
    assert pl.tokenize(["bees?"], is_query=True)["input_ids"].shape[1] == 5 < QL


def test_control_script_pylate_teacher_scores_and_trains(bert):
    """scripts/colbert_control.py's ``pylate`` variant: PyLate's ColBERT (its defaults: new [Q]/[D] markers)
    behind dr-lab's score_pairs, with dr-lab's projection weights; one group-CE step changes its scores."""
    from retrievers.colbert import group_ce_loss
    from scripts.colbert_control import PyLateTeacher

    lin = torch.nn.Linear(_drlab(bert).backbone.config.hidden_size, DIM, bias=False)
    t = PyLateTeacher(str(bert), lin, QL, DL)
    assert torch.equal(t.m[1].linear.weight, lin.weight)
    qs, ds = [QUERIES[0]] * 2 + [QUERIES[1]] * 2, DOCS[:4]
    s0 = t.score_pairs(qs, ds)
    assert s0.shape == (4,) and torch.isfinite(s0).all() and s0.requires_grad
    opt = torch.optim.AdamW(t.parameters(), lr=1e-2)
    group_ce_loss(s0.view(2, 2)).backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(t.score_pairs(qs, ds), s0.detach())
