"""Parity of RetroMAE pre-training (``retrievers/retromae.py``) with FlagEmbedding's reference.

Reference: FlagEmbedding 1.2.11 (installed with --no-deps),
``FlagEmbedding/baai_general_embedding/retromae_pretrain/modeling.py`` (``RetroMAEForPretraining``),
``.../enhancedDecoder.py`` (``BertLayerForDecoder``) and ``.../data.py`` (``RetroMAECollator``), a
copy of staoxiao/RetroMAE, the code of Xiao et al. (EMNLP 2022).

FlagEmbedding's package ``__init__`` does not import under transformers 5.x (it imports BGE_M3),
so the files are loaded by path into a private package. Shims, all confined to the loading
fixture or to the reference instance (nothing global stays patched):

* ``transformers.modeling_utils.apply_chunking_to_forward`` / ``prune_linear_layer`` moved to
  ``transformers.pytorch_utils`` in 5.x: the real functions are put back for the import.
  ``find_pruneable_heads_and_indices`` is gone: a stub that raises (only head pruning calls it).
* ``PreTrainedModel.get_extended_attention_mask`` is gone in 5.x: the reference model's ``lm``
  gets a minimal reimplementation of its 4.x 3-D branch, ``(1 - m[:, None]) * finfo.min``.
* ``transformers.DataCollatorForWholeWordMask`` is gone in 5.x: ``RetroMAECollator`` (whose own
  ``__call__`` builds the decoder batch, and runs unchanged) gets a minimal stand-in base with the
  two methods it calls, ``_whole_word_mask`` and ``torch_mask_tokens``, written from 4.x.

What is compared, with the same tiny random BERT (copied), the same decoder-layer weights
(dr-lab's state dict mapped onto ``BertLayerForDecoder``), the same ids, encoder masks, decoder
ids and position-specific decoder masks (recorded from dr-lab's own sampling, or taken from
FlagEmbedding's collator), in eval mode (no dropout): the encoder MLM loss, the enhanced-decoding
loss, their sum, and the gradients of all 55 shared parameter tensors. The tiny BERT's word
embeddings (tied to the MLM head) are scaled x25 and the decoder's attention weights drawn from
N(0, 0.3), so the losses (~7-9) depend on what the decoder sees; with BERT's N(0, 0.02) init every
loss is ~ln|V| whatever the masks.

Tolerances: losses ``rtol=1e-5, atol=1e-5`` (fp32; observed differences <= 1e-6); gradients
``rtol=1e-4, atol=1e-5`` (observed <= 2e-6 on gradients up to ~30: ``nn.MultiheadAttention`` and
BERT's explicit matmuls sum in different orders).

Design differences (each pinned by a test below; none changed here):

1. Stream construction. dr-lab: query ``h + p_i`` (no LayerNorm, no token-type embedding);
   content ``LN([h, e(x'_1), ...] + p)`` (position 0 is ``LN(h + p_0)``, no token-type).
   FlagEmbedding: query ``LN(h + tt_0 + p_i)`` (BertEmbeddings on ``inputs_embeds``), content
   ``[h, LN(e(x_1) + tt_0 + p_1), ...]`` (position 0 the raw ``h``). The parity tests remove the
   gap by giving both the same BERT with the embedding LayerNorm an identity, zero token-type
   embeddings and ``p_0 = 0``; with those, the two recipes are the same function.
2. Decoder masking. FlagEmbedding's decoder reads the *unmasked* ids; its only decoder masking is
   the matrix mask (row ``i`` hides one of ``min(L, 128)`` pre-drawn whole-word masks of
   ``round(L * p_dec)`` words, plus ``i``). dr-lab (default ``dec_rate=0``) reads the unmasked ids
   too and hides each other position independently with probability ``1 - dec_visible``: a row sees
   ~``dec_visible`` (0.5) of the real tokens, FlagEmbedding's scheme up to the sampling distribution
   (per-entry Bernoulli vs a fixed count of whole words). dr-lab's first version also replaced
   ``dec_rate=0.5`` of the content tokens by [MASK], so a row saw ~25% of the text: this test found
   it, and the default now follows the paper and FlagEmbedding.
3. Encoder masking: token-level Bernoulli(``enc_rate``), all [MASK]; FlagEmbedding: whole words,
   ``round(L * p)`` of them, 80% [MASK] / 10% random / 10% kept.
4. Decoder layer: ``nn.LayerNorm`` eps 1e-5 and dropout 0.1 fixed, not ``config.layer_norm_eps``
   (BERT: 1e-12) / ``config.*_dropout_prob``; PyTorch's default init, not BERT's N(0, 0.02); no
   dropout on the two streams (FlagEmbedding's BertEmbeddings applies its dropout to the query
   and to content 1..). The parity tests give the reference layer dr-lab's eps.
5. Loss weighting and targets are the same: ``L_enc + L_dec``, each a token mean; the decoder
   scores every real token but [CLS] / [SEP] (dr-lab's default ``loss_on_special=false``).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import random
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_DOCS, component, make_tiny_bert
from torch import nn

pytest.importorskip("transformers")
# pytest.importorskip("FlagEmbedding") would import its broken package __init__: locate it instead.
_SPEC = importlib.util.find_spec("FlagEmbedding")
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip("FlagEmbedding (the RetroMAE reference) is not installed", allow_module_level=True)
FE_DIR = Path(list(_SPEC.submodule_search_locations)[0]) / "baai_general_embedding" / "retromae_pretrain"
FE_VERSION = importlib.metadata.version("FlagEmbedding")
if not (FE_DIR / "modeling.py").exists():
    pytest.skip(f"FlagEmbedding {FE_VERSION} has no {FE_DIR}", allow_module_level=True)
pytest.importorskip("datasets", reason="FlagEmbedding's retromae_pretrain/data.py imports datasets")

LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
MAX_LEN = 48
TEXTS = [f"{t}. {x}" for _, t, x in TINY_DOCS]
LONG = [" ".join(x for _, _, x in TINY_DOCS[i:i + 4]) for i in range(0, 12, 3)]  # ~40-48 tokens each


# --------------------------------------------------------------------------- loading the reference


def _no_pruning(*a, **k):
    raise NotImplementedError("stub: head pruning is not used by RetroMAE")


@dataclass
class _WholeWordMaskBase:
    """Stand-in for transformers 4.x ``DataCollatorForWholeWordMask`` (removed in 5.x): the two
    methods ``RetroMAECollator.__call__`` calls, written from 4.x."""

    tokenizer: Any
    mlm: bool = True
    mlm_probability: float = 0.15

    def _whole_word_mask(self, input_tokens, max_predictions=512):
        cand = []
        for i, token in enumerate(input_tokens):
            if token in ("[CLS]", "[SEP]"):
                continue
            if cand and token.startswith("##"):
                cand[-1].append(i)
            else:
                cand.append([i])
        random.shuffle(cand)
        n = min(max_predictions, max(1, int(round(len(input_tokens) * self.mlm_probability))))
        covered: list[int] = []
        for word in cand:
            if len(covered) >= n:
                break
            if len(covered) + len(word) > n:
                continue
            covered += word
        return [1 if i in covered else 0 for i in range(len(input_tokens))]

    def torch_mask_tokens(self, inputs, mask_labels):
        labels = inputs.clone()
        prob = mask_labels.clone().float()
        special = [self.tokenizer.get_special_tokens_mask(v, already_has_special_tokens=True) for v in labels.tolist()]
        prob.masked_fill_(torch.tensor(special, dtype=torch.bool), 0.0)
        prob.masked_fill_(labels.eq(self.tokenizer.pad_token_id), 0.0)
        masked = prob.bool()
        labels[~masked] = -100
        replaced = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & masked
        inputs[replaced] = self.tokenizer.mask_token_id
        rand = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & masked & ~replaced
        inputs[rand] = torch.randint(len(self.tokenizer), labels.shape, dtype=torch.long)[rand]
        return inputs, labels


@pytest.fixture(scope="module")
def fe():
    """FlagEmbedding's ``arguments``, ``enhancedDecoder``, ``utils``, ``data`` and ``modeling``, by path."""
    # What the reference files import, first: importing transformers.models.bert re-registers
    # sys.modules["transformers"], so the shims go onto the module objects as they are afterwards.
    importlib.import_module("transformers.models.bert.modeling_bert")
    importlib.import_module("transformers.modeling_outputs")
    importlib.import_module("transformers.utils")
    transformers = sys.modules["transformers"]
    mu = sys.modules["transformers.modeling_utils"]
    pu = importlib.import_module("transformers.pytorch_utils")

    pkg_name = "_flagembedding_retromae_reference"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(FE_DIR)]
    mods = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, pkg_name, pkg)
        for name in ("apply_chunking_to_forward", "prune_linear_layer"):
            if not hasattr(mu, name):
                mp.setattr(mu, name, getattr(pu, name), raising=False)
        if not hasattr(mu, "find_pruneable_heads_and_indices"):
            mp.setattr(mu, "find_pruneable_heads_and_indices", _no_pruning, raising=False)
        if not hasattr(transformers, "DataCollatorForWholeWordMask"):
            mp.setattr(transformers, "DataCollatorForWholeWordMask", _WholeWordMaskBase, raising=False)
        for name in ("arguments", "enhancedDecoder", "utils", "data", "modeling"):
            spec = importlib.util.spec_from_file_location(f"{pkg_name}.{name}", FE_DIR / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            mp.setitem(sys.modules, spec.name, mod)
            spec.loader.exec_module(mod)
            mods[name] = mod
    return types.SimpleNamespace(**mods)


def _extended_attention_mask(self, attention_mask, input_shape=None, device=None, dtype=None):
    """transformers 4.x ``get_extended_attention_mask``, the 3-D branch RetroMAEForPretraining uses."""
    assert attention_mask.dim() == 3
    dtype = dtype or self.dtype
    return (1.0 - attention_mask[:, None, :, :].to(dtype)) * torch.finfo(dtype).min


# --------------------------------------------------------------------------- the two models


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), TEXTS + LONG, hidden=32, seed=11)


