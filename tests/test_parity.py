"""Parity with sentence-transformers (a dev dependency): the same tiny model, inputs and seed, and
dr-lab's losses must give sentence-transformers' loss value and parameter gradients.

| dr-lab | reference (sentence-transformers 3.x-6.x) |
|---|---|
| InfoNCE over in-batch + hard negatives (``retrievers.contrastive``) | ``MultipleNegativesRankingLoss`` |
| GradCache (``contrastive_step(grad_cache=True)``) | ``CachedMultipleNegativesRankingLoss`` |
| Margin-MSE (``retrievers.losses.MarginMSE``) | ``MarginMSELoss`` |
| KL(teacher || student) over a group (``retrievers.losses.kl_teacher_student``) | ``DistillKLDivLoss`` |
| cross-encoder teacher scores (``retrievers.cross_encoder``) | ``CrossEncoder``, the same saved weights |

Both sides encode with the same weights: a SentenceTransformer made of the tiny BERT and mean
pooling, and dr-lab's shared-tower BiEncoder built from the same directory (mean pooling, cosine,
temperature 1/20 = sentence-transformers' default scale of 20).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DOCS, TINY_QUERIES, component, make_tiny_bert

st = pytest.importorskip("sentence_transformers", reason="parity tests need the dev extra")

QUERIES = [q for _, q in TINY_QUERIES][:4]
DOCS = [f"{t} {x}" for _, t, x in TINY_DOCS]
POS, NEG = DOCS[:4], DOCS[4:8]
MAX_LEN = 32


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), DOCS + QUERIES, hidden=32, seed=3)


def _st_model(bert):
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(str(bert), max_seq_length=MAX_LEN)
    dim = getattr(word, "get_embedding_dimension", word.get_word_embedding_dimension)()
    model = SentenceTransformer(modules=[word, models.Pooling(dim, "mean")], device="cpu")
    model.train()
    return model


def _drlab_encoder(bert):
    enc = component(["model=pretrained"], "model.encoder", checkpoint=str(bert), pooling="mean", normalize=False,
                    similarity="cos", query_max_len=MAX_LEN, doc_max_len=MAX_LEN)
    enc.cfg["temperature"] = 0.05  # sentence-transformers' scale 20
    enc.train()
    return enc


def _features(model, texts):
    return getattr(model, "preprocess", model.tokenize)(texts)


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _batch():
    from retrievers.contrastive import Batch

    docs, ids = [], []
    for i in range(len(QUERIES)):
        docs += [POS[i], NEG[i]]
        ids += [f"p{i}", f"n{i}"]
    return Batch([f"q{i}" for i in range(len(QUERIES))], QUERIES, ids, docs, 2, [frozenset({f"p{i}"}) for i in range(4)])


def _compare_grads(st_model, enc, rtol=1e-4, atol=5e-5):  # fp32 summation order differs: ~1e-5 of ~1
    g_st = {n.split("model.", 1)[-1]: g for n, g in _grads(st_model).items()}  # 0.auto_model. / 0.model.
    g_dr = _grads(enc.tower("query"))
    common = sorted(set(g_st) & set(g_dr))
    assert len(common) > 10, (sorted(g_st)[:5], sorted(g_dr)[:5])
    for n in common:
        torch.testing.assert_close(g_dr[n], g_st[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("grad_cache", [False, True], ids=["MultipleNegativesRankingLoss", "CachedMNRL"])
def test_infonce_equals_sentence_transformers_mnrl(bert, grad_cache):
    from sentence_transformers.sentence_transformer import losses

    from retrievers.contrastive import contrastive_loss_unmasked, contrastive_step

    st_model = _st_model(bert)
    ref = (losses.CachedMultipleNegativesRankingLoss(st_model, mini_batch_size=3) if grad_cache
           else losses.MultipleNegativesRankingLoss(st_model))
    features = [_features(st_model, QUERIES), _features(st_model, POS), _features(st_model, NEG)]
    st_loss = ref(features, torch.tensor([]))
    st_loss.backward()

    enc = _drlab_encoder(bert)
    b = _batch()
    loss = contrastive_step(enc, b, b, device=torch.device("cpu"), loss_fn=contrastive_loss_unmasked,
                            grad_cache=grad_cache, chunk_size=3)
    assert loss == pytest.approx(float(st_loss.detach()), rel=1e-5)
    _compare_grads(st_model, enc)


def test_margin_mse_equals_sentence_transformers(bert):
    from sentence_transformers.sentence_transformer import losses

    from retrievers.losses import MarginMSE

    st_model = _st_model(bert)
    teacher_margin = torch.tensor([1.5, -0.5, 2.0, 0.25])
    features = [_features(st_model, QUERIES), _features(st_model, POS), _features(st_model, NEG)]
    st_loss = losses.MarginMSELoss(st_model)(features, teacher_margin)  # dot product, as its default

    enc = _drlab_encoder(bert)
    enc.cfg.update(similarity="dot", temperature=1.0)
    b = _batch()
    q = enc.embed(enc.tokenize(b.queries, "query"), "query")
    d = enc.embed(enc.tokenize(b.docs, "doc"), "doc")
    scores = enc.score(q, d)
    teacher = torch.stack([teacher_margin, torch.zeros(4)], dim=1)  # only the margin matters
    loss = MarginMSE()(scores, teacher, b)
    assert float(loss) == pytest.approx(float(st_loss), rel=1e-5)


def test_group_kl_equals_sentence_transformers_distill_kl_div(bert):
    from sentence_transformers.sentence_transformer import losses

    from retrievers.losses import group_scores, kl_teacher_student

    st_model = _st_model(bert)
    teacher = torch.tensor([[3.0, 1.0], [0.5, 0.2], [2.0, -1.0], [0.0, 0.1]])
    features = [_features(st_model, QUERIES), _features(st_model, POS), _features(st_model, NEG)]
    st_loss = losses.DistillKLDivLoss(st_model, temperature=1.0)(features, teacher)

    enc = _drlab_encoder(bert)
    enc.cfg.update(similarity="dot", temperature=1.0)
    b = _batch()
    q = enc.embed(enc.tokenize(b.queries, "query"), "query")
    d = enc.embed(enc.tokenize(b.docs, "doc"), "doc")
    loss = kl_teacher_student(group_scores(enc.score(q, d), b.group), teacher)
    assert float(loss) == pytest.approx(float(st_loss), rel=1e-5)


def test_cross_encoder_scores_equal_sentence_transformers_cross_encoder(bert, tmp_path):
    """The same saved weights: dr-lab's teacher scores = sentence-transformers' CrossEncoder logits.
    (dr-lab truncates only the passage, ``only_second``; the pairs here fit, so both see every token.)"""
    from sentence_transformers import CrossEncoder as STCrossEncoder

    ours = component(["model=simlm", "teacher@model.teacher=cross_encoder"], "model.teacher", checkpoint=str(bert),
                     max_len=64).eval()
    ours.save(tmp_path / "ce")
    ref = STCrossEncoder(str(tmp_path / "ce"), max_length=64, device="cpu", activation_fn=torch.nn.Identity())
    pairs = list(zip(QUERIES, POS)) + list(zip(QUERIES, NEG))
    with torch.no_grad():
        mine = ours.score_pairs([q for q, _ in pairs], [d for _, d in pairs]).float().numpy()
    theirs = ref.predict(pairs, convert_to_numpy=True)
    assert mine.shape == theirs.shape
    assert abs(mine - theirs).max() < 1e-5, (mine, theirs)


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_a_model_saved_by_sentence_transformers_loads_with_its_pooling(tmp_path, mode):
    """sentence-transformers >= 6 writes ``pooling_mode: "mean"`` (one string) where older versions wrote
    ``pooling_mode_mean_tokens: true``; both load, and encode as sentence-transformers does."""
    import numpy as np
    from sentence_transformers import SentenceTransformer, models

    from retrievers.encoder import build_biencoder, read_st_config

    texts = [f"{t} {x}" for _, t, x in TINY_DOCS]
    bert = make_tiny_bert(tmp_path / "bert", texts)
    word = models.Transformer(str(bert), max_seq_length=48)
    st = SentenceTransformer(modules=[word, models.Pooling(32, mode),
                                      models.Normalize()], device="cpu")
    st.save(str(tmp_path / "st"))
    cfg = read_st_config(tmp_path / "st")
    assert cfg["pooling"] == mode and cfg["normalize"] and cfg["doc_max_len"] == 48
    enc = build_biencoder(str(tmp_path / "st"), read_st=True)
    np.testing.assert_allclose(enc.encode(texts, "doc", progress=False), st.encode(texts), atol=1e-5)
