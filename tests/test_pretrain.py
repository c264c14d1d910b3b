"""Pre-training methods (SimLM, RetroMAE, Contriever + MoCo, ICT) and the pretrain stage, on tiny BERTs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, TINY_DOCS, TINY_QUERIES, compose, make_tiny_beir, make_tiny_bert

TEXTS = [f"{t}. {x} {x}" for _, t, x in TINY_DOCS]


def run_loop(method, texts, p, seed, work, device, progress=False):
    """``pretrain_loop`` with conf/pipeline/pretrain.yaml's values, ``p`` on top (the stage's call)."""
    from omegaconf import OmegaConf

    from retrievers.pretrain_loop import pretrain_loop

    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "pipeline" / "pretrain.yaml"))
    args = {k: v for k, v in {**yaml, **p}.items() if k not in ("enabled", "extra_corpora")}
    return pretrain_loop(method, texts, **args, seed=seed, work=work, device=device, progress=progress)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_tiny_bert(tmp_path / "bert", TEXTS + [q for _, q in TINY_QUERIES], punctuation=True)


def _batch(method, n=4):
    b = method.tokenizer(TEXTS[:n], padding=True, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


# --------------------------------------------------------------------------- SimLM


def test_simlm_decoder_sees_the_encoder_only_through_cls(ckpt):
    from retrievers.simlm import SimLMPretrainer

    m = SimLMPretrainer(str(ckpt), generator="random", seed=0).eval()
    ids, attn = _batch(m)
    torch.manual_seed(0)
    h = torch.randn(ids.shape[0], ids.shape[1], m.mlm.config.hidden_size)
    _, dec_ids, _, _, _ = m.corrupt(ids, attn)
    base = m.decoder_loss(h, dec_ids, attn, ids)
    h2 = h.clone()
    h2[:, 1:] = torch.randn_like(h2[:, 1:]) * 10  # every non-[CLS] encoder output changed
    assert torch.equal(m.decoder_loss(h2, dec_ids, attn, ids), base)
    h3 = h.clone()
    h3[:, 0] += 1.0  # the [CLS] vector changed
    assert not torch.equal(m.decoder_loss(h3, dec_ids, attn, ids), base)


def test_simlm_encoder_replacements_are_replaced_for_the_decoder_too(ckpt):
    from retrievers.pretraining import special_mask
    from retrievers.simlm import SimLMPretrainer

    m = SimLMPretrainer(str(ckpt), generator="random", enc_rate=0.3, dec_rate=0.5, seed=0)
    ids, attn = _batch(m, 12)
    ids, attn = ids.repeat(8, 1), attn.repeat(8, 1)
    torch.manual_seed(1)
    enc_ids, dec_ids, enc_m, dec_m, gen_loss = m.corrupt(ids, attn)
    assert gen_loss is None  # random generator: frozen, no loss
    assert bool((enc_m <= dec_m).all())  # encoder positions are a subset of the decoder's
    assert torch.equal(enc_ids[enc_m], dec_ids[enc_m])  # ... with the same sampled replacement
    assert torch.equal(enc_ids[~enc_m], ids[~enc_m]) and torch.equal(dec_ids[~dec_m], ids[~dec_m])
    cand = ~special_mask(m.tokenizer, ids) & attn.bool()
    assert not (enc_m & ~cand).any()  # [CLS] / [SEP] / padding never masked
    assert 0.2 < enc_m.sum() / cand.sum() < 0.4 and 0.4 < dec_m.sum() / cand.sum() < 0.6


def test_simlm_joint_generator_trains_and_loss_parts(ckpt):
    from retrievers.simlm import SimLMPretrainer

    m = SimLMPretrainer(str(ckpt), generator="joint", seed=0)
    loss, logs = m.loss(TEXTS[:4])
    assert {"enc", "dec", "gen"} <= set(logs) and logs["tokens"] > 0
    loss.backward()
    assert any(p.grad is not None for p in m.generator.parameters())
    assert all(p.grad is not None for p in m.decoder.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- RetroMAE


def test_retromae_enhanced_decoding_mask(ckpt):
    from retrievers.retromae import RetroMAEPretrainer

    m = RetroMAEPretrainer(str(ckpt), seed=0)
    attn = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    blocked = m.visibility(attn)[0]
    n = attn.shape[1]
    for i in range(1, n):
        assert blocked[i, i]  # never itself
        assert not blocked[i, 0]  # always the sentence embedding
        assert blocked[i, 5] and blocked[i, 6]  # never padding
    loss, logs = m.loss(TEXTS[:3])
    loss.backward()
    assert logs["enc"] > 0 and logs["dec"] > 0


# --------------------------------------------------------------------------- Contriever


def test_moco_queue_is_fifo_and_momentum_encoder_gets_no_gradient(ckpt):
    from retrievers.contriever import ContrieverPretrainer

    m = ContrieverPretrainer(str(ckpt), moco=True, queue_size=5, momentum=0.9, seed=0)
    eye = torch.eye(m.queue.shape[1])
    a, b = eye[:3], eye[3:6]
    m.enqueue(a)
    assert int(m.queue_ptr) == 3 and int(m.queue_filled) == 3
    m.enqueue(b)
    # slots 3, 4 take b0, b1; b2 overwrites the oldest entry (a0) in slot 0
    assert torch.equal(m.queue[0], b[2]) and torch.equal(m.queue[1:3], a[1:3]) and torch.equal(m.queue[3:5], b[:2])
    assert int(m.queue_ptr) == 1 and int(m.queue_filled) == 5

    before = {n: p.detach().clone() for n, p in m.key_encoder.named_parameters()}
    loss, logs = m.loss(TEXTS[:4])
    assert logs["queue"] == 5
    loss.backward()
    assert all(p.grad is None for p in m.key_encoder.parameters())
    assert any(p.grad is not None for p in m.encoder.parameters())
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(0.5)  # pretend an optimizer step
    m.after_step()
    q = dict(m.encoder.named_parameters())
    for n, p in m.key_encoder.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * q[n])
    assert int(m.queue_ptr) == (1 + 4) % 5  # this step's 4 keys were enqueued


def test_contriever_views_are_independent_crops(ckpt):
    from retrievers.contriever import ContrieverPretrainer

    m = ContrieverPretrainer(str(ckpt), moco=False, crop_min=0.1, crop_max=0.5, delete_p=0.1, seed=0)
    text = " ".join(TEXTS)
    n_tok = len(m.tokenizer(text, add_special_tokens=False)["input_ids"])
    a, b = m.views([text] * 6)
    la, _lb = a["attention_mask"].sum(1) - 2, b["attention_mask"].sum(1) - 2
    assert (la <= 0.5 * n_tok + 1).all() and (la >= 1).all()
    assert not torch.equal(a["input_ids"][:, :5], b["input_ids"][:, :5])  # independent crops
    loss, logs = m.loss(TEXTS[:4])
    assert "inbatch" in logs and loss.item() > 0


# --------------------------------------------------------------------------- ICT


def test_ict_pairs_remove_the_sentence():
    import numpy as np

    from retrievers.ict import ict_pair, split_sentences

    text = "Bees dance to share directions. The waggle dance encodes distance. Hives are warm."
    assert len(split_sentences(text)) == 3
    rng = np.random.default_rng(0)
    for _ in range(10):
        q, d = ict_pair(text, rng, remove_p=1.0)
        assert q in split_sentences(text) and q not in d
        q, d = ict_pair(text, rng, remove_p=0.0)
        assert q in d


def test_ict_bfs_without_metadata_says_what_is_missing(ckpt):
    from retrievers.ict import ICTPretrainer

    m = ICTPretrainer(str(ckpt), tasks=("ict", "bfs"))
    with pytest.raises(ValueError, match=r"metadata fields \['article', 'section'\]"):
        m.set_corpus([{"title": "t", "text": "x"}])
    m.set_corpus([{"title": "A", "text": "First. Second.", "metadata": {"article": "a", "section": 0}},
                  {"title": "A", "text": "Third part here.", "metadata": {"article": "a", "section": 1}}])
    loss, _ = m.loss(["A First. Second.", "A Third part here."])
    assert loss.item() > 0


# --------------------------------------------------------------------------- the stage


def _overrides(tmp_path, ckpt, family, *extra):
    return [f"model={family}", "data=beir", "data.name=tiny", "debug=tiny", f"model.checkpoint={ckpt}",
            "pipeline.pretrain.batch_size=4", "pipeline.pretrain.max_steps=4", "pipeline.pretrain.log_every=1",
            "model.encoder.doc_max_len=32", "runtime.progress=false", *extra]


def test_contriever_zero_shot_chain_and_checkpoint(tmp_path, ckpt):
    from pipelines.runner import run_pipeline

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_overrides(tmp_path, ckpt, "contriever", "model.pretrain.queue_size=8", "stage=eval"), tmp_path)
    summary = run_pipeline(cfg, tmp_path / "run")
    st = summary["stages"]
    assert list(st) == ["pretrain", "index", "eval"]
    out = Path(st["pretrain"]["dir"])
    assert (out / "backbone" / "config.json").exists() and (out / "checkpoint" / "drlab_encoder.json").exists()
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["tokens_per_s"] > 0
    assert "pretrain" in json.loads((Path(st["index"]["dir"]) / "encoder.json").read_text())["checkpoint"]
    from transformers import AutoModel

    AutoModel.from_pretrained(out / "backbone")  # a plain HF checkpoint


class _Killed(Exception):
    pass


def test_pretrain_resumes_exactly_after_a_kill(tmp_path, ckpt, caplog):
    import retrievers.pretrain_loop as pt
    from retrievers.simlm import SimLMPretrainer

    p = {"batch_size": 4, "max_steps": 6, "lr": 1e-3, "save_every": 2, "log_every": 1}

    def fresh():
        torch.manual_seed(0)
        return SimLMPretrainer(str(ckpt), generator="joint", seed=0)

    ref = fresh()
    hist_ref, _, _ = run_loop(ref, TEXTS, p, 0, tmp_path / "ref", "cpu", progress=False)

    killed = fresh()
    orig = pt.atomic_torch_save if hasattr(pt, "atomic_torch_save") else None
    import retrievers.train_utils as tr

    real_save = tr.atomic_torch_save

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj["step"] == 4:
            raise _Killed()

    tr.atomic_torch_save = save_then_die
    try:
        with pytest.raises(_Killed):
            run_loop(killed, TEXTS, p, 0, tmp_path / "work", "cpu", progress=False)
    finally:
        tr.atomic_torch_save = real_save
    del orig
    resumed = fresh()
    with caplog.at_level(logging.INFO, logger="drlab"):
        hist, steps, _ = run_loop(resumed, TEXTS, p, 0, tmp_path / "work", "cpu", progress=False)
    assert "resuming pretrain from step 4" in caplog.text and steps == 6
    assert [r["loss"] for r in hist] == [r["loss"] for r in hist_ref]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_simlm_chain_includes_pretrain_and_it_can_be_switched_off(tmp_path, ckpt):
    from pipelines import all_stages
    from pipelines.executor import plan

    make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_overrides(tmp_path, ckpt, "simlm", "data.train_split=test"), tmp_path)
    items = {i.stage: i.status for i in plan(cfg, all_stages(), "all", [], tmp_path / "outputs" / "cache")}
    assert list(items)[:3] == ["bm25", "pretrain", "retriever1"] and items["pretrain"] == "run"
    off = compose(_overrides(tmp_path, ckpt, "simlm", "data.train_split=test", "pipeline.pretrain.enabled=false"),
                  tmp_path)
    items = {i.stage: i.status for i in plan(off, all_stages(), "all", [], tmp_path / "outputs" / "cache")}
    assert items["pretrain"] == "disabled"


def _plan_keys(tmp_path, ckpt, family: str, *extra: str) -> dict[str, str]:
    """Stage -> key of ``family``'s plan on the tiny dataset (made once per tmp_path)."""
    from pipelines import all_stages
    from pipelines.executor import plan

    if not (tmp_path / "data" / "tiny").exists():
        make_tiny_beir(tmp_path / "data" / "tiny")
    cfg = compose(_overrides(tmp_path, ckpt, family, "data.train_split=test", *extra), tmp_path)
    return {i.stage: i.key for i in plan(cfg, all_stages(), "all", [], tmp_path / "outputs" / "cache")}