@pytest.fixture(scope="module")
def drlab_base(bert):
    """dr-lab's pretrainer from conf/model/retromae.yaml (enc_rate .3, dec_rate 0, dec_visible .5)."""
    return component(["model=retromae"], "model.pretrain", checkpoint=str(bert), max_len=MAX_LEN, seed=0)


def _fe_decoder_state(dec) -> dict[str, torch.Tensor]:
    """dr-lab's EnhancedDecoderLayer state dict under BertLayerForDecoder's names."""
    s = dec.state_dict()
    q, k, v = s["attn.in_proj_weight"].chunk(3)
    qb, kb, vb = s["attn.in_proj_bias"].chunk(3)
    return {
        "attention.self.query.weight": q, "attention.self.query.bias": qb,
        "attention.self.key.weight": k, "attention.self.key.bias": kb,
        "attention.self.value.weight": v, "attention.self.value.bias": vb,
        "attention.output.dense.weight": s["attn.out_proj.weight"], "attention.output.dense.bias": s["attn.out_proj.bias"],
        "attention.output.LayerNorm.weight": s["ln1.weight"], "attention.output.LayerNorm.bias": s["ln1.bias"],
        "intermediate.dense.weight": s["ffn.0.weight"], "intermediate.dense.bias": s["ffn.0.bias"],
        "output.dense.weight": s["ffn.2.weight"], "output.dense.bias": s["ffn.2.bias"],
        "output.LayerNorm.weight": s["ln2.weight"], "output.LayerNorm.bias": s["ln2.bias"],
    }


