"""Contrastive training (retrievers/training.py, stage retriever1) on tiny random BERTs.

Covers: InfoNCE against a hand computation, BM25 rank-window negatives, negative
sampling, GradCache == full-batch gradients, a short run that lowers the loss,
exact resume after a simulated kill, checkpoints that load in BiEncoder and
sentence-transformers, and the stage end to end (including a SIGKILL and rerun).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_DOCS, TINY_QUERIES, compose, make_tiny_beir

from retrievers.contrastive import (
    Batch,
    ContrastiveData,
    contrastive_loss,
    contrastive_loss_unmasked,
    contrastive_step,
    info_nce,
    window_negatives,
)
from retrievers.encoder import BiEncoder
from retrievers.training import STATE_FILE, TrainArgs, Trainer

# --------------------------------------------------------------------------- tiny models


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def write_vocab(path: Path, texts: list[str] | None = None) -> Path:
    """A WordPiece vocab holding every word of ``texts`` (default: the tiny BEIR set) whole."""
    if texts is None:
        texts = [f"{t} {x}" for _, t, x in TINY_DOCS] + [q for _, q in TINY_QUERIES]
    words = sorted({w for t in texts for w in _words(t)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return path


def tiny_tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    # from a directory holding vocab.txt: works with transformers 4.x and 5.x alike
    vocab = write_vocab(tmp_path / "vocab" / "vocab.txt")
    tok = BertTokenizerFast.from_pretrained(str(vocab.parent), do_lower_case=True)
    assert len(tok) > 50 and "[UNK]" not in tok.tokenize(TINY_DOCS[0][2])
    return tok


def tiny_bert(vocab_size: int, seed: int = 0, dropout: float = 0.0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertModel(cfg, add_pooling_layer=False)


def tiny_encoder(tmp_path: Path, *, shared: bool = True, dropout: float = 0.0, seed: int = 0, **knobs) -> BiEncoder:
    tok = tiny_tokenizer(tmp_path)
    qm = tiny_bert(len(tok), seed, dropout)
    dm = None if shared else tiny_bert(len(tok), seed + 1, dropout)
    knobs = {"pooling": "mean", "query_max_len": 16, "doc_max_len": 32, **knobs}
    return BiEncoder(qm, tok, doc_model=dm, **knobs)


def tiny_data(n_negatives: int = 1) -> ContrastiveData:
    """Twelve (query, document) pairs: each query is its document's title + first words."""
    docs = {d: f"{t} {x}" for d, t, x in TINY_DOCS}
    queries = {f"q{d}": f"{t.lower()} {' '.join(x.split()[:3]).lower()}" for d, t, x in TINY_DOCS}
    positives = {f"q{d}": [d] for d, _, _ in TINY_DOCS}
    pool = {q: [d for d in docs if d not in pos] for q, pos in positives.items()}
    return ContrastiveData(queries, positives, docs, pool, n_negatives)


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- loss


def test_info_nce_equals_hand_computation():
    scores = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -0.5], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([0, 2, 3])
    by_hand = []
    for i, t in enumerate(targets.tolist()):
        row = scores[i].tolist()
        by_hand.append(-(row[t] - math.log(sum(math.exp(s) for s in row))))
    assert info_nce(scores, targets).item() == pytest.approx(sum(by_hand) / 3, abs=1e-6)

    # a masked candidate leaves the softmax: query 0 without column 1
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[0, 1] = True
    row = [2.0, -1.0, 0.0]
    masked0 = -(2.0 - math.log(sum(math.exp(s) for s in row)))
    expected = (masked0 + by_hand[1] + by_hand[2]) / 3
    assert info_nce(scores, targets, mask).item() == pytest.approx(expected, abs=1e-6)

    with pytest.raises(ValueError, match="own positive"):
        info_nce(scores, targets, torch.ones_like(mask))


