"""Oracles ported from the reference code of TCT-ColBERT's in-batch KD and ANCE's negative sampling,
each compared with dr-lab on identical inputs (tiny random models, no network).

TCT-ColBERT (Lin, Yang & Lin, RepL4NLP 2021), reference: castorini/tct_colbert @ 4ce5843bde8d38d9005fab62e8a18fa939c12f73
  * train/loss.py ``batch_max_sim_softmax_loss``: the [B, 2B] logits of every query against every passage of the
    batch (the B positives ``doc1`` first, then the B negatives ``doc0``), MaxSim with exact-zero similarities
    (padding) replaced by -15; the student's pooled [B, 1, H] embeddings go through the same function (= dot product).
  * train/model_fn.py ``create_model`` (lines 123-142): ``temperature = 0.25`` on the teacher's logits only,
    ``softmax`` of the student's raw logits, ``tf.keras.losses.KLDivergence()(teacher_probs, student_probs)``
    (probabilities clipped to [1e-7, 1], summed over the 2B columns, averaged over the B rows);
    ``train_model == 'student'`` trains on that KL alone (no hard-label cross-entropy), and
    train/optimization.py (lines 71-73) updates only the Student's variables (the teacher is frozen).
  dr-lab: retrievers/losses.py ``InBatchKD`` / ``tct_inbatch_kd`` (``teacher_input = "batch"``), the distill stage's
  ``loss_fn`` (pipelines/stages/distill.py: ``teacher.score_all(batch.queries, batch.docs)`` under no_grad) and
  ``retrievers.contrastive.contrastive_step`` (the retriever1/distill trainer's step).
  Equivalent configuration: ``InBatchKD(teacher_temperature=0.25, gamma=0)``, student ``similarity: dot``,
  ``temperature: 1.0``, one hard negative per query (``n_negatives: 1``: group 2, the reference's triples).

ANCE (Xiong et al., ICLR 2021), reference: microsoft/ANCE @ c8439dfc9ab178457dd359d2ed7c403f2f3d7b6f
  * drivers/run_ann_data_gen.py ``generate_new_ann``: ``faiss.IndexFlatIP`` over the passage embeddings,
    ``cpu_index.search(query_embedding, topk_training)`` (commands/run_ann_data_gen.sh: ``--topk_training 200
    --negative_sample 20``);
  * ``GenerateNegativePassaageID`` (lines 339-396): per query, ``random.shuffle`` of the top-k positions, then the
    first ``negative_sample`` passages that are not the query's positive (and not already taken) -- a uniform
    sample without replacement of n negatives from the top-k minus the positive. The driver never seeds Python's
    ``random`` (no ``set_seed`` call in run_ann_data_gen.py), so each ANN generation draws afresh;
    ``load_positive_ids`` keeps one positive per train query (the last qrels line wins).
  dr-lab: retrievers/mining.py (``DenseMiner``: FAISS search + ``select_negatives``: ranks ``window`` counted before
  positives are removed, ``n_per_query`` sampled with ``numpy.random.default_rng([seed, i])``) and retrievers/ance.py
  (``AnnRefresher``: the refresh re-mines with the current weights). Equivalent configuration: ``depth: 200``,
  ``window: [1, 200]``, ``n_per_query: 20``. Python's and NumPy's RNG streams cannot match, so the sampled sets are
  compared through the candidate window, the exclusion of positives and uniform-sampling statistics.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DOCS, TINY_QUERIES, TINY_TEST_QRELS, TINY_TRAIN_QRELS, component, compose, make_tiny_bert

from retrievers.colbert import maxsim_all
from retrievers.contrastive import Batch, ContrastiveData, contrastive_step
from retrievers.losses import InBatchKD
from retrievers.mining import DenseMiner, select_negatives

REF_TCT = "castorini/tct_colbert@4ce5843bde8d38d9005fab62e8a18fa939c12f73"
REF_ANCE = "microsoft/ANCE@c8439dfc9ab178457dd359d2ed7c403f2f3d7b6f"


# =========================================================================== TCT-ColBERT: the reference, ported

TCT_TEACHER_TEMPERATURE = 0.25  # train/model_fn.py:127
KERAS_EPSILON = 1e-7  # tf.keras.backend.epsilon(): KLDivergence clips both distributions to [1e-7, 1]


def ref_batch_max_sim_logits(query_emb: torch.Tensor, doc0_emb: torch.Tensor, doc1_emb: torch.Tensor) -> torch.Tensor:
    """train/loss.py ``batch_max_sim_softmax_loss``'s ``logits`` [B, 2B]: columns = positives (doc1), then negatives."""
    batch_size, doc_length, hidden_size = doc0_emb.shape
    doc0 = doc0_emb.reshape(-1, hidden_size)
    doc1 = doc1_emb.reshape(-1, hidden_size)
    doc_emb = torch.cat([doc1, doc0], dim=0)  # 2*B*doc_len, H
    doc_emb = doc_emb.repeat(batch_size, 1).reshape(batch_size, -1, hidden_size)  # tf.tile + reshape
    logits = query_emb @ doc_emb.transpose(1, 2)  # B, q_len, 2*B*doc_len
    logits = logits.reshape(batch_size, -1, 2 * batch_size, doc_length)
    logits = torch.where(logits == 0, torch.zeros_like(logits) - 15, logits)  # "remove_zero"
    logits = logits.permute(0, 2, 1, 3)  # B, 2B, q_len, doc_len
    return logits.max(dim=-1).values.sum(dim=-1)