def _align_streams(mlm) -> None:
    """Make dr-lab's and FlagEmbedding's stream recipes the same function (difference 1 above):
    embedding LayerNorm -> identity, token-type embeddings 0, position embedding 0 = 0."""
    emb = mlm.bert.embeddings
    emb.LayerNorm = nn.Identity()
    with torch.no_grad():
        emb.token_type_embeddings.weight.zero_()
        emb.position_embeddings.weight[0].zero_()


def _pair(fe, drlab_base, aligned=True, **overrides):
    dr = copy.deepcopy(drlab_base)
    for k, v in overrides.items():
        setattr(dr, k, v)
    with torch.no_grad():
        # BERT's N(0, 0.02) init leaves the tied MLM head near-uniform (every loss ~ ln|V|, whatever
        # the inputs): scaled word embeddings make the losses depend on what the decoder sees.
        dr.mlm.bert.embeddings.word_embeddings.weight.mul_(25.0)
        # a decoder whose attention matters (PyTorch's default init leaves the residual dominant), and
        # non-trivial LayerNorm affine parameters, so a swapped mapping would show
        torch.manual_seed(7)
        dr.decoder.attn.in_proj_weight.normal_(0, 0.3)
        dr.decoder.attn.out_proj.weight.normal_(0, 0.3)
        for ln in (dr.decoder.ln1, dr.decoder.ln2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_(0, 0.1)
    if aligned:
        _align_streams(dr.mlm)
    ref = fe.modeling.RetroMAEForPretraining(copy.deepcopy(dr.mlm), model_args=None)
    ref.lm.get_extended_attention_mask = types.MethodType(_extended_attention_mask, ref.lm)
    ref.c_head.load_state_dict(_fe_decoder_state(dr.decoder), strict=True)
    for ln in (ref.c_head.attention.output.LayerNorm, ref.c_head.output.LayerNorm):
        ln.eps = dr.decoder.ln1.eps  # difference 4: dr-lab's decoder LayerNorm eps is 1e-5, not config's
    return dr.eval(), ref.eval()


# --------------------------------------------------------------------------- running both


def _drlab_loss(dr, texts, seed, enc=None, dec_blocked=None):
    """dr-lab's ``loss(texts)``, recording the masks its own sampling draws (or, with ``enc`` =
    (ids, mask) / ``dec_blocked``, substituting given ones for the encoder corruption / visibility)."""
    rec: dict[str, Any] = {"mask": []}
    sample_mask, sample_vis = dr._mask, dr.visibility
    calls = iter(range(2))

    def mask(ids, attn, rate):
        first = next(calls) == 0
        out = enc if (first and enc is not None) else sample_mask(ids, attn, rate)
        rec["mask"].append((rate, out[0].clone(), out[1].clone()))
        return out

    def visibility(attn):
        rec["blocked"] = (sample_vis(attn) if dec_blocked is None else dec_blocked).clone()
        return rec["blocked"]

    dr._mask, dr.visibility = mask, visibility
    torch.manual_seed(seed)
    try:
        total, logs = dr.loss(texts)
    finally:
        del dr._mask, dr.visibility
    return total, logs, rec


def _fe_loss(ref, batch):
    """FlagEmbedding's forward on ``batch``: (total, encoder MLM loss, decoder loss)."""
    parts = {}
    hook = ref.lm.register_forward_hook(lambda m, i, o: parts.__setitem__("enc", o.loss))
    mlm_loss = ref.mlm_loss

    def spy(hiddens, labels):
        scores, loss = mlm_loss(hiddens, labels)
        parts["dec"] = loss
        return scores, loss

    ref.mlm_loss = spy
    try:
        (total,) = ref(**batch)
    finally:
        hook.remove()
        del ref.mlm_loss
    return total, parts["enc"], parts["dec"]


def _fe_batch_from_drlab(dr, texts, rec):
    from retrievers.pretraining import special_mask, tokenize_batch

    b = tokenize_batch(dr.tokenizer, texts, dr.max_len)
    ids, attn = b["input_ids"], b["attention_mask"]
    (enc_rate, enc_ids, enc_m), (dec_rate, dec_ids, _) = rec["mask"]
    assert (enc_rate, dec_rate) == (dr.enc_rate, dr.dec_rate)
    scored = attn.bool() & ~special_mask(dr.tokenizer, ids)
    return {
        "encoder_input_ids": enc_ids, "encoder_attention_mask": attn,
        "encoder_labels": ids.masked_fill(~enc_m, -100),
        "decoder_input_ids": dec_ids,  # FlagEmbedding's collator would pass the unmasked ids (difference 2)
        "decoder_attention_mask": (~rec["blocked"]).long(),  # 1 = may attend
        "decoder_labels": ids.masked_fill(~scored, -100),  # FlagEmbedding: -100 at [CLS], [SEP], padding
    }


def _grads(dr, ref) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, dr-lab grad, FlagEmbedding grad) for every parameter the two share."""
    return _grads_or_weights(dr, ref, weights=False)


def _grads_or_weights(dr, ref, weights: bool) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, dr-lab tensor, FlagEmbedding tensor): gradients, or (``weights``) the parameters themselves."""
    def get(p):
        return p.detach() if weights else p.grad

    g_ref = {n: get(p) for n, p in ref.named_parameters()}
    out = []
    for n, p in dr.mlm.named_parameters():
        if n == "bert.embeddings.token_type_embeddings.weight":
            continue  # zeroed by _align_streams; FlagEmbedding's decoder also adds it (difference 1)
        g_dr, g_fe = get(p), g_ref[f"lm.{n}"]
        if n == "bert.embeddings.position_embeddings.weight":  # row 0: dr-lab's content slot 0 adds p_0
            g_dr, g_fe = g_dr[1:], g_fe[1:]
        out.append((n, g_dr, g_fe))
    fe_dec = {n: get(p) for n, p in ref.c_head.named_parameters()}
    dr_dec = {n: get(p) for n, p in dr.decoder.named_parameters()}
    mapped = _fe_decoder_state(types.SimpleNamespace(state_dict=lambda: dr_dec))
    out += [(f"decoder:{n}", mapped[n], fe_dec[n]) for n in fe_dec]
    return out


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("seed,dec_rate", [(0, 0.0), (1, 0.5)], ids=["default", "dec_rate=0.5"])
def test_losses_and_gradients_equal_flagembedding(fe, drlab_base, seed, dec_rate):
    """dr-lab's own sampled masks, fed to FlagEmbedding: L_enc, L_dec, L, grads. ``dec_rate=0`` is the
    default (unmasked content stream); 0.5 (the first version's [MASK]s in it) goes through the same code."""
    dr, ref = _pair(fe, drlab_base)
    dr.dec_rate = dec_rate
    texts = TEXTS[seed * 4:seed * 4 + 5]  # different lengths: padding inside the batch
    total, logs, rec = _drlab_loss(dr, texts, seed)
    batch = _fe_batch_from_drlab(dr, texts, rec)
    assert bool((batch["encoder_labels"] != -100).any())
    assert bool((batch["decoder_input_ids"] == dr.tokenizer.mask_token_id).any()) == (dec_rate > 0)
    assert bool((batch["decoder_attention_mask"] == 0).any())  # a real position-specific mask, not all-visible
    ref_total, ref_enc, ref_dec = _fe_loss(ref, batch)

    torch.testing.assert_close(torch.tensor(logs["enc"]), ref_enc.detach(), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(logs["dec"]), ref_dec.detach(), **LOSS_TOL)
    torch.testing.assert_close(total.detach(), ref_total.detach(), **LOSS_TOL)
    assert float(total.detach()) == pytest.approx(logs["enc"] + logs["dec"], rel=1e-6)  # unweighted sum on both sides

    total.backward()
    ref_total.backward()
    compared = _grads(dr, ref)
    assert len(compared) == 55  # 39 BERT (+ MLM head) tensors, position rows 1.. included; 16 decoder tensors
    assert sum(float(g_fe.abs().max()) > 1e-3 for _, _, g_fe in compared) >= 45  # key biases: 0 in exact math
    for name, g_dr, g_fe in compared:
        assert g_dr is not None and g_fe is not None, name
        torch.testing.assert_close(g_dr, g_fe, **GRAD_TOL, msg=name)