def test_zero_shot_and_fine_tuned_chains_share_the_pretrain_stage(tmp_path, ckpt):
    """The pretrain key does not depend on model.chain: the "Contriever zero-shot" row reuses the
    pre-training of the fine-tuned Contriever row; its method's settings do change the key."""

    def key(*extra):
        return _plan_keys(tmp_path, ckpt, "contriever", *extra)["pretrain"]

    fine_tuned = key("model.chain=[bm25,pretrain,retriever1,index,eval]")
    assert key("model.chain=[bm25,pretrain,index,eval]") == fine_tuned
    assert key("model.chain=[bm25,pretrain,index,eval]", "model.pretrain.queue_size=8") != fine_tuned


def test_small_random_init_and_no_pretraining(tmp_path, ckpt):
    from retrievers.pretraining import NoPretraining, load_mlm

    small = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    a, _ = load_mlm(str(ckpt), small, seed=3)
    b, _ = load_mlm(str(ckpt), small, seed=3)
    assert a.config.num_hidden_layers == 1 and a.config.hidden_size == 16
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n  # seeded: every row of a table starts from the same weights
    with pytest.raises(ValueError, match="not a field"):
        load_mlm(str(ckpt), {"num_layerz": 2})
    m = NoPretraining(str(ckpt), small, seed=3)
    assert m.describe()["init"].startswith("random")