def test_batch_targets_mask_and_shard():
    # two examples of the same query (positives a, b) + one hard negative each
    b = Batch(
        qids=["q1", "q1", "q2", "q3"], queries=["x"] * 4,
        doc_ids=["a", "n1", "b", "n2", "c", "a", "d", "n3"], docs=["t"] * 8, group=2,
        positives=[frozenset("ab"), frozenset("ab"), frozenset("c"), frozenset("d")],
    )
    assert b.targets().tolist() == [0, 2, 4, 6]
    m = b.mask()
    # q1/a: b (col 2) and the duplicate a (col 5) are its positives -> masked; own column 0 never
    assert m[0].nonzero().flatten().tolist() == [2, 5]
    assert m[1].nonzero().flatten().tolist() == [0, 5]
    assert not m[2].any() and not m[3].any()
    scores = torch.randn(4, 8)
    assert contrastive_loss(scores, b).item() == pytest.approx(info_nce(scores, b.targets(), m).item())
    assert contrastive_loss_unmasked(scores, b).item() == pytest.approx(info_nce(scores, b.targets()).item())
    assert contrastive_loss(scores, b).item() != pytest.approx(contrastive_loss_unmasked(scores, b).item())
    s0, s1 = b.shard(0, 2), b.shard(1, 2)
    assert s0.qids == ["q1", "q1"] and s0.doc_ids == ["a", "n1", "b", "n2"]
    assert s1.qids == ["q2", "q3"] and s1.doc_ids == ["c", "a", "d", "n3"]
    with pytest.raises(ValueError, match="does not split"):
        b.shard(0, 3)


# --------------------------------------------------------------------------- negatives


def test_window_negatives_respects_ranks_and_excludes_positives():
    # scores give ranks d1..d8; d3 and d6 are positives; tie between d7/d8 -> trec order (id desc)
    run = {"q": {"d1": 9.0, "d2": 8.0, "d3": 7.0, "d4": 6.0, "d5": 5.0, "d6": 4.0, "d7": 3.0, "d8": 3.0}}
    pos = {"q": ["d3", "d6"]}
    assert window_negatives(run, pos, (1, 8)) == {"q": ["d1", "d2", "d4", "d5", "d8", "d7"]}
    # ranks 3..6 are d3 d4 d5 d6; positives removed -> d4 d5
    assert window_negatives(run, pos, (3, 6)) == {"q": ["d4", "d5"]}
    assert window_negatives(run, pos, (7, 7)) == {"q": ["d8"]}  # tie: higher doc id first
    with pytest.raises(ValueError, match="neg_window"):
        window_negatives(run, pos, (0, 5))


def test_sampled_negatives_stay_in_pool_never_positive_and_depend_on_seed_epoch():
    docs = {f"d{i}": f"text {i}" for i in range(40)}
    positives = {f"q{i}": [f"d{i}", f"d{i + 20}"] for i in range(10)}
    pool = {f"q{i}": [f"d{j}" for j in range(i + 1, i + 8)] for i in range(10)}
    pool["q9"] = ["d30"]  # short pool: the rest is filled with random non-positives
    data = ContrastiveData({q: q for q in positives}, positives, docs, pool, n_negatives=3)
    assert len(data) == 20 and data.stats["short_pools"] == 2
    for epoch in range(3):
        for b in data.epoch_batches(epoch, seed=1, batch_size=4):
            for i, q in enumerate(b.qids):
                group = b.doc_ids[i * b.group : (i + 1) * b.group]
                assert group[0] in positives[q]
                negs = group[1:]
                assert len(negs) == 3 and len(set(negs)) == 3
                assert not set(negs) & set(positives[q])
                if q != "q9":
                    assert set(negs) <= set(pool[q])
                else:
                    assert "d30" in negs
    a = [b.doc_ids for b in data.epoch_batches(0, 1, 4)]
    assert a == [b.doc_ids for b in data.epoch_batches(0, 1, 4)]  # deterministic
    assert a != [b.doc_ids for b in data.epoch_batches(1, 1, 4)]  # a new order every epoch
    assert len(a) == 5  # 20 examples // 4


# --------------------------------------------------------------------------- GradCache