def test_ten_adamw_steps_track_flagembedding(fe, drlab_base):
    """Pre-training next to the reference for the same steps (issue 16): dr-lab's RetroMAE and
    FlagEmbedding's, from the same weights, 10 AdamW steps (lr 1e-3) on one batch, FlagEmbedding fed
    dr-lab's masks of each step. The two loss curves agree at every step and the weights end equal.
    The two embedding tables where the stream recipes differ (token type, position 0; difference 1)
    are frozen on both sides; attention key biases (gradient 0 in exact math, so Adam's step is
    float noise) are not compared."""
    dr, ref = _pair(fe, drlab_base)
    frozen = ("embeddings.token_type_embeddings.weight", "embeddings.position_embeddings.weight")
    for model in (dr, ref):
        for n, p in model.named_parameters():
            if n.endswith(frozen):
                p.requires_grad_(False)
    opt_dr = torch.optim.AdamW([p for p in dr.parameters() if p.requires_grad], lr=1e-3)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3)
    texts = TEXTS[:5]
    curve_dr, curve_ref = [], []
    for step in range(10):
        total, _, rec = _drlab_loss(dr, texts, seed=100 + step)
        ref_total, _, _ = _fe_loss(ref, _fe_batch_from_drlab(dr, texts, rec))
        for opt, loss in ((opt_dr, total), (opt_ref, ref_total)):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve_dr.append(float(total.detach()))
        curve_ref.append(float(ref_total.detach()))
    torch.testing.assert_close(torch.tensor(curve_dr), torch.tensor(curve_ref), rtol=1e-4, atol=1e-5)
    assert curve_dr[-1] < curve_dr[0] - 0.5, curve_dr
    compared = 0
    for name, w_dr, w_fe in _grads_or_weights(dr, ref, weights=True):
        if name.endswith("key.bias"):
            continue
        torch.testing.assert_close(w_dr, w_fe, rtol=1e-3, atol=1e-5, msg=name)
        compared += 1
    assert compared > 40