def ref_keras_kl(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """``tf.keras.losses.KLDivergence()(y_true, y_pred)`` with its default SUM_OVER_BATCH_SIZE reduction."""
    y_true = y_true.clamp(KERAS_EPSILON, 1)
    y_pred = y_pred.clamp(KERAS_EPSILON, 1)
    return (y_true * torch.log(y_true / y_pred)).sum(dim=-1).mean()


def ref_tct_student_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """train/model_fn.py ``create_model`` with ``train_model='student'``: the KL of the in-batch softmaxes only."""
    t = torch.softmax(teacher_logits / TCT_TEACHER_TEMPERATURE, dim=-1)
    s = torch.softmax(student_logits, dim=-1)
    return ref_keras_kl(t, s)


def ref_columns_to_drlab(b: int) -> torch.Tensor:
    """dr-lab's column j (example j // 2, positive if j is even) is the reference's column (j % 2) * B + j // 2."""
    j = torch.arange(2 * b)
    return (j % 2) * b + j // 2


def _teacher_tokens(gen: torch.Generator, n: int, length: int, dim: int, dtype, pad_from: list[int] | None = None):
    """L2-normalised token vectors; positions >= pad_from[i] zeroed (padding, as the reference's mask does)."""
    x = torch.nn.functional.normalize(torch.randn(n, length, dim, generator=gen, dtype=dtype), dim=-1)
    mask = torch.ones(n, length, dtype=torch.bool)
    for i, p in enumerate(pad_from or []):
        mask[i, p:] = False
    return x * mask.unsqueeze(-1), mask


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("b", [1, 3, 8])
def test_tct_inbatch_kd_equals_reference_loss_and_gradients(b):
    """Same embeddings -> dr-lab's (student scores, teacher score_all MaxSim, InBatchKD) vs the reference's loss:
    equal loss and equal gradients w.r.t. every student embedding (float64, 1e-12)."""
    g = torch.Generator().manual_seed(100 + b)
    f64 = torch.float64
    h, lq, ld, dim = 6, 2, 7, 4  # lq = 2: teacher probabilities at T = 0.25 stay above Keras' 1e-7 clip
    q = torch.randn(b, h, generator=g, dtype=f64)
    pos = torch.randn(b, h, generator=g, dtype=f64)
    neg = torch.randn(b, h, generator=g, dtype=f64)
    tq = torch.nn.functional.normalize(torch.randn(b, lq, dim, generator=g, dtype=f64), dim=-1)
    tpos, mpos = _teacher_tokens(g, b, ld, dim, f64, pad_from=[ld - (i % 3) for i in range(b)])
    tneg, mneg = _teacher_tokens(g, b, ld, dim, f64, pad_from=[ld - ((i + 1) % 4) for i in range(b)])

    # the reference: docs in two blocks (positives doc1, negatives doc0), teacher / 0.25, student raw
    ref_in = [x.clone().requires_grad_(True) for x in (q, pos, neg)]
    t_ref = ref_batch_max_sim_logits(tq, tneg, tpos)
    s_ref = ref_batch_max_sim_logits(ref_in[0][:, None], ref_in[2][:, None], ref_in[1][:, None])
    loss_ref = ref_tct_student_loss(t_ref, s_ref)
    loss_ref.backward()

    # dr-lab: a group-2 batch (example i owns columns 2i = positive, 2i+1 = negative)
    dr_in = [x.clone().requires_grad_(True) for x in (q, pos, neg)]
    docs = torch.stack([dr_in[1], dr_in[2]], dim=1).reshape(2 * b, h)
    scores = dr_in[0] @ docs.T  # BiEncoder.score with similarity dot, temperature 1
    t_docs = torch.stack([tpos, tneg], dim=1).reshape(2 * b, ld, dim)
    t_mask = torch.stack([mpos, mneg], dim=1).reshape(2 * b, ld)
    teacher = maxsim_all(tq, t_docs, t_mask)  # ColBERT.score_all's MaxSim
    batch = Batch([f"q{i}" for i in range(b)], ["-"] * b, [f"d{j}" for j in range(2 * b)], ["-"] * (2 * b), 2,
                  [frozenset({f"d{2 * i}"}) for i in range(b)])
    loss = InBatchKD(teacher_temperature=TCT_TEACHER_TEMPERATURE, gamma=0.0)(scores, teacher, batch)
    loss.backward()

    perm = ref_columns_to_drlab(b)
    torch.testing.assert_close(teacher, t_ref[:, perm], rtol=0, atol=1e-12)  # same N x 2N teacher matrix
    torch.testing.assert_close(scores, s_ref[:, perm], rtol=0, atol=1e-12)
    assert loss.item() > 1e-3  # a non-trivial case
    for logits in (t_ref / TCT_TEACHER_TEMPERATURE, s_ref):  # the Keras clip is inactive (see the clipping test)
        assert torch.softmax(logits.detach(), -1).min() > KERAS_EPSILON
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    for name, a, r in zip(("query", "positive", "negative"), dr_in, ref_in):
        assert r.grad.abs().max() > 1e-4, name
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_tct_teacher_temperature_paper_recipe_and_family_default():
    """experiment=tct-colbert-v2-msmarco divides the teacher's MaxSim by 0.25, as the reference does, and then
    equals it; the family default (conf/loss/inbatch_kd.yaml, 1.0: the CPU rows were measured so) differs."""
    cfg = compose(["experiment=tct-colbert-v2-msmarco"], Path("/tmp/drlab-oracle-compose"))
    loss_cfg = cfg.pipeline.distill.loss
    assert loss_cfg._target_ == "retrievers.losses.InBatchKD"
    assert float(loss_cfg.gamma) == 0.0  # as the reference: no hard-label CE
    assert float(loss_cfg.teacher_temperature) == TCT_TEACHER_TEMPERATURE
    family = compose(["model=tct_colbert"], Path("/tmp/drlab-oracle-compose")).pipeline.distill.loss
    assert float(family.teacher_temperature) == 1.0
    enc = cfg.model.encoder  # the student is scored as the reference's: raw dot product of mean-pooled vectors
    assert (enc.similarity, float(enc.temperature), enc.normalize, enc.pooling, enc.skip_prefix_tokens) == (
        "dot", 1.0, False, "mean_skip_prefix", 4)
    assert int(cfg.pipeline.distill.n_negatives) == 1  # group 2 = the reference's (q, d+, d-) triples
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 8, generator=g, dtype=torch.float64), 0.5 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    assert torch.softmax(t / TCT_TEACHER_TEMPERATURE, -1).min() > KERAS_EPSILON  # the clip is inactive
    batch = Batch(list("abcd"), ["-"] * 4, [str(j) for j in range(8)], ["-"] * 8, 2, [frozenset()] * 4)
    perm = ref_columns_to_drlab(4)
    ref = ref_tct_student_loss(t[:, torch.argsort(perm)], s[:, torch.argsort(perm)])
    recipe = InBatchKD(float(loss_cfg.teacher_temperature), float(loss_cfg.gamma))(s, t, batch)
    default = InBatchKD(float(family.teacher_temperature), float(family.gamma))(s, t, batch)
    torch.testing.assert_close(recipe, ref, rtol=1e-12, atol=1e-12)
    assert abs(default.item() - ref.item()) > 0.1