def full_then(tmp_path, batch_size: int, shared: bool, full: dict, other: dict):
    """One contrastive step of a tiny encoder as a full forward (``full`` kwargs), then as ``other``:
    (batch, encoder, loss_full, grads_full, loss_other, grads_other)."""
    batch = tiny_data(n_negatives=2).epoch_batches(0, seed=0, batch_size=batch_size)[0]
    enc = tiny_encoder(tmp_path, shared=shared)
    enc.train()
    out = []
    for kw in (full, other):
        enc.zero_grad(set_to_none=True)
        out += [contrastive_step(enc, batch, batch, device=torch.device("cpu"), **kw), grads_of(enc)]
    return (batch, enc, *out)


@pytest.mark.parametrize("shared", [True, False])
def test_grad_cache_equals_full_batch_gradients(tmp_path, shared):
    _, _, loss_full, g_full, loss_gc, g_gc = full_then(tmp_path, 6, shared, {}, {"grad_cache": True, "chunk_size": 4})
    assert loss_gc == pytest.approx(loss_full, abs=1e-6)
    assert g_full.keys() == g_gc.keys() and len(g_full) > 10
    worst = max((g_full[k] - g_gc[k]).abs().max().item() for k in g_full)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("grad_cache", [False, True])
def test_length_sorted_chunks_give_the_full_batch_loss_and_gradients_with_less_padding(tmp_path, grad_cache):
    plain = {"tokens": 0, "padded": 0, "padded_unsorted": 0}
    pad = dict.fromkeys(plain, 0)
    batch, enc, loss_full, g_full, loss, g = full_then(
        tmp_path, 8, False, {"padding": plain},
        {"length_sort": True, "chunk_size": 3, "grad_cache": grad_cache, "padding": pad})
    assert loss == pytest.approx(loss_full, abs=1e-6)
    assert max((g_full[k] - g[k]).abs().max().item() for k in g_full) < 1e-5
    real = sum(int(enc.tokenize(t, side)["attention_mask"].sum()) for side, t in (("query", batch.queries),
                                                                                  ("doc", batch.docs)))
    assert pad["tokens"] == plain["tokens"] == real and pad["padded_unsorted"] == plain["padded_unsorted"] == plain["padded"]
    assert pad["tokens"] < pad["padded"] < plain["padded"], (pad, plain)


def test_grad_cache_replays_dropout(tmp_path):
    """With dropout on and one chunk per side, GradCache's second pass reuses the first pass's masks."""
    data = tiny_data(n_negatives=1)
    batch = data.epoch_batches(0, seed=0, batch_size=4)[0]
    enc = tiny_encoder(tmp_path, dropout=0.2)
    enc.train()
    torch.manual_seed(5)
    loss_full = contrastive_step(enc, batch, batch, device=torch.device("cpu"))
    g_full = grads_of(enc)
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss_gc = contrastive_step(enc, batch, batch, device=torch.device("cpu"), grad_cache=True, chunk_size=64)
    g_gc = grads_of(enc)
    assert loss_gc == pytest.approx(loss_full, abs=1e-6)
    assert max((g_full[k] - g_gc[k]).abs().max().item() for k in g_full) < 1e-5


# --------------------------------------------------------------------------- training


def _full_loss(enc: BiEncoder, data: ContrastiveData) -> float:
    batch = data.epoch_batches(0, seed=123, batch_size=len(data))[0]
    enc.eval()
    with torch.no_grad():
        q = enc.embed(enc.tokenize(batch.queries, "query"), "query")
        d = enc.embed(enc.tokenize(batch.docs, "doc"), "doc")
        return contrastive_loss(enc.score(q, d), batch).item()


def test_training_lowers_loss_on_memorisable_data(tmp_path):
    data = tiny_data(n_negatives=1)
    enc = tiny_encoder(tmp_path, shared=False, normalize=True, similarity="cos", temperature=0.05)
    before = _full_loss(enc, data)
    args = TrainArgs(batch_size=4, max_steps=40, lr=3e-3, warmup_ratio=0.1, save_every=0, log_every=5, progress=False)
    result = Trainer(enc, data, args, tmp_path / "work").train()
    after = _full_loss(enc, data)
    assert result.step == 40
    assert after < 0.5 * before, (before, after)
    log_rows = [json.loads(x) for x in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_rows] == list(range(5, 41, 5))
    assert {"loss", "lr", "examples_per_s", "grad_norm"} <= set(log_rows[0])
    assert log_rows[-1]["lr"] == 0.0  # linear decay to zero