def test_comparison_is_sensitive_to_the_decoder_inputs(fe, drlab_base):
    """The parity above can fail: a different position-specific mask (each text row's visible text
    columns complemented), or the unmasked decoder ids instead of [MASK]ed ones (dec_rate=0.5), move
    the reference's decoder loss by far more than the tolerance."""
    from retrievers.pretraining import tokenize_batch

    dr, ref = _pair(fe, drlab_base)
    dr.dec_rate = 0.5
    texts = TEXTS[:4]
    _, logs, rec = _drlab_loss(dr, texts, 0)
    batch = _fe_batch_from_drlab(dr, texts, rec)
    text = batch["decoder_labels"] != -100
    cols = text[:, None, :] & text[:, :, None] & ~torch.eye(text.shape[1], dtype=torch.bool)
    flipped = torch.where(cols, 1 - batch["decoder_attention_mask"], batch["decoder_attention_mask"])
    unmasked = tokenize_batch(dr.tokenizer, texts, MAX_LEN)["input_ids"]
    with torch.no_grad():
        for key, value in (("decoder_attention_mask", flipped), ("decoder_input_ids", unmasked)):
            _, _, ref_dec = _fe_loss(ref, {**batch, key: value})
            assert abs(float(ref_dec) - logs["dec"]) > 100 * LOSS_TOL["atol"], key