def test_tct_gamma_adds_the_students_cross_entropy_which_the_reference_does_not_train_on():
    """Documented difference: ``gamma > 0`` adds ``gamma x CE`` of the student's logits (positive = its own column)
    to the KL; the reference computes that CE (``tct_student_loss``) but trains the student on the KL alone."""
    g = torch.Generator().manual_seed(1)
    b = 3
    s, t = torch.randn(b, 2 * b, generator=g, dtype=torch.float64), torch.randn(b, 2 * b, generator=g,
                                                                                  dtype=torch.float64)
    batch = Batch(list("abc"), ["-"] * b, [str(j) for j in range(2 * b)], ["-"] * (2 * b), 2, [frozenset()] * b)
    kd = InBatchKD(TCT_TEACHER_TEMPERATURE, 0.0)(s, t, batch)
    mixed = InBatchKD(TCT_TEACHER_TEMPERATURE, 0.5)(s, t, batch)
    # the reference's CE: softmax_cross_entropy_with_logits(labels=eye(B, 2B), logits) on its column layout (soft=1)
    s_ref = s[:, torch.argsort(ref_columns_to_drlab(b))]
    ce_ref = -(torch.eye(b, 2 * b, dtype=s.dtype) * torch.log_softmax(s_ref, -1)).sum(-1).mean()
    torch.testing.assert_close(mixed - kd, 0.5 * ce_ref, rtol=1e-12, atol=1e-12)