def test_grad_accum_and_grad_cache_train(tmp_path):
    """Accumulation, GradCache and gradient checkpointing run together and give finite losses."""
    data = tiny_data(n_negatives=1)
    enc = tiny_encoder(tmp_path)
    args = TrainArgs(batch_size=4, max_steps=3, lr=1e-3, grad_accum=2, grad_cache=True, chunk_size=3,
                     gradient_checkpointing=True, progress=False, log_every=1)
    result = Trainer(enc, data, args, tmp_path / "work").train()
    assert result.step == 3 and all(math.isfinite(r["loss"]) for r in result.log)
    # 3 optimizer steps x 2 accumulated batches of 4 = 24 examples -> epoch 2 of 3 batches/epoch
    assert result.log[-1]["epoch"] == pytest.approx(2.0)


def test_precision_bf16_on_cpu_and_fp16_falls_back(tmp_path, caplog):
    data = tiny_data(n_negatives=1)
    for precision, grad_cache in (("bf16", False), ("bf16", True)):
        args = TrainArgs(batch_size=4, max_steps=2, lr=1e-3, precision=precision, grad_cache=grad_cache,
                         chunk_size=3, progress=False, log_every=1)
        result = Trainer(tiny_encoder(tmp_path), data, args, tmp_path / f"w-{precision}-{grad_cache}").train()
        assert all(math.isfinite(r["loss"]) for r in result.log)
    with caplog.at_level(logging.WARNING, logger="drlab"):
        t = Trainer(tiny_encoder(tmp_path), data, TrainArgs(batch_size=4, precision="fp16"), tmp_path / "w16")
    assert t.args.precision == "fp32" and "fp16 needs CUDA" in caplog.text
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Trainer(tiny_encoder(tmp_path), data, TrainArgs(batch_size=4, precision="fp8"), tmp_path / "w8")


class _Killed(Exception):
    pass


def test_resume_after_kill_gives_the_uninterrupted_weights(tmp_path, caplog):
    data = tiny_data(n_negatives=1)
    # checkpoints every 3 steps, log lines every 4: the kill (after step 6) falls inside a log interval
    args = dict(batch_size=4, max_steps=10, lr=2e-3, save_every=3, log_every=4, progress=False)

    def fresh() -> BiEncoder:
        return tiny_encoder(tmp_path, shared=False, dropout=0.1)  # dropout: RNG state must be restored too

    reference = fresh()
    Trainer(reference, data, TrainArgs(**args), tmp_path / "ref").train()

    # killed right after the checkpoint of step 6 is on disk (steps 7.. are lost)
    killed = Trainer(fresh(), data, TrainArgs(**args), tmp_path / "work")
    orig_save = killed._save

    def save_then_die(opt, sched, scaler, step, epoch, pos):
        orig_save(opt, sched, scaler, step, epoch, pos)
        if step == 6:
            raise _Killed()

    killed._save = save_then_die
    with pytest.raises(_Killed):
        killed.train()
    assert (tmp_path / "work" / STATE_FILE).exists()
    assert not list((tmp_path / "work").glob("*.tmp*"))

    resumed_enc = fresh()
    with caplog.at_level(logging.INFO, logger="drlab"):
        result = Trainer(resumed_enc, data, TrainArgs(**args), tmp_path / "work").train()
    assert result.resumed_from == 6 and result.step == 10
    assert result.seconds_total > result.seconds  # training time before the kill is carried over
    assert "resuming trainer from step 6" in caplog.text
    # the log holds each line once: step 4 from before the kill, 8 and 10 from after, as uninterrupted
    rows = [json.loads(x) for x in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 10]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # step 8 averages 5..8 across the kill
    ref_sd, res_sd = reference.state_dict(), resumed_enc.state_dict()
    # same ops in the same order on the same CPU: bitwise equal
    for k in ref_sd:
        assert torch.equal(ref_sd[k], res_sd[k]), k