def test_flagembedding_collator_batch_through_drlab(fe, drlab_base):
    """FlagEmbedding's own collator output (its decoder masking: unmasked ids, per-row whole-word
    masks), fed to dr-lab with ``dec_rate=0`` and that matrix as the visibility: the same losses."""
    from retrievers.pretraining import tokenize_batch

    dr, ref = _pair(fe, drlab_base, dec_rate=0.0)
    texts = TEXTS[:5]
    random.seed(0)
    torch.manual_seed(0)
    collate = fe.data.RetroMAECollator(tokenizer=dr.tokenizer, max_seq_length=MAX_LEN,
                                       encoder_mlm_probability=0.3, decoder_mlm_probability=0.5)
    batch = collate(texts)
    ids = tokenize_batch(dr.tokenizer, texts, MAX_LEN)["input_ids"]
    assert torch.equal(batch["decoder_input_ids"], ids)  # FlagEmbedding's decoder reads the unmasked ids
    enc_m = batch["encoder_labels"] != -100
    blocked = batch["decoder_attention_mask"] == 0
    total, logs, rec = _drlab_loss(dr, texts, 0, enc=(batch["encoder_input_ids"], enc_m), dec_blocked=blocked)
    assert torch.equal(rec["mask"][1][1], ids)  # dec_rate=0: dr-lab's content stream is unmasked too
    ref_total, ref_enc, ref_dec = _fe_loss(ref, batch)
    torch.testing.assert_close(torch.tensor(logs["enc"]), ref_enc.detach(), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(logs["dec"]), ref_dec.detach(), **LOSS_TOL)
    torch.testing.assert_close(total.detach(), ref_total.detach(), **LOSS_TOL)


def test_decoder_layer_alone_equals_bert_layer_for_decoder(fe, drlab_base):
    """EnhancedDecoderLayer vs BertLayerForDecoder on the same arbitrary query / content / mask."""
    dr, ref = _pair(fe, drlab_base, aligned=False)
    torch.manual_seed(3)
    b, n, h = 3, 9, dr.mlm.config.hidden_size
    query, content = torch.randn(b, n, h, requires_grad=True), torch.randn(b, n, h, requires_grad=True)
    blocked = torch.rand(b, n, n) < 0.5
    blocked[:, :, 0] = False
    out_dr = dr.decoder(query, content, blocked)
    add = _extended_attention_mask(ref.lm, (~blocked).long())
    out_fe = ref.c_head(query=query, key=content, value=content, attention_mask=add)[0]
    torch.testing.assert_close(out_dr, out_fe, **LOSS_TOL)
    (g_q_dr, g_c_dr) = torch.autograd.grad(out_dr.square().sum(), (query, content))
    (g_q_fe, g_c_fe) = torch.autograd.grad(out_fe.square().sum(), (query, content))
    torch.testing.assert_close(g_q_dr, g_q_fe, **GRAD_TOL)
    torch.testing.assert_close(g_c_dr, g_c_fe, **GRAD_TOL)


# --------------------------------------------------------------------------- documented differences


def _decoder_inputs(dr, ref, texts, seed):
    """(dr-lab (query, content), FlagEmbedding (query, content), h, dr-lab's decoder ids)."""
    seen = {}
    h1 = dr.decoder.register_forward_pre_hook(lambda m, a: seen.__setitem__("dr", a[:2]))
    h2 = ref.c_head.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("fe", (kw["query"], kw["key"])),
                                              with_kwargs=True)
    h3 = dr.encoder.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o.last_hidden_state[:, 0]))
    try:
        with torch.no_grad():
            _, _, rec = _drlab_loss(dr, texts, seed)
            _fe_loss(ref, _fe_batch_from_drlab(dr, texts, rec))
    finally:
        for hk in (h1, h2, h3):
            hk.remove()
    return seen["dr"], seen["fe"], seen["h"], rec["mask"][1][1]