def test_no_pretraining_row_runs_no_step(tmp_path, ckpt):
    from retrievers.pretraining import no_pretraining

    m = no_pretraining(str(ckpt), {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                                   "intermediate_size": 32}, tasks=["ict"], seed=0)  # a family's extra keys ignored
    hist, steps, _ = run_loop(m, TEXTS, {"max_steps": 5}, 0, tmp_path / "w", "cpu", progress=False)
    assert steps == 0 and hist == []


# --------------------------------------------------------------------------- speed-ups and precision


def test_head_loss_equals_the_loss_on_full_logits(ckpt):
    """Running the vocabulary head only where the loss reads gives the loss of the full logits."""
    from retrievers.pretraining import head_loss, load_mlm, mlm_head

    mlm, tok = load_mlm(str(ckpt), seed=0)
    b = tok(TEXTS[:3], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    hidden = torch.randn(*b["input_ids"].shape, mlm.config.hidden_size)
    where = b["attention_mask"].bool() & (torch.rand(b["input_ids"].shape) < 0.5)
    full = mlm_head(mlm)(hidden)
    expected = torch.nn.functional.cross_entropy(full[where], b["input_ids"][where])
    assert torch.allclose(head_loss(mlm_head(mlm), hidden, b["input_ids"], where), expected, atol=1e-5)
    none = head_loss(mlm_head(mlm), hidden, b["input_ids"], torch.zeros_like(where))
    assert none.item() == 0.0
    with pytest.raises(TypeError, match="no MLM head"):
        mlm_head(torch.nn.Linear(2, 2))


def test_sample_tokens_follows_the_softmax():
    from retrievers.pretraining import sample_tokens

    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.clamp_min(1e-30).log().expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample_tokens(logits, generator=g), minlength=4).float() / 40000
    assert freq[1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(freq, probs, atol=0.01)
    peaked = torch.full((5, 7), -1e4)
    peaked[torch.arange(5), torch.tensor([0, 6, 3, 3, 1])] = 0.0
    assert sample_tokens(peaked).tolist() == [0, 6, 3, 3, 1]


def test_pretrain_precision_bf16_trains_and_has_its_own_key(tmp_path, ckpt):
    """bf16 autocast runs and gets its own pretrain key; an unknown value names the choices."""
    from pipelines.executor import ConfigError
    from retrievers.simlm import SimLMPretrainer

    m = SimLMPretrainer(str(ckpt), generator="joint", seed=0)
    hist, steps, _ = run_loop(m, TEXTS, {"max_steps": 2, "batch_size": 4, "precision": "bf16", "log_every": 1},
                                      0, tmp_path / "w", "cpu", progress=False)
    assert steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    with pytest.raises(ConfigError, match="fp32, bf16"):
        run_loop(m, TEXTS, {"max_steps": 1, "precision": "fp16"}, 0, tmp_path / "w2", "cpu", progress=False)

    def key(*extra):
        return _plan_keys(tmp_path, ckpt, "simlm", *extra)["pretrain"]

    assert key("pipeline.pretrain.precision=fp32") == key()
    assert key("pipeline.pretrain.precision=bf16") != key()


def test_replaced_lm_losses_do_not_score_cls_and_sep(ckpt):
    """Position 0's label is always [CLS]: scoring it pulls the bottleneck to a constant vector.
    By default neither SimLM's decoder nor RetroMAE's scores [CLS] / [SEP]; loss_on_special=True does."""
    import retrievers.pretraining as ptr
    from retrievers.retromae import RetroMAEPretrainer
    from retrievers.simlm import SimLMPretrainer

    m = SimLMPretrainer(str(ckpt), generator="random", seed=0).eval()
    ids, attn = _batch(m)
    scored = m.scored(ids, attn)
    assert not scored[:, 0].any() and not (scored & (ids == m.tokenizer.sep_token_id)).any()
    assert int(scored.sum()) == int(attn.sum()) - 2 * ids.shape[0]  # every other real token is scored
    m.loss_on_special = True
    assert torch.equal(m.scored(ids, attn), attn.bool())

    seen = []
    real = ptr.head_loss
    try:
        ptr.head_loss = lambda head, x, labels, where: seen.append(where.clone()) or real(head, x, labels, where)
        m.loss_on_special = False
        m.loss(TEXTS[:4])  # encoder and decoder losses
        assert len(seen) == 2 and not any(w[:, 0].any() for w in seen)
        seen.clear()
        r = RetroMAEPretrainer(str(ckpt), seed=0)
        r.decoder_loss(torch.randn(ids.shape[0], r.mlm.config.hidden_size), ids, attn)
        r.loss_on_special = True
        r.decoder_loss(torch.randn(ids.shape[0], r.mlm.config.hidden_size), ids, attn)
    finally:
        ptr.head_loss = real
    assert not seen[0][:, 0].any() and seen[1][:, 0].all()
    assert int(seen[1].sum() - seen[0].sum()) == 2 * ids.shape[0]  # one [CLS] and one [SEP] per passage


def test_a_pretrain_method_option_changes_only_the_pretrain_key(tmp_path, ckpt):
    """Later stages read the whole model node; a model.pretrain option added later reaches them
    through the pretrain key (their upstream), not through their own reads."""

    def keys(*extra):
        return _plan_keys(tmp_path, ckpt, "simlm", *extra)

    on, off = keys("model.pretrain.loss_on_special=true"), keys("model.pretrain.loss_on_special=false")
    assert on["pretrain"] != off["pretrain"] and on["retriever1"] != off["retriever1"]  # via upstream
    no_pt = {v: keys(f"model.pretrain.loss_on_special={v}", "pipeline.pretrain.enabled=false") for v in ("true", "false")}
    assert no_pt["true"]["retriever1"] == no_pt["false"]["retriever1"]  # pre-training off: nothing changes
    assert no_pt["true"]["eval"] == no_pt["false"]["eval"]


def test_embedding_spread_flags_a_collapsed_encoder():
    import numpy as np

    from retrievers.pretrain_loop import embedding_spread

    class Fixed:
        def __init__(self, vecs):
            self.vecs = vecs

        def encode(self, texts, side, batch_size=64, progress=False):
            return self.vecs[[int(t) for t in texts]]

    texts = [str(i) for i in range(50)]
    same = Fixed(np.tile(np.array([[1.0, 2.0, 3.0]]), (50, 1)) + 1e-4 * np.random.default_rng(0).normal(size=(50, 3)))
    assert embedding_spread(same, texts, n=20) > 0.999
    orth = Fixed(np.eye(50))
    assert abs(embedding_spread(orth, texts, n=20)) < 1e-9  # distinct one-hot vectors: cosine 0
    assert np.isnan(embedding_spread(orth, texts[:1]))


def test_masked_logits_equal_the_full_logits_at_those_positions(ckpt):
    """The generator's logits at the masked positions, with the head run only there, and for an
    MLM whose head this code does not know (computed everywhere, then indexed)."""
    from transformers import ElectraConfig, ElectraForMaskedLM

    from retrievers.pretraining import load_mlm, masked_logits

    bert, tok = load_mlm(str(ckpt), seed=0)
    electra = ElectraForMaskedLM(ElectraConfig(vocab_size=bert.config.vocab_size, embedding_size=8, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    b = tok(TEXTS[:3], padding=True, return_tensors="pt")
    where = b["attention_mask"].bool() & (torch.rand(b["input_ids"].shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    for mlm in (bert.eval(), electra.eval()):
        with torch.no_grad():
            full = mlm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[where]
            part = masked_logits(mlm, b["input_ids"], b["attention_mask"], where)
        assert part.shape == full.shape and torch.allclose(part, full, atol=1e-5), type(mlm).__name__

    class Unknown(torch.nn.Module):  # a *ForMaskedLM with a head of another name: indexed full logits
        def __init__(self):
            super().__init__()
            self.inner = electra

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    with torch.no_grad():
        assert torch.allclose(masked_logits(Unknown(), b["input_ids"], b["attention_mask"], where), full, atol=1e-5)