def test_checkpoint_loads_in_biencoder_and_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    data = tiny_data(n_negatives=0)
    enc = tiny_encoder(tmp_path, pooling="mean")
    Trainer(enc, data, TrainArgs(batch_size=4, max_steps=2, lr=1e-3, progress=False), tmp_path / "work").train()
    enc.save(tmp_path / "ckpt")
    texts = [f"{t} {x}" for _, t, x in TINY_DOCS]
    want = enc.encode(texts, "doc", progress=False)
    again = BiEncoder.load(tmp_path / "ckpt").encode(texts, "doc", progress=False)
    np.testing.assert_allclose(again, want, atol=1e-5)
    st = SentenceTransformer(str(tmp_path / "ckpt"), device="cpu")
    np.testing.assert_allclose(st.encode(texts, convert_to_numpy=True), want, atol=1e-5)


# --------------------------------------------------------------------------- the stage


def _save_tiny_checkpoint(tmp_path: Path) -> Path:
    tok = tiny_tokenizer(tmp_path)
    d = tmp_path / "tiny-bert"
    tiny_bert(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _stage_overrides(tmp_path: Path, *extra: str) -> list[str]:
    ckpt = _save_tiny_checkpoint(tmp_path)
    return [
        "model=dpr", "data=beir", "data.name=tiny", "data.train_split=train", "debug=tiny",
        f"model.checkpoint={ckpt}", "pipeline.bm25.enabled=false", "pipeline.retriever1.n_negatives=0",
        "pipeline.retriever1.batch_size=2", "pipeline.retriever1.lr=1e-3", "runtime.progress=false",
        *extra,
    ]


def test_stage_trains_and_writes_artifacts(tmp_path):
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(
        _stage_overrides(tmp_path, "stage=retriever1", "pipeline.retriever1.max_steps=4",
                         "pipeline.retriever1.log_every=1", "pipeline.retriever1.eval_every=2",
                         "data.dev_split=test"),
        tmp_path,
    )
    summary = run_pipeline(cfg, tmp_path / "run")
    st = summary["stages"]["retriever1"]
    out = Path(st["dir"])
    assert st["metrics"]["steps"] == 4
    assert (out / "checkpoint" / "drlab_encoder.json").exists()
    assert (out / "checkpoint" / "query_encoder" / "model.safetensors").exists()  # DPR: separate towers
    assert (out / "loss.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval" in r] == [2, 4]
    assert 0 <= rows[-1]["eval"]["ndcg@10"] <= 1
    assert not out.with_name(out.name + ".work").exists()  # work dir removed once finished
    BiEncoder.load(out / "checkpoint")


def test_stage_without_train_split_says_how_to_fix(tmp_path):
    from pipelines.executor import ConfigError
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_stage_overrides(tmp_path, "stage=retriever1", "data.train_split=null"), tmp_path)
    with pytest.raises(ConfigError, match=r"train_split=null.*Fix"):
        run_pipeline(cfg, tmp_path / "run")


@pytest.mark.slow
def test_stage_resumes_after_sigkill(tmp_path):
    """kill -9 the real command after its first checkpoint; the rerun resumes from that step."""
    make_tiny_beir(tmp_path / "data" / "tiny")
    args = [
        sys.executable, str(REPO / "run.py"),
        *_stage_overrides(tmp_path, "stage=retriever1", "pipeline.retriever1.max_steps=400",
                          "pipeline.retriever1.save_every=5", "pipeline.retriever1.log_every=50"),
        f"paths.output_dir={tmp_path / 'outputs'}", f"paths.data_dir={tmp_path / 'data'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cache = tmp_path / "outputs" / "cache" / "retriever1"
    deadline = time.time() + 60
    while time.time() < deadline and not list(cache.glob("*.work/" + STATE_FILE)):
        if proc.poll() is not None:
            pytest.fail("run.py ended before its first checkpoint:\n" + proc.stdout.read().decode())
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not list(cache.glob("*/manifest.json"))
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    m = re.search(r"resuming retriever1 from step (\d+)", rerun.stdout + rerun.stderr)
    assert m, (rerun.stdout + rerun.stderr)[-3000:]
    assert int(m.group(1)) >= 5 and int(m.group(1)) % 5 == 0
    (done,) = cache.glob("*/manifest.json")
    manifest = json.loads(done.read_text())
    assert manifest["metrics"]["steps"] == 400