def test_difference_stream_construction(fe, drlab_base):
    """Difference 1, on the unaltered BERT: the streams differ as documented, and so do the losses."""
    dr, ref = _pair(fe, drlab_base, aligned=False)
    (q_dr, c_dr), (q_fe, c_fe), h, dec_ids = _decoder_inputs(dr, ref, TEXTS[:4], 0)
    emb = dr.mlm.bert.embeddings
    n = dec_ids.shape[1]
    pos = emb.position_embeddings.weight[:n][None]
    tt0 = emb.token_type_embeddings.weight[0]
    ln = emb.LayerNorm
    tol = dict(rtol=1e-5, atol=1e-6)
    # dr-lab: query h + p_i; content LN([h, e(x'_1), ...] + p)
    torch.testing.assert_close(q_dr, h[:, None] + pos, **tol)
    torch.testing.assert_close(c_dr[:, 0], ln(h + pos[:, 0]), **tol)
    torch.testing.assert_close(c_dr[:, 1:], ln(emb.word_embeddings(dec_ids[:, 1:]) + pos[:, 1:]), **tol)
    # FlagEmbedding: query LN(h + tt_0 + p_i); content [h, LN(e(x_1) + tt_0 + p_1), ...]
    torch.testing.assert_close(q_fe, ln(h[:, None] + tt0 + pos), **tol)
    torch.testing.assert_close(c_fe[:, 0], h, **tol)
    torch.testing.assert_close(c_fe[:, 1:], ln(emb.word_embeddings(dec_ids[:, 1:]) + tt0 + pos[:, 1:]), **tol)
    assert float((q_dr - q_fe).abs().max()) > 1e-2 and float((c_dr[:, 0] - c_fe[:, 0]).abs().max()) > 1e-2
    # ... so, unaligned, the decoder losses differ (the encoder loss does not)
    _, logs, rec = _drlab_loss(dr, TEXTS[:4], 0)
    with torch.no_grad():
        _, ref_enc, ref_dec = _fe_loss(ref, _fe_batch_from_drlab(dr, TEXTS[:4], rec))
    assert logs["enc"] == pytest.approx(float(ref_enc), rel=1e-5)
    assert abs(logs["dec"] - float(ref_dec)) > 1e-3


def _visible_real_fraction(blocked, ids, attn, mask_id, special):
    """Mean over scored rows of: the fraction of the row's other text tokens it sees un-[MASK]ed."""
    text = attn.bool() & ~special
    fr = []
    for b in range(ids.shape[0]):
        for i in text[b].nonzero().flatten().tolist():
            others = text[b].clone()
            others[i] = False
            seen = others & ~blocked[b, i] & (ids[b] != mask_id)
            fr.append(seen.sum() / others.sum())
    return float(torch.stack(fr).mean())