def test_tct_kl_is_exact_where_the_references_clipping_saturates():
    """Documented difference: Keras clips probabilities to [1e-7, 1] before the KL; dr-lab computes the KL in log
    space. Identical while every probability is >= 1e-7 (the other tests); when the student puts < 1e-7 on the
    teacher's choice, the reference's loss is capped and its gradient vanishes, dr-lab's is not."""
    t = torch.tensor([[4.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # teacher: p = [~1, 1e-7, ...] at T = 0.25
    s_ref = torch.tensor([[-30.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    s_dr = s_ref.detach().clone().requires_grad_(True)
    batch = Batch(["a"], ["-"], ["0", "1", "2", "3"], ["-"] * 4, 4, [frozenset()])
    ref = ref_tct_student_loss(t, s_ref)
    ours = InBatchKD(TCT_TEACHER_TEMPERATURE, 0.0)(s_dr, t, batch)
    ref.backward()
    ours.backward()
    assert ours.item() > 30 > 17 > ref.item()  # log(1/3e-14) vs the capped log(1/1e-7)
    assert s_ref.grad.abs().max() < 1e-5 < 0.9 < s_dr.grad.abs().max()


# --------------------------------------------------------------------------- the distill step, tiny models

TCT_DOCS = [f"{t}. {x}" for _, t, x in TINY_DOCS]
TCT_QUERIES = [q for _, q in TINY_QUERIES]


@pytest.fixture(scope="module")
def tct_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tct")
    texts = TCT_DOCS + TCT_QUERIES + ["[Q] [D]"]
    student_ckpt = make_tiny_bert(root / "student", texts, hidden=32, seed=11, punctuation=True)
    teacher_ckpt = make_tiny_bert(root / "teacher", texts, hidden=32, seed=12, punctuation=True)
    student = component(["model=tct_colbert"], "model.encoder", checkpoint=str(student_ckpt), normalize=False,
                        similarity="dot", temperature=1.0, query_max_len=16, doc_max_len=32)
    teacher = component(["model=tct_colbert"], "model.teacher", checkpoint=str(teacher_ckpt), dim=8,
                        query_max_len=12, doc_max_len=24)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("grad_cache", [False, True])
def test_tct_distill_step_equals_reference_on_tiny_student_and_colbert_teacher(tct_models, grad_cache):
    """One distill step of dr-lab (contrastive_step + the distill stage's loss_fn: ColBERT score_all over the whole
    batch, InBatchKD(0.25, 0)) vs the reference's loss on the same embeddings: the loss to 1e-5 relative and every
    student parameter gradient to rtol 1e-4 / atol 1e-6 (float32; summation order differs); the teacher gets none."""
    student, teacher = tct_models
    b = 4
    queries = TCT_QUERIES[:b]
    pos, neg = TCT_DOCS[:b], TCT_DOCS[b:2 * b]
    docs, ids = [], []
    for i in range(b):
        docs += [pos[i], neg[i]]
        ids += [f"p{i}", f"n{i}"]
    batch = Batch([f"q{i}" for i in range(b)], queries, ids, docs, 2, [frozenset({f"p{i}"}) for i in range(b)])

    # dr-lab: pipelines/stages/distill.py's loss_fn for a "batch" teacher
    loss = InBatchKD(teacher_temperature=TCT_TEACHER_TEMPERATURE, gamma=0.0)
    assert loss.teacher_input == "batch"

    def teacher_of(bt):
        with torch.no_grad():
            return teacher.score_all(bt.queries, bt.docs)

    def loss_fn(scores, bt):
        return loss(scores, teacher_of(bt).to(scores.device), bt)

    student.train()
    student.zero_grad(set_to_none=True)
    got = contrastive_step(student, batch, batch, device=torch.device("cpu"), loss_fn=loss_fn,
                           grad_cache=grad_cache, chunk_size=3)
    g_dr = _grads(student)
    assert not any(p.grad is not None for p in teacher.parameters())

    # the oracle: the same student embeddings and teacher token vectors through the reference's functions
    student.zero_grad(set_to_none=True)
    q = student.embed(student.tokenize(queries, "query"), "query").float()
    d = student.embed(student.tokenize(docs, "doc"), "doc").float()
    with torch.no_grad():
        tq = teacher.query(queries)
        td, _ = teacher.doc(docs)  # padding / punctuation vectors are zero, as the reference's mask makes them
    t_ref = ref_batch_max_sim_logits(tq, td[1::2], td[0::2])
    s_ref = ref_batch_max_sim_logits(q[:, None], d[1::2, None], d[0::2, None])
    want = ref_tct_student_loss(t_ref, s_ref)
    want.backward()
    g_ref = _grads(student)

    perm = ref_columns_to_drlab(b)
    torch.testing.assert_close(teacher_of(batch), t_ref[:, perm], rtol=1e-5, atol=1e-5)
    assert want.item() > 1e-3
    assert got == pytest.approx(want.item(), rel=1e-5)
    assert len(g_ref) > 10 and set(g_dr) == set(g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_dr[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert max(float(g.abs().max()) for g in g_ref.values()) > 1e-3  # gradients are not trivially zero


# =========================================================================== ANCE: the reference, ported

ANCE_TOPK, ANCE_N = 200, 20  # commands/run_ann_data_gen.sh: --topk_training 200 --negative_sample 20


def ref_ann_search(passage_embedding: np.ndarray, query_embedding: np.ndarray, top_k: int) -> np.ndarray:
    """generate_new_ann: ``cpu_index = faiss.IndexFlatIP(dim); cpu_index.add(...); _, I = cpu_index.search(...)``."""
    import faiss

    cpu_index = faiss.IndexFlatIP(passage_embedding.shape[1])
    cpu_index.add(np.ascontiguousarray(passage_embedding, dtype=np.float32))
    _, I = cpu_index.search(np.ascontiguousarray(query_embedding, dtype=np.float32), top_k)
    return I


def ref_generate_negative_passage_ids(negative_sample, query_embedding2id, passage_embedding2id,
                                      training_query_positive_id, I_nearest_neighbor, effective_q_id,
                                      rnd: random.Random, select_topk: bool = False):
    """drivers/run_ann_data_gen.py ``GenerateNegativePassaageID`` (the module-level ``random`` -> ``rnd``)."""
    query_negative_passage = {}
    for query_idx in range(I_nearest_neighbor.shape[0]):
        query_id = query_embedding2id[query_idx]
        if query_id not in effective_q_id:
            continue
        pos_pid = training_query_positive_id[query_id]
        top_ann_pid = I_nearest_neighbor[query_idx, :].copy()
        if select_topk:
            selected_ann_idx = top_ann_pid[:negative_sample + 1]
        else:
            negative_sample_I_idx = list(range(I_nearest_neighbor.shape[1]))
            rnd.shuffle(negative_sample_I_idx)
            selected_ann_idx = top_ann_pid[negative_sample_I_idx]
        query_negative_passage[query_id] = []
        neg_cnt = 0
        for idx in selected_ann_idx:
            neg_pid = passage_embedding2id[idx]
            if neg_pid == pos_pid:
                continue
            if neg_pid in query_negative_passage[query_id]:
                continue
            if neg_cnt >= negative_sample:
                break
            query_negative_passage[query_id].append(neg_pid)
            neg_cnt += 1
    return query_negative_passage


def _ref_on_ranked(ranked: dict[str, list[str]], positive: dict[str, str], n: int, rnd: random.Random):
    """The reference on dr-lab-style ranked id lists (one row of I per query, passage ids = list positions)."""
    out = {}
    for qid, ids in ranked.items():
        I = np.arange(len(ids))[None, :]
        out.update(ref_generate_negative_passage_ids(n, [qid], ids, positive, I, {qid}, rnd))
    return out


def _chi2_upper_tail(stat: float, df: int) -> float:
    """P(X >= stat), X ~ chi2(df), Wilson-Hilferty approximation (good to ~1e-3 relative at df >= 30)."""
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _synthetic_ranked(pos_rank: int | None, top_k: int = ANCE_TOPK) -> tuple[list[str], str]:
    ids = [f"p{r:03d}" for r in range(1, top_k + 1)]
    pos = "gold"
    if pos_rank is not None:
        ids[pos_rank - 1] = pos
    return ids, pos


# --------------------------------------------------------------------------- candidate window


@pytest.mark.parametrize("pos_rank", [1, 37, 200, None])
def test_ance_candidate_window_is_the_references(pos_rank):
    """Whole window (no sampling): dr-lab's window [1, 200] == the reference's top-200 minus the positive
    (ranks counted before the positive is removed: 199 candidates when it is retrieved, else 200)."""
    ids, pos = _synthetic_ranked(pos_rank)
    ranked = {"q": [(d, 1.0 - r / 1000) for r, d in enumerate(ids)]}
    ours, stats = select_negatives(ranked, {"q": [pos]}, (1, ANCE_TOPK), None, seed=0)
    ref = _ref_on_ranked({"q": ids}, {"q": pos}, n=10_000, rnd=random.Random(0))  # n >= window: keeps all
    want = len(ids) - (pos_rank is not None)
    assert len(ref["q"]) == len(ours["q"]) == want
    assert {c["id"] for c in ours["q"]} == set(ref["q"])
    assert pos not in set(ref["q"]) and [c["rank"] for c in ours["q"]] == sorted(c["rank"] for c in ours["q"])


def test_ance_mining_on_a_tiny_encoder_matches_reference_search_and_selection(tmp_path):
    """The full mining path on identical embeddings: dr-lab's DenseMiner (FAISS Flat over its fp16 shards) ranks
    exactly as the reference's IndexFlatIP top-k; the negatives it samples are n distinct members of the
    reference's candidate window (top-k minus the positive), as the reference's are."""
    ckpt = make_tiny_bert(tmp_path / "bert", [f"{t} {x}" for _, t, x in TINY_DOCS] + [q for _, q in TINY_QUERIES],
                          hidden=32, seed=5)
    enc = component(["model=ance"], "model.encoder", checkpoint=str(ckpt), normalize=False, similarity="dot",
                    temperature=1.0, query_max_len=16, doc_max_len=32)
    qrels = {**TINY_TEST_QRELS, **TINY_TRAIN_QRELS}
    positives = {q: list(d) for q, d in qrels.items()}
    queries = {q: t for q, t in TINY_QUERIES if q in qrels}
    doc_ids = [d for d, _, _ in TINY_DOCS]
    top_k, n = 10, 4
    miner = DenseMiner(doc_ids=doc_ids, doc_texts=[f"{t} {x}" for _, t, x in TINY_DOCS], queries=queries,
                       positives=positives, depth=top_k, window=(1, top_k), n_per_query=n, seed=0, progress=False)
    ranked, negs, _ = miner(enc, tmp_path / "mine")

    # the reference's search, on the same stored passage vectors and the same query vectors
    p_emb = np.concatenate([np.load(p) for p in sorted((tmp_path / "mine" / "embeddings").glob("shard_*.npy"))])
    qids = sorted(queries)
    q_emb = enc.encode([queries[x] for x in qids], "query", progress=False)
    I = ref_ann_search(p_emb.astype(np.float32), q_emb, top_k)
    for r, qid in enumerate(qids):
        assert [d for d, _ in ranked[qid]] == [doc_ids[i] for i in I[r]], qid

    pos_single = {q: v[0] for q, v in positives.items()}
    window = ref_generate_negative_passage_ids(10_000, qids, doc_ids, pos_single, I, set(qids), random.Random(0))
    sampled = ref_generate_negative_passage_ids(n, qids, doc_ids, pos_single, I, set(qids), random.Random(0))
    for qid in qids:
        ours = [c["id"] for c in negs[qid]]
        assert len(ours) == len(set(ours)) == len(sampled[qid]) == n
        assert set(ours) <= set(window[qid]) and set(sampled[qid]) <= set(window[qid])
        assert not set(ours) & set(positives[qid])
        assert {c["id"] for c in select_negatives({qid: ranked[qid]}, positives, (1, top_k), None, 0)[0][qid]} == \
            set(window[qid])


# --------------------------------------------------------------------------- sampling distribution


def test_ance_sampling_is_uniform_without_replacement_like_the_reference():
    """RNG streams cannot match (Python random.shuffle vs numpy default_rng), so the distribution is compared:
    R = 1500 draws of n = 20 from the 199 candidates of a top-200 list, for dr-lab (R queries = R independent
    streams [seed, i]) and for the reference (R seeds): each draw is 20 distinct non-positives of the window; each
    candidate's inclusion count passes a chi-square test of uniformity (n/199 each); adjacent-rank pairs are
    co-sampled at the rate of a uniform 20-subset, n(n-1)/(199*198); and the two count vectors agree (two-sample
    chi-square). A top-n or rank-biased selection fails all three."""
    ids, pos = _synthetic_ranked(pos_rank=37)
    cands = [d for d in ids if d != pos]
    index = {d: k for k, d in enumerate(cands)}
    m, n, reps = len(cands), ANCE_N, 1500
    ranked = {f"q{i:05d}": [(d, 1.0 - r / 1000) for r, d in enumerate(ids)] for i in range(reps)}
    ours, _ = select_negatives(ranked, {q: [pos] for q in ranked}, (1, ANCE_TOPK), n, seed=7)
    draws = {"dr-lab": [[c["id"] for c in v] for v in ours.values()],
             "reference": [_ref_on_ranked({"q": ids}, {"q": pos}, n, random.Random(k))["q"] for k in range(reps)]}
    counts = {}
    for who, sets in draws.items():
        c = np.zeros(m)
        pairs = 0
        for s in sets:
            assert len(s) == len(set(s)) == n and pos not in s and set(s) <= set(cands), who
            k = np.array(sorted(index[d] for d in s))
            c[k] += 1
            pairs += int(np.sum(np.diff(k) == 1))
        expected = reps * n / m
        chi2 = float(((c - expected) ** 2 / expected).sum())
        assert _chi2_upper_tail(chi2, m - 1) > 1e-4, (who, chi2)
        pair_rate = pairs / (reps * (m - 1))
        want = n * (n - 1) / (m * (m - 1))
        assert abs(pair_rate - want) < 5 * math.sqrt(want / (reps * (m - 1))) + 1e-4, (who, pair_rate, want)
        counts[who] = c
    a, b = counts["dr-lab"], counts["reference"]
    two_sample = float(((a - b) ** 2 / (a + b)).sum())
    assert _chi2_upper_tail(two_sample, m - 1) > 1e-4, two_sample
    # and it can fail: the top-n choice is far from uniform
    top = np.zeros(m)
    top[:n] = reps
    assert _chi2_upper_tail(float(((top - reps * n / m) ** 2 / (reps * n / m)).sum()), m - 1) < 1e-12


def test_ance_whole_window_pool_then_one_negative_per_epoch_is_uniform():
    """experiment=ance-msmarco keeps the whole window (n_per_query: null) and samples n_negatives=1 per example per
    epoch (ContrastiveData); each negative is then a uniform draw from the reference's candidate window, the
    marginal of the reference's 20-of-199 sample (difference: one negative per example per epoch, not 20 triples
    per ANN generation)."""
    ids, pos = _synthetic_ranked(pos_rank=5)
    ranked = {"q": [(d, 1.0 - r / 1000) for r, d in enumerate(ids)]}
    pool = {q: [c["id"] for c in v] for q, v in select_negatives(ranked, {"q": [pos]}, (1, ANCE_TOPK), None, 0)[0]
            .items()}
    data = ContrastiveData({"q": "x"}, {"q": [pos]}, {d: d for d in ids}, pool, 1)
    m, epochs = len(pool["q"]), 4000
    c = np.zeros(m)
    index = {d: k for k, d in enumerate(pool["q"])}
    for e in range(epochs):
        (b,) = data.epoch_batches(e, 3, 1)
        assert b.doc_ids[0] == pos and b.doc_ids[1] in index
        c[index[b.doc_ids[1]]] += 1
    chi2 = float(((c - epochs / m) ** 2 / (epochs / m)).sum())
    assert _chi2_upper_tail(chi2, m - 1) > 1e-4, chi2


def test_ance_settings_of_the_shipped_configs():
    """experiment=ance-msmarco mines as the reference (search depth 200, window from rank 1 to 200). Documented
    difference: model=ance alone inherits conf/pipeline/mine.yaml's window [3, 200] / 30 per query (the top-2
    are never negatives), unlike the reference's top-200 / 20."""
    paper = compose(["experiment=ance-msmarco"], Path("/tmp/drlab-oracle-compose")).pipeline.mine
    assert int(paper.depth) == ANCE_TOPK and list(paper.window) == [1, ANCE_TOPK] and paper.n_per_query is None
    small = compose(["model=ance"], Path("/tmp/drlab-oracle-compose")).pipeline.mine
    assert list(small.window) == [3, 200] and int(small.n_per_query) == 30


def test_ance_all_judged_positives_are_excluded_the_reference_keeps_one():
    """Documented difference: the reference's load_positive_ids keeps one positive per train query (the last qrels
    line), so a query's other judged positives can be drawn as negatives; dr-lab excludes every judged positive."""
    ids = [f"p{r}" for r in range(10)]
    positives = ["p2", "p6"]  # qrels order: p2 then p6 -> the reference keeps p6
    ref = _ref_on_ranked({"q": ids}, {"q": positives[-1]}, n=10_000, rnd=random.Random(0))
    ours, _ = select_negatives({"q": [(d, -r) for r, d in enumerate(ids)]}, {"q": positives}, (1, 10), None, 0)
    assert "p2" in ref["q"] and "p6" not in ref["q"]
    assert {c["id"] for c in ours["q"]} == set(ids) - set(positives)


# --------------------------------------------------------------------------- the refresh


class _FixedSearchMiner(DenseMiner):
    """A DenseMiner whose ANN search returns fixed ranked lists (as when the weights have not moved)."""

    fixed: dict = {}

    def search(self, encoder, work_dir):
        return {q: list(v) for q, v in self.fixed.items()}


def _fixed_miner(n_queries: int = 20, top_k: int = 50, n: int = 5) -> _FixedSearchMiner:
    ranked = {f"q{i:02d}": [(f"d{i}-{r}", 1.0 - r / 100) for r in range(top_k)] for i in range(n_queries)}
    positives = {q: [v[3][0]] for q, v in ranked.items()}
    miner = _FixedSearchMiner(doc_ids=[], doc_texts=[], queries={q: q for q in ranked}, positives=positives,
                              depth=top_k, window=(1, top_k), n_per_query=n, seed=42, progress=False)
    miner.fixed = ranked
    return miner


def test_ance_refresh_draws_fresh_negatives_each_refresh_and_replays_on_resume(tmp_path):
    """The reference re-shuffles at every ANN generation (an unseeded Python ``random``), so two refreshes over the
    same ranked lists draw independent samples. dr-lab's AnnRefresher must too (the sample of a refresh depends on
    its step), while staying reproducible: a resumed run's refresh at the same step draws the same negatives."""
    from retrievers.ance import AnnRefresher, mine_at_step

    miner = _fixed_miner()
    refresher = AnnRefresher(miner, every=3, work_dir=tmp_path / "a", mode="sync")
    at3 = refresher.request(None, 3)
    at6 = refresher.request(None, 6)
    mined, _ = select_negatives(miner.fixed, miner.positives, miner.window, miner.n_per_query, miner.seed)
    mined = {q: [c["id"] for c in v] for q, v in mined.items()}
    for pool in (at3, at6, mined):
        for q, negs in pool.items():
            window = {d for d, _ in miner.fixed[q]} - set(miner.positives[q])
            assert len(negs) == len(set(negs)) == miner.n_per_query and set(negs) <= window
    # 20 queries x C(49, 5) subsets: equal draws by chance have probability ~1e-120
    assert at3 != at6, "every refresh re-draws the same rank positions"
    assert at3 != mined and at6 != mined, "the refresh re-draws the mine stage's rank positions"
    assert miner.seed == 42  # the miner's own seed is left as it was
    again = AnnRefresher(_fixed_miner(), every=3, work_dir=tmp_path / "b", mode="sync").request(None, 3)
    assert again == at3
    # the async worker (refresh_worker) mines through the same helper, with the step of the request it serves
    _, worker, _ = mine_at_step(_fixed_miner(), None, tmp_path / "c", 6)
    assert {q: [c["id"] for c in v] for q, v in worker.items()} == at6