def test_difference_decoder_masking(fe, drlab_base):
    """Difference 2: FlagEmbedding masks the decoder only through the matrix (a fixed count of whole
    words per row over unmasked ids); dr-lab masks the ids (dec_rate) and samples visibility per
    entry (dec_visible): both rows see ~50% of the text; the first version's dec_rate=.5 saw ~25%."""
    from retrievers.pretraining import special_mask, tokenize_batch

    dr = copy.deepcopy(drlab_base)
    tok = dr.tokenizer
    b = tokenize_batch(tok, LONG, MAX_LEN)
    ids, attn = b["input_ids"], b["attention_mask"]
    special = special_mask(tok, ids)
    text = attn.bool() & ~special

    random.seed(0)
    torch.manual_seed(0)
    batch = fe.data.RetroMAECollator(tokenizer=tok, max_seq_length=MAX_LEN, encoder_mlm_probability=0.3,
                                     decoder_mlm_probability=0.5)(LONG)
    fe_blocked = batch["decoder_attention_mask"] == 0
    assert torch.equal(batch["decoder_input_ids"], ids)  # no [MASK] in FlagEmbedding's decoder input
    torch.manual_seed(0)
    dr_ids, _ = dr._mask(ids, attn, dr.dec_rate)
    dr_blocked = dr.visibility(attn)
    mask_id = tok.mask_token_id
    assert dr.dec_rate == 0 and torch.equal(dr_ids, ids)  # like FlagEmbedding: the content stream is unmasked

    # both: every scored row sees position 0 (the sentence embedding), never itself
    for blocked in (fe_blocked, dr_blocked):
        rows = text.nonzero().tolist()
        assert not any(blocked[r, i, 0] for r, i in rows) and all(blocked[r, i, i] for r, i in rows)
    # FlagEmbedding: each row hides round(L * p) single-token words (+ itself); dr-lab: Binomial counts
    lens = attn.sum(1)
    for r in range(ids.shape[0]):
        k = int(round(int(lens[r]) * 0.5))
        hidden_fe = {int((fe_blocked[r, i] & text[r]).sum()) for i in text[r].nonzero().flatten().tolist()}
        assert hidden_fe <= {k, k + 1}, (hidden_fe, k)
    hidden_dr = {int((dr_blocked[r, i] & text[r]).sum()) for r, i in text.nonzero().tolist()}
    assert max(hidden_dr) - min(hidden_dr) > 4
    # FlagEmbedding: [SEP] never hidden from another row; dr-lab: hidden with probability 1 - dec_visible
    sep = ids == tok.sep_token_id
    assert not any(fe_blocked[r][text[r]][:, sep[r]].any() for r in range(ids.shape[0]))
    assert any(dr_blocked[r][text[r]][:, sep[r]].any() for r in range(ids.shape[0]))

    f_fe = _visible_real_fraction(fe_blocked, batch["decoder_input_ids"], attn, mask_id, special)
    f_dr = _visible_real_fraction(dr_blocked, dr_ids, attn, mask_id, special)
    assert 0.4 < f_fe < 0.6, f_fe
    assert 0.4 < f_dr < 0.6, f_dr
    dr.dec_rate = 0.5  # the first version's default: [MASK]s in the content stream too
    torch.manual_seed(0)
    old_ids, _ = dr._mask(ids, attn, dr.dec_rate)
    assert 0.35 < float((old_ids == mask_id)[text].float().mean()) < 0.65
    assert 0.15 < _visible_real_fraction(dr.visibility(attn), old_ids, attn, mask_id, special) < 0.35


def test_difference_encoder_masking(fe, drlab_base):
    """Difference 3: dr-lab's encoder corruption is token-level and all [MASK]; FlagEmbedding's is
    whole-word, a fixed count, with BERT's 80/10/10 replacement."""
    from retrievers.pretraining import special_mask, tokenize_batch

    dr = copy.deepcopy(drlab_base)
    tok = dr.tokenizer
    b = tokenize_batch(tok, LONG * 4, MAX_LEN)
    ids, attn = b["input_ids"], b["attention_mask"]
    torch.manual_seed(0)
    enc_ids, enc_m = dr._mask(ids, attn, dr.enc_rate)
    assert torch.equal(enc_ids[enc_m], torch.full_like(enc_ids[enc_m], tok.mask_token_id))
    assert not (enc_m & special_mask(tok, ids)).any()
    assert len({int(c) for c in enc_m.sum(1)}) > 3  # Bernoulli: counts vary for equal lengths
    random.seed(0)
    torch.manual_seed(0)
    batch = fe.data.RetroMAECollator(tokenizer=tok, max_seq_length=MAX_LEN, encoder_mlm_probability=0.3,
                                     decoder_mlm_probability=0.5)(LONG * 4)
    fe_m = batch["encoder_labels"] != -100
    assert torch.equal(batch["encoder_labels"][fe_m], ids[fe_m])
    assert bool((batch["encoder_input_ids"][fe_m] != tok.mask_token_id).any())  # 10% random + 10% kept
    unk = ids == tok.unk_token_id  # torch_mask_tokens un-masks special tokens, [UNK] included
    for r in range(ids.shape[0]):
        k = int(round(int(attn[r].sum()) * 0.3))  # a fixed count (these words are one piece each)
        assert k - int(unk[r].sum()) <= int(fe_m[r].sum()) <= k


def test_difference_decoder_layer_hyperparameters(fe, drlab_base):
    """Difference 4: dr-lab's decoder LayerNorm eps / dropout are fixed, FlagEmbedding's follow the config."""
    cfg = copy.deepcopy(drlab_base.mlm.config)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.2
    ref_layer = fe.enhancedDecoder.BertLayerForDecoder(cfg)
    assert ref_layer.output.LayerNorm.eps == cfg.layer_norm_eps == 1e-12
    assert ref_layer.attention.self.dropout.p == 0.2
    dec = drlab_base.decoder
    assert dec.ln1.eps == dec.ln2.eps == 1e-5 and dec.attn.dropout == 0.1 and dec.drop.p == 0.1
