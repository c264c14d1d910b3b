"""Ported-reference oracles for two pre-training methods, run against dr-lab on identical inputs.

Each oracle is the reference's own step function, copied with only the changes marked ``ADAPT``
(transformers 5 API, CPU, single process, injected randomness), and it runs on the *same* tiny
random weights, token ids, masks, sampled replacements and cropped views as dr-lab.

**SimLM** replaced language modelling (Wang et al. 2022) --
``microsoft/unilm`` read at commit ``768a3c873f598bb9b4d4dfb9267b099e35f8fe56``; the files
below last changed in ``63435c6909f5480ede67a86f32754244fc5ee260``:

* ``simlm/src/models/rlm.py`` -- ``ReplaceLM.forward`` / ``_replace_tokens`` / ``mlm_loss``
  (:class:`RefReplaceLM`);
* ``simlm/src/collators/rlm_collator.py`` + ``simlm/src/collators/collator_utils.py`` -- the
  masks, ``torch_mask_tokens(all_use_mask_token=True)`` and the labels (:func:`ref_rlm_collate`,
  :func:`ref_whole_word_mask`);
* ``simlm/scripts/train_rlm.sh`` / ``simlm/src/config.py`` -- 0.3 / 0.5 mask rates, 2 decoder
  layers, frozen generator, ``rlm_generator_mlm_weight`` 0.2.

dr-lab: ``retrievers/simlm.py`` (``SimLMPretrainer``).

**Contriever** MoCo (Izacard et al. 2022) -- ``facebookresearch/contriever`` read at commit
``39fb2201450cdba1648183737ed56d6b1bc33778``; ``src/moco.py`` and ``src/inbatch.py`` last
changed in ``5d2cbc7756d23790fd636649ec55c821855a84bb``, ``src/data.py`` in
``56e257bd1390d26cb02be1b8e11853f4dc8b9637``:

* ``src/moco.py`` -- ``MoCo`` (:class:`RefMoCo`); ``src/inbatch.py`` -- ``InBatch``
  (:func:`ref_inbatch_loss`); ``src/contriever.py`` -- ``Contriever.forward`` average pooling
  (:class:`RefContriever`); ``src/data.py`` -- ``randomcrop`` / ``deleteword`` / ``add_bos_eos``
  (:func:`ref_view`).

dr-lab: ``retrievers/contriever.py`` (``ContrieverPretrainer``).

What matches (asserted below): SimLM's encoder loss, decoder loss, total loss and every parameter
gradient, the corrupted encoder / decoder inputs and the generator MLM loss; Contriever's MoCo loss,
query weights, momentum-updated key weights, queue contents and pointer over three optimiser steps,
and the in-batch loss and gradients. Losses to rtol 1e-5 / atol 1e-6 (fp32), weights and gradients
to rtol 1e-4 / atol 1e-6.

Where dr-lab deliberately differs, the comparison is configured equivalently and a ``test_diff_*``
test pins the difference down (see each one's docstring):

* SimLM: one generator pass on the decoder-masked input whose samples serve the encoder too (the
  reference: two passes, the encoder's on its own 30 %-masked input); the jointly trained
  generator's MLM loss on the decoder's masked positions at weight 1 (the reference: on the
  encoder's positions at ``rlm_generator_mlm_weight`` 0.2 -- the paper's generator is frozen, no
  such term); token-level Bernoulli masks (the reference: whole-word masks of a fixed count
  ``round(0.3 * len)`` per passage, [CLS]/[SEP] counted in ``len``); [UNK] tokens are masked and
  scored (the reference labels every special id, [UNK] and [MASK] included, -100).
* Contriever: embeddings always L2-normalised (the released run: raw dot products); the queue
  starts empty and only filled rows are negatives (the reference: ``queue_size`` random unit
  vectors); the momentum update runs after the optimiser step instead of at the start of the next
  forward (identical key weights from the identical init); any ``queue_size`` (the reference
  asserts ``queue_size % batch == 0``); crop length ``max(1, round(n * ratio))`` of one passage
  (the reference: ``int(n * ratio)``, possibly 0, of a 256-token chunk of the token stream).
"""

from __future__ import annotations

import copy
import random
from contextlib import nullcontext

import pytest
import torch
from conftest import TINY_DOCS, TINY_QUERIES, make_tiny_bert
from torch import nn

TEXTS = [f"{t}. {x} {x}" for _, t, x in TINY_DOCS]
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
# Random weights drawn at std 0.3 (BERT's default 0.02 gives near-identical embeddings and near-uniform
# MLM logits on a 2-layer, 32-wide model: the comparisons would be between almost-constant numbers).
INIT = {"initializer_range": 0.3}
WEIGHT_TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("oracle-bert"), TEXTS + [q for _, q in TINY_QUERIES],
                          hidden=32, seed=5, punctuation=True)


# =========================================================================== SimLM oracle
# Port of microsoft/unilm@768a3c873f598bb9b4d4dfb9267b099e35f8fe56 simlm/src/models/rlm.py and
# simlm/src/collators/{rlm_collator,collator_utils}.py (unchanged since 63435c6909f5480ede67a86f32754244fc5ee260).


def ref_whole_word_mask(tokenizer, input_tokens, mlm_prob, rng, max_predictions=512):
    """collator_utils.whole_word_mask. ADAPT: ``rng`` instead of the global ``random``."""
    cand_indexes = []
    for (i, token) in enumerate(input_tokens):
        if token == "[CLS]" or token == "[SEP]":
            continue
        if len(cand_indexes) >= 1 and token.startswith("##"):
            cand_indexes[-1].append(i)
        else:
            cand_indexes.append([i])
    rng.shuffle(cand_indexes)
    num_to_predict = min(max_predictions, max(1, int(round(len(input_tokens) * mlm_prob))))
    masked_lms = []
    covered_indexes = set()
    for index_set in cand_indexes:
        if len(masked_lms) >= num_to_predict:
            break
        if len(masked_lms) + len(index_set) > num_to_predict:
            continue
        if any(index in covered_indexes for index in index_set):
            continue
        for index in index_set:
            covered_indexes.add(index)
            masked_lms.append(index)
    return [1 if i in covered_indexes else 0 for i in range(len(input_tokens))]


def ref_decoder_mask(tokenizer, tokens, enc_mask, enc_prob, dec_prob, rng):
    """rlm_collator.torch_call: the decoder's mask = the encoder's OR an independent extra mask."""
    extra_mlm_prob = (dec_prob - enc_prob) / (1 - enc_prob)
    decoder_mask = enc_mask[:]
    if extra_mlm_prob > 1e-4:
        decoder_mask = [max(m1, m2) for m1, m2 in
                        zip(decoder_mask, ref_whole_word_mask(tokenizer, tokens, extra_mlm_prob, rng))]
    return decoder_mask


def ref_torch_mask_tokens(tokenizer, inputs, mask_labels):
    """collator_utils.torch_mask_tokens with ``all_use_mask_token=True`` (train_rlm.sh)."""
    labels = inputs.clone()
    masked_inputs = inputs.clone()
    probability_matrix = mask_labels.clone().long()
    special_tokens_mask = [tokenizer.get_special_tokens_mask(val, already_has_special_tokens=True)
                           for val in labels.tolist()]
    probability_matrix.masked_fill_(torch.tensor(special_tokens_mask, dtype=torch.bool), value=0)
    probability_matrix.masked_fill_(labels.eq(tokenizer.pad_token_id), value=0)
    masked_indices = probability_matrix.bool()
    labels[~masked_indices] = -100
    masked_inputs[masked_indices] = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    return masked_inputs, labels


def ref_rlm_collate(tokenizer, batch, enc_mask, dec_mask):
    """rlm_collator.torch_call after the masks are drawn. ADAPT: the (padded) masks are passed in."""
    out = {}
    enc_inputs, enc_labels = ref_torch_mask_tokens(tokenizer, batch["input_ids"], enc_mask)
    dec_inputs, dec_labels = ref_torch_mask_tokens(tokenizer, batch["input_ids"], dec_mask)
    for prefix, ids, lab in (("enc_", enc_inputs, enc_labels), ("dec_", dec_inputs, dec_labels)):
        out[prefix + "input_ids"] = ids
        out[prefix + "attention_mask"] = batch["attention_mask"].clone()
        out[prefix + "token_type_ids"] = batch["token_type_ids"].clone()
        out[prefix + "labels"] = lab
    labels = batch["input_ids"].clone()
    for special_id in tokenizer.all_special_ids:
        labels[labels == special_id] = -100
    out["labels"] = labels
    return out


def slice_batch_dict(batch_dict, prefix):
    """simlm/src/utils.py slice_batch_dict."""
    return {k[len(prefix):]: v for k, v in batch_dict.items() if k.startswith(prefix)}


def categorical_sample(logits):
    return torch.distributions.Categorical(logits=logits).sample()


class RefReplaceLM:
    """rlm.py ReplaceLM around dr-lab's modules (encoder = the BertForMaskedLM, decoder = the copied
    layers, generator). ADAPT: ``sampler`` replaces ``Categorical(logits=...).sample()`` so a test
    can inject the draws; the decoder pass's generator loss, which the reference computes and
    discards, is returned as ``g_mlm_loss_dec``; transformers 5 has no
    ``get_extended_attention_mask`` (its v4 body is inlined) and ``BertLayer`` returns a tensor."""

    def __init__(self, encoder, decoder, generator, freeze_generator=True, generator_mlm_weight=0.2,
                 sampler=categorical_sample):
        self.encoder, self.decoder, self.generator = encoder, decoder, generator
        self.freeze_generator, self.generator_mlm_weight = freeze_generator, generator_mlm_weight
        self.sampler = sampler
        self.cross_entropy = nn.CrossEntropyLoss(reduction="mean")

    def forward(self, model_input):
        encoder_inputs = slice_batch_dict(model_input, "enc_")
        decoder_inputs = slice_batch_dict(model_input, "dec_")
        labels = model_input["labels"]

        enc_sampled_input_ids, g_mlm_loss = self._replace_tokens(encoder_inputs)
        if self.freeze_generator:
            g_mlm_loss = torch.tensor(0, dtype=torch.float, device=g_mlm_loss.device)
        dec_sampled_input_ids, g_mlm_loss_dec = self._replace_tokens(decoder_inputs, no_grad=True)

        encoder_inputs["input_ids"] = enc_sampled_input_ids
        decoder_inputs["input_ids"] = dec_sampled_input_ids
        encoder_inputs["labels"] = labels
        decoder_inputs["labels"] = labels

        encoder_out = self.encoder(**encoder_inputs, output_hidden_states=True, return_dict=True)
        cls_hidden = encoder_out.hidden_states[-1][:, :1]
        dec_inputs_embeds = self.encoder.bert.embeddings(input_ids=decoder_inputs["input_ids"])
        hiddens = torch.cat([cls_hidden, dec_inputs_embeds[:, 1:]], dim=1)

        # ADAPT: transformers-4 ModuleUtilsMixin.get_extended_attention_mask for a 2-D mask
        ext = encoder_inputs["attention_mask"][:, None, None, :].to(hiddens.dtype)
        attention_mask = (1.0 - ext) * torch.finfo(hiddens.dtype).min

        for layer in self.decoder:
            layer_out = layer(hiddens, attention_mask)
            hiddens = layer_out[0] if isinstance(layer_out, tuple) else layer_out  # ADAPT

        decoder_mlm_loss = self.mlm_loss(hiddens, labels)
        loss = decoder_mlm_loss + encoder_out.loss + g_mlm_loss * self.generator_mlm_weight
        return {"loss": loss, "encoder_mlm_loss": encoder_out.loss, "decoder_mlm_loss": decoder_mlm_loss,
                "g_mlm_loss": g_mlm_loss, "g_mlm_loss_dec": g_mlm_loss_dec,
                "enc_input_ids": enc_sampled_input_ids, "dec_input_ids": dec_sampled_input_ids}

    def _replace_tokens(self, batch_dict, no_grad=False):
        with torch.no_grad() if self.freeze_generator or no_grad else nullcontext():
            outputs = self.generator(**batch_dict, return_dict=True)
        with torch.no_grad():
            sampled_input_ids = self.sampler(outputs.logits)
            is_mask = (batch_dict["labels"] >= 0).long()
            sampled_input_ids = batch_dict["input_ids"] * (1 - is_mask) + sampled_input_ids * is_mask
        return sampled_input_ids.long(), outputs.loss

    def mlm_loss(self, hiddens, labels):
        pred_scores = self.encoder.cls(hiddens)
        return self.cross_entropy(pred_scores.view(-1, self.encoder.config.vocab_size), labels.view(-1))


# --------------------------------------------------------------------------- SimLM helpers


def _simlm(ckpt, **kw):
    from retrievers.simlm import SimLMPretrainer

    torch.manual_seed(0)  # the MLM head the tiny checkpoint lacks is initialised from the global RNG
    return SimLMPretrainer(str(ckpt), init_config=INIT, seed=0, **kw).train()


def _record_corrupt(m):
    """Wrap ``m.corrupt`` so the test sees the ids, masks and replacements of ``m.loss``'s step."""
    rec, orig = {}, m.corrupt

    def corrupt(ids, attn):
        out = orig(ids, attn)
        rec.update(ids=ids.clone(), attn=attn.clone(), enc_ids=out[0].clone(), dec_ids=out[1].clone(),
                   enc_m=out[2].clone(), dec_m=out[3].clone(), gen_loss=out[4])
        return out

    m.corrupt = corrupt
    return rec


def _ref_inputs(m, texts, rec):
    from retrievers.pretraining import tokenize_batch

    b = tokenize_batch(m.tokenizer, texts, m.max_len)
    assert torch.equal(b["input_ids"], rec["ids"])
    assert not (b["input_ids"] == m.tokenizer.unk_token_id).any()  # see test_diff_simlm_unk_is_scored
    return ref_rlm_collate(m.tokenizer, b, rec["enc_m"].long(), rec["dec_m"].long())


def _grads(modules):
    return {f"{i}.{n}": p.grad.detach().clone() for i, mod in enumerate(modules)
            for n, p in mod.named_parameters() if p.grad is not None}


def _argmax(logits):
    return logits.argmax(-1)


def _argmax_rows(logits, generator=None):  # dr-lab's sample_tokens in the zero-temperature limit
    return logits.argmax(-1)


# =========================================================================== SimLM tests


def test_simlm_decoder_is_a_copy_of_the_last_encoder_layers(ckpt):
    """rlm.py: ``self.decoder = copy.deepcopy(self.encoder.bert.encoder.layer[-args.rlm_decoder_layers:])``."""
    m = _simlm(ckpt, generator="random", decoder_layers=2)
    enc_layers = m.mlm.bert.encoder.layer[-2:]
    assert len(m.decoder) == 2
    for d, e in zip(m.decoder, enc_layers):
        sd, se = d.state_dict(), e.state_dict()
        assert sd.keys() == se.keys()
        for k in sd:
            assert torch.equal(sd[k], se[k]) and sd[k].data_ptr() != se[k].data_ptr(), k


def test_simlm_losses_and_gradients_match_reference_frozen_generator(ckpt):
    """The paper's setting (frozen generator: ``generator=random`` here, ``rlm_freeze_generator``
    there): on the same ids, masks and sampled replacements the encoder loss, decoder loss,
    total and every gradient equal the reference's."""
    m = _simlm(ckpt, generator="random", enc_rate=0.3, dec_rate=0.5)
    rec = _record_corrupt(m)
    texts = TEXTS[:6]
    torch.manual_seed(11)
    loss, logs = m.loss(texts)
    assert "gen" not in logs
    enc_m, dec_m = rec["enc_m"], rec["dec_m"]
    assert enc_m.sum() > 10 and (dec_m & ~enc_m).sum() > 10
    assert (rec["dec_ids"] != rec["ids"]).sum() > 10  # tokens were actually replaced
    m.zero_grad(set_to_none=True)
    loss.backward()
    g_dr = _grads([m.mlm, m.decoder])

    # the reference replays dr-lab's draws: its sampler returns dr-lab's replaced sequence
    ref = RefReplaceLM(m.mlm, m.decoder, m.generator, freeze_generator=True, sampler=lambda _: rec["dec_ids"])
    out = ref.forward(_ref_inputs(m, texts, rec))
    # the reference's mixing rule (``ids * (1 - is_mask) + sampled * is_mask``) gives dr-lab's inputs
    assert torch.equal(out["enc_input_ids"], rec["enc_ids"])
    assert torch.equal(out["dec_input_ids"], rec["dec_ids"])
    torch.testing.assert_close(torch.tensor(logs["enc"]), out["encoder_mlm_loss"].detach(), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(logs["dec"]), out["decoder_mlm_loss"].detach(), **LOSS_TOL)
    torch.testing.assert_close(loss.detach(), out["loss"].detach(), **LOSS_TOL)
    assert float(out["g_mlm_loss"]) == 0.0
    m.zero_grad(set_to_none=True)
    out["loss"].backward()
    g_ref = _grads([m.mlm, m.decoder])
    assert g_dr.keys() == g_ref.keys() and len(g_dr) > 20
    for k in g_dr:
        torch.testing.assert_close(g_dr[k], g_ref[k], **WEIGHT_TOL, msg=lambda s, k=k: f"{k}: {s}")
    assert all(p.grad is None for p in m.generator.parameters())


def test_simlm_ten_adamw_steps_track_the_reference(ckpt):
    """Pre-training next to the reference for the same steps (issue 16): two copies of one model, one
    trained by dr-lab's ``loss``, one by rlm.py's forward on the same draws, 10 AdamW steps (lr 1e-3)
    on one batch. The two loss curves agree at every step and the weights end equal: over a run,
    not only at one step, dr-lab computes what the reference computes. The loss falls, so the
    curves compared are not flat."""
    a = _simlm(ckpt, generator="random", enc_rate=0.3, dec_rate=0.5)
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-3)
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-3)
    rec = _record_corrupt(a)
    texts = TEXTS[:6]
    curve_a, curve_b = [], []
    for step in range(10):
        torch.manual_seed(100 + step)  # new masks and replacements every step
        loss, _ = a.loss(texts)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()
        ref = RefReplaceLM(b.mlm, b.decoder, b.generator, freeze_generator=True, sampler=lambda _: rec["dec_ids"])
        out = ref.forward(_ref_inputs(b, texts, rec))
        opt_b.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt_b.step()
        curve_a.append(float(loss.detach()))
        curve_b.append(float(out["loss"].detach()))
    torch.testing.assert_close(torch.tensor(curve_a), torch.tensor(curve_b), rtol=1e-4, atol=1e-5)
    assert curve_a[-1] < curve_a[0] - 0.5, curve_a
    compared = 0
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if n.endswith("key.bias"):  # gradient 0 in exact math (softmax ignores it): Adam amplifies the float noise
            continue
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")
        compared += 1
    assert compared > 30


def test_simlm_generator_samples_from_its_masked_input_like_reference(ckpt, monkeypatch):
    """Equal rates (0.4 / 0.4: the reference's decoder batch is then a copy of the encoder's) and
    zero-temperature sampling on both sides (argmax of the generator's logits): dr-lab's own
    ``corrupt`` gives exactly the reference's encoder and decoder inputs and generator MLM loss, so
    the replacements come from the generator's logits on the masked sequence. A jointly trained
    generator's loss enters dr-lab's total at weight 1 (the reference: 0.2)."""
    import retrievers.pretraining as P

    monkeypatch.setattr(P, "sample_tokens", _argmax_rows)
    m = _simlm(ckpt, generator="joint", enc_rate=0.4, dec_rate=0.4)
    rec = _record_corrupt(m)
    texts = TEXTS[:6]
    torch.manual_seed(12)
    loss, logs = m.loss(texts)
    assert torch.equal(rec["enc_m"], rec["dec_m"]) and rec["enc_m"].sum() > 10
    m.zero_grad(set_to_none=True)
    loss.backward()
    g_dr = _grads([m.mlm, m.decoder, m.generator])

    inputs = _ref_inputs(m, texts, rec)
    ref = RefReplaceLM(m.mlm, m.decoder, m.generator, freeze_generator=False, generator_mlm_weight=1.0,
                       sampler=_argmax)
    out = ref.forward(inputs)
    assert torch.equal(out["enc_input_ids"], rec["enc_ids"]) and torch.equal(out["dec_input_ids"], rec["dec_ids"])
    assert (rec["enc_ids"] != rec["ids"]).sum() > 5
    torch.testing.assert_close(rec["gen_loss"].detach(), out["g_mlm_loss"].detach(), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(logs["gen"]), out["g_mlm_loss"].detach(), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(logs["enc"]), out["encoder_mlm_loss"].detach(), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(logs["dec"]), out["decoder_mlm_loss"].detach(), **LOSS_TOL)
    torch.testing.assert_close(loss.detach(), out["loss"].detach(), **LOSS_TOL)
    m.zero_grad(set_to_none=True)
    out["loss"].backward()
    g_ref = _grads([m.mlm, m.decoder, m.generator])
    assert g_dr.keys() == g_ref.keys() and any(k.startswith("2.") for k in g_dr)  # the generator trains
    for k in g_dr:
        torch.testing.assert_close(g_dr[k], g_ref[k], **WEIGHT_TOL, msg=lambda s, k=k: f"{k}: {s}")

    # DIFFERENCE (weight): the reference's joint generator term is 0.2 x its MLM loss, dr-lab's 1 x
    ref02 = RefReplaceLM(m.mlm, m.decoder, m.generator, freeze_generator=False, generator_mlm_weight=0.2,
                         sampler=_argmax).forward(inputs)
    torch.testing.assert_close(loss.detach() - ref02["loss"].detach(), 0.8 * out["g_mlm_loss"].detach(), **LOSS_TOL)
    assert loss.item() - ref02["loss"].item() > 0.1


def test_diff_simlm_encoder_replacements_come_from_the_decoder_pass(ckpt, monkeypatch):
    """DIFFERENCE (deliberate, documented in SimLMPretrainer): at 0.3 / 0.5 the reference runs the
    generator twice -- on the encoder's input (only its 30 % masked) and on the decoder's (50 %
    masked) -- and samples each independently; dr-lab runs it once on the decoder-masked input and
    the encoder takes the same sample at its positions. With deterministic (argmax) sampling and the
    same masks, dr-lab's decoder input and generator loss equal the reference's decoder pass, while
    the encoder inputs differ: the reference's generator saw more context."""
    import retrievers.pretraining as P

    monkeypatch.setattr(P, "sample_tokens", _argmax_rows)
    m = _simlm(ckpt, generator="joint", enc_rate=0.3, dec_rate=0.5)
    rec = _record_corrupt(m)
    torch.manual_seed(13)
    m.loss(TEXTS[:6])
    enc_m, dec_m = rec["enc_m"], rec["dec_m"]
    assert bool((enc_m <= dec_m).all()) and (dec_m & ~enc_m).any()
    inputs = _ref_inputs(m, TEXTS[:6], rec)
    out = RefReplaceLM(m.mlm, m.decoder, m.generator, freeze_generator=False, sampler=_argmax).forward(inputs)
    assert torch.equal(out["dec_input_ids"], rec["dec_ids"])  # the decoder passes agree
    torch.testing.assert_close(rec["gen_loss"].detach(), out["g_mlm_loss_dec"].detach(), **LOSS_TOL)
    # dr-lab: the encoder's replacement is the decoder's sample; the reference draws it from a second
    # pass whose input has only the encoder's positions masked -- a different distribution
    assert torch.equal(rec["enc_ids"][enc_m], rec["dec_ids"][enc_m])
    assert torch.equal(out["enc_input_ids"][~enc_m], rec["enc_ids"][~enc_m])
    with torch.no_grad():
        p_ref = m.generator(input_ids=inputs["enc_input_ids"], attention_mask=inputs["enc_attention_mask"]).logits
        p_dr = m.generator(input_ids=inputs["dec_input_ids"], attention_mask=inputs["dec_attention_mask"]).logits
    assert (p_ref[enc_m].softmax(-1) - p_dr[enc_m].softmax(-1)).abs().max() > 1e-3
    # ... and the reference's generator loss is the encoder pass's (30 % masked), not dr-lab's
    assert abs(out["g_mlm_loss"].item() - rec["gen_loss"].item()) > 1e-3


def test_diff_simlm_mask_counts_and_nesting_vs_reference_collator(ckpt):
    """Both draw the encoder's mask inside the decoder's at marginal rates 0.3 / 0.5. DIFFERENCE: the
    reference masks whole words, a fixed ``round(0.3 * len(tokens))`` per passage ([CLS] and [SEP]
    counted in ``len``) plus an independent extra mask at (0.5 - 0.3) / 0.7; dr-lab masks each text
    token independently (Bernoulli), so the count varies between passages of one length."""
    m = _simlm(ckpt, generator="random", enc_rate=0.3, dec_rate=0.5)
    V, n_text, rows = m.mlm.config.vocab_size, 30, 48
    g = torch.Generator().manual_seed(0)
    body = torch.randint(5, V, (rows, n_text), generator=g)
    ids = torch.cat([torch.full((rows, 1), m.tokenizer.cls_token_id), body,
                     torch.full((rows, 1), m.tokenizer.sep_token_id)], dim=1)
    ids[ids == m.tokenizer.unk_token_id] = 5
    attn = torch.ones_like(ids)
    torch.manual_seed(14)
    _, _, enc_m, dec_m, _ = m.corrupt(ids, attn)
    assert bool((enc_m <= dec_m).all()) and not enc_m[:, [0, -1]].any() and not dec_m[:, [0, -1]].any()
    assert abs(enc_m.float().mean().item() * (n_text + 2) / n_text - 0.3) < 0.04
    assert abs(dec_m.float().mean().item() * (n_text + 2) / n_text - 0.5) < 0.04
    assert enc_m.sum(1).unique().numel() > 3  # the count varies

    rng = random.Random(0)
    ref_enc, ref_dec = [], []
    for row in ids.tolist():
        toks = m.tokenizer.convert_ids_to_tokens(row)
        e = ref_whole_word_mask(m.tokenizer, toks, 0.3, rng)
        d = ref_decoder_mask(m.tokenizer, toks, e, 0.3, 0.5, rng)
        ref_enc.append(e)
        ref_dec.append(d)
    ref_enc, ref_dec = torch.tensor(ref_enc).bool(), torch.tensor(ref_dec).bool()
    assert bool((ref_enc <= ref_dec).all()) and not ref_dec[:, [0, -1]].any()
    e, x = round((n_text + 2) * 0.3), round((n_text + 2) * 0.2 / 0.7)
    assert set(ref_enc.sum(1).tolist()) == {e}  # a fixed count, [CLS] / [SEP] counted in len
    # the decoder's: the union with an independent extra mask of x words (about 0.5 of the tokens)
    assert abs(ref_dec.float().sum(1).mean().item() - (e + x * (1 - e / n_text))) < 0.7


def test_diff_simlm_unk_is_scored(ckpt):
    """DIFFERENCE (minor): the reference's labels are -100 at every id in ``all_special_ids`` --
    [UNK] and [MASK] too -- and it never masks [UNK]; dr-lab leaves only [CLS]/[SEP]/[PAD] out, so
    an [UNK] in the text is a candidate for masking and is scored."""
    m = _simlm(ckpt, generator="random")
    b = m.tokenizer(["volcanoes zzzunknownzzz penguins"], return_tensors="pt")
    unk = b["input_ids"] == m.tokenizer.unk_token_id
    assert unk.sum() == 1
    ref = ref_rlm_collate(m.tokenizer, b, torch.ones_like(b["input_ids"]), torch.ones_like(b["input_ids"]))
    assert (ref["labels"][unk] == -100).all() and (ref["enc_labels"][unk] == -100).all()
    assert m.scored(b["input_ids"], b["attention_mask"])[unk].all()
    scored_ref = ref["labels"] != -100
    assert torch.equal(scored_ref | unk, m.scored(b["input_ids"], b["attention_mask"]))


def test_simlm_sampling_follows_the_reference_categorical():
    """dr-lab draws replacements by inverse CDF (``sample_tokens``), the reference with
    ``Categorical(logits=...).sample()``: same distribution (total variation on 200k draws each)."""
    from retrievers.pretraining import sample_tokens

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(1, 40, generator=g) * 2).expand(200_000, 40)
    torch.manual_seed(4)
    a = torch.bincount(sample_tokens(logits), minlength=40).float() / len(logits)
    torch.manual_seed(5)
    b = torch.bincount(categorical_sample(logits), minlength=40).float() / len(logits)
    p = torch.softmax(logits[0], -1)
    assert 0.5 * (a - b).abs().sum() < 0.02
    assert 0.5 * (a - p).abs().sum() < 0.015 and 0.5 * (b - p).abs().sum() < 0.015


# =========================================================================== Contriever oracle
# Port of facebookresearch/contriever@39fb2201450cdba1648183737ed56d6b1bc33778 src/moco.py, src/inbatch.py
# (last changed 5d2cbc7756d23790fd636649ec55c821855a84bb), src/contriever.py and src/data.py.


class RefContriever(nn.Module):
    """src/contriever.py ``Contriever.forward`` (pooling="average"). ADAPT: wraps a BertModel instead of
    subclassing it (same parameters, same order)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids=None, attention_mask=None, normalize=False):
        model_output = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        last_hidden = model_output["last_hidden_state"]
        last_hidden = last_hidden.masked_fill(~attention_mask[..., None].bool(), 0.0)
        emb = last_hidden.sum(dim=1) / attention_mask.sum(dim=1)[..., None]
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb


class RefMoCo(nn.Module):
    """src/moco.py ``MoCo``. ADAPT: built around a given retriever (``_load_retriever`` loads from the
    hub); the random initial queue comes from a seeded generator; ``dist_utils.gather_nograd`` is the
    identity in one process; labels on the logits' device (``.cuda()`` there)."""

    def __init__(self, retriever, queue_size, momentum, temperature, label_smoothing=0.0, norm_query=False,
                 norm_doc=False, projection_size=32, moco_train_mode_encoder_k=False, queue_seed=0):
        super().__init__()
        self.queue_size = queue_size
        self.momentum = momentum
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.norm_doc = norm_doc
        self.norm_query = norm_query
        self.moco_train_mode_encoder_k = moco_train_mode_encoder_k
        self.encoder_q = retriever
        self.encoder_k = copy.deepcopy(retriever)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        g = torch.Generator().manual_seed(queue_seed)
        self.register_buffer("queue", torch.randn(projection_size, self.queue_size, generator=g))
        self.queue = nn.functional.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.momentum + param_q.data * (1.0 - self.momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = keys.contiguous()  # dist_utils.gather_nograd: one process
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.queue_size % batch_size == 0, f"{batch_size}, {self.queue_size}"  # for simplicity
        self.queue[:, ptr: ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.queue_size
        self.queue_ptr[0] = ptr

    def _compute_logits(self, q, k):
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        return torch.cat([l_pos, l_neg], dim=1)

    def forward(self, q_tokens, q_mask, k_tokens, k_mask):
        bsz = q_tokens.size(0)
        q = self.encoder_q(input_ids=q_tokens, attention_mask=q_mask, normalize=self.norm_query)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            if not self.encoder_k.training and not self.moco_train_mode_encoder_k:
                self.encoder_k.eval()
            k = self.encoder_k(input_ids=k_tokens, attention_mask=k_mask, normalize=self.norm_doc)
        logits = self._compute_logits(q, k) / self.temperature
        labels = torch.zeros(bsz, dtype=torch.long, device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self._dequeue_and_enqueue(k)
        return loss, k


def ref_inbatch_loss(encoder, q_tokens, q_mask, k_tokens, k_mask, temperature, norm_query, norm_doc,
                     label_smoothing=0.0):
    """src/inbatch.py ``InBatch.forward`` (one process: gather is the identity, rank 0)."""
    bsz = len(q_tokens)
    labels = torch.arange(0, bsz, dtype=torch.long, device=q_tokens.device)
    qemb = encoder(input_ids=q_tokens, attention_mask=q_mask, normalize=norm_query)
    kemb = encoder(input_ids=k_tokens, attention_mask=k_mask, normalize=norm_doc)
    scores = torch.einsum("id, jd->ij", qemb / temperature, kemb)
    return torch.nn.functional.cross_entropy(scores, labels, label_smoothing=label_smoothing)


def ref_view(tokens, ratio, start, delete_draws, p, bos, eos):
    """src/data.py ``randomcrop`` -> ``apply_augmentation(delete)`` -> ``add_bos_eos``. ADAPT: the
    draws of ``random.uniform`` (``ratio``), ``random.randint`` (``start``) and ``np.random.rand``
    (``delete_draws``) are passed in; lists instead of tensors."""
    length = int(len(tokens) * ratio)
    assert 0 <= start <= len(tokens) - length
    crop = tokens[start: start + length]
    crop = [e for e, m in zip(crop, delete_draws) if m > p]
    return [bos, *crop, eos]


# --------------------------------------------------------------------------- Contriever helpers


def _contriever(ckpt, **kw):
    from retrievers.contriever import ContrieverPretrainer

    torch.manual_seed(0)
    return ContrieverPretrainer(str(ckpt), init_config=INIT, seed=0, **kw).train()


def _record_views(m):
    rec, orig = [], m.views

    def views(texts):
        va, vb = orig(texts)
        rec.append(({k: v.clone() for k, v in va.items()}, {k: v.clone() for k, v in vb.items()}))
        return va, vb

    m.views = views
    return rec


def _assert_params_close(a: nn.Module, b: nn.Module, **tol):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and len(pa) > 10
    for n in pa:
        torch.testing.assert_close(pa[n].detach(), pb[n].detach(), **tol, msg=lambda s, n=n: f"{n}: {s}")


# =========================================================================== Contriever tests

K, B, MOMENTUM, TEMP, LR = 8, 4, 0.9, 0.05, 0.2


def test_moco_three_steps_match_reference(ckpt):
    """Loss, query weights, momentum key weights, queue and pointer over three SGD steps, on
    dr-lab's cropped views. Configured equivalently: normalised query and key (``norm_query``,
    ``norm_doc``), label smoothing 0, queue size a multiple of the batch, and dr-lab's queue
    pre-filled with the reference's initial random unit vectors. The reference updates the key
    encoder at the start of each forward, dr-lab after each optimiser step: from the identical
    init (theta_k = theta_q, so the reference's first update is a no-op) the key weights that
    encode each step's keys are the same."""
    m = _contriever(ckpt, moco=True, queue_size=K, momentum=MOMENTUM, temperature=TEMP)
    dim = m.encoder.config.hidden_size
    ref = RefMoCo(RefContriever(copy.deepcopy(m.encoder)), queue_size=K, momentum=MOMENTUM, temperature=TEMP,
                  label_smoothing=0.0, norm_query=True, norm_doc=True, projection_size=dim, queue_seed=1).train()
    with torch.no_grad():
        m.queue.copy_(ref.queue.T)
        m.queue_filled.fill_(K)
        m.queue_ptr.zero_()
    init_k = {n: p.detach().clone() for n, p in m.key_encoder.named_parameters()}
    init_queue = m.queue.clone()
    rec = _record_views(m)
    opt_dr = torch.optim.SGD(m.encoder.parameters(), lr=LR)
    opt_ref = torch.optim.SGD(ref.encoder_q.parameters(), lr=LR)
    for step in range(3):
        loss, logs = m.loss(TEXTS[B * step: B * (step + 1)])
        assert logs["queue"] == K
        va, vb = rec[-1]
        assert not torch.equal(va["input_ids"], vb["input_ids"])
        loss_ref, k_ref = ref(va["input_ids"], va["attention_mask"], vb["input_ids"], vb["attention_mask"])
        _assert_params_close(m.key_encoder, ref.encoder_k.bert, **WEIGHT_TOL)  # keys from the same weights
        torch.testing.assert_close(m._pending_keys, k_ref, **WEIGHT_TOL)
        torch.testing.assert_close(loss.detach(), loss_ref.detach(), **LOSS_TOL)
        for opt, lo in ((opt_dr, loss), (opt_ref, loss_ref)):
            opt.zero_grad(set_to_none=True)
            lo.backward()
            opt.step()
        m.after_step()
        _assert_params_close(m.encoder, ref.encoder_q.bert, **WEIGHT_TOL)
        torch.testing.assert_close(m.queue, ref.queue.T, **WEIGHT_TOL)
        assert int(m.queue_ptr) == int(ref.queue_ptr) == (B * (step + 1)) % K
    with torch.no_grad():
        ref._momentum_update_key_encoder()  # what the reference's 4th forward starts with
    _assert_params_close(m.key_encoder, ref.encoder_k.bert, **WEIGHT_TOL)
    # the comparison is not vacuous: the key weights moved well beyond the tolerance, the queue was overwritten
    moved = max((p.detach() - init_k[n]).abs().max().item() for n, p in m.key_encoder.named_parameters())
    assert moved > 1e-3
    assert not torch.allclose(m.queue, init_queue)


def test_moco_momentum_update_formula_matches_reference(ckpt):
    """One ``after_step`` against the reference's ``_momentum_update_key_encoder`` on arbitrary weights:
    theta_k <- m theta_k + (1 - m) theta_q (a swapped m / 1 - m would fail)."""
    m = _contriever(ckpt, moco=True, queue_size=K, momentum=0.7)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    ref = RefMoCo(RefContriever(copy.deepcopy(m.encoder)), queue_size=K, momentum=0.7, temperature=TEMP,
                  projection_size=m.encoder.config.hidden_size)
    ref.encoder_k.bert.load_state_dict(m.key_encoder.state_dict())  # the old key weights on both sides
    m.after_step()
    ref._momentum_update_key_encoder()
    _assert_params_close(m.key_encoder, ref.encoder_k.bert, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(next(m.key_encoder.parameters()), next(m.encoder.parameters()))


def test_inbatch_matches_reference(ckpt):
    """``moco: false`` against src/inbatch.py (normalised, temperature 0.05): loss and gradients."""
    m = _contriever(ckpt, moco=False, temperature=TEMP)
    rec = _record_views(m)
    loss, _ = m.loss(TEXTS[:6])
    m.zero_grad(set_to_none=True)
    loss.backward()
    g_dr = _grads([m.encoder])
    va, vb = rec[-1]
    ref_enc = RefContriever(m.encoder)
    loss_ref = ref_inbatch_loss(ref_enc, va["input_ids"], va["attention_mask"], vb["input_ids"], vb["attention_mask"],
                                TEMP, norm_query=True, norm_doc=True)
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), **LOSS_TOL)
    m.zero_grad(set_to_none=True)
    loss_ref.backward()
    g_ref = _grads([m.encoder])
    assert g_dr.keys() == g_ref.keys() and len(g_dr) > 10
    for k in g_dr:
        torch.testing.assert_close(g_dr[k], g_ref[k], **WEIGHT_TOL, msg=lambda s, k=k: f"{k}: {s}")


def test_diff_moco_normalises_where_the_released_run_uses_dot_products(ckpt):
    """DIFFERENCE (deliberate, in the module docstring): the released Contriever run passes neither
    ``--norm_query`` nor ``--norm_doc`` (raw dot products / 0.05); dr-lab's InfoNCE is on unit
    vectors. Same views, each queue holding its own key encoder's keys of the same 8 passages: the
    reference's loss is dr-lab's only with normalisation on."""
    m = _contriever(ckpt, moco=True, queue_size=K, momentum=MOMENTUM, temperature=TEMP)
    rec = _record_views(m)
    dim = m.encoder.config.hidden_size
    refs = {norm: RefMoCo(RefContriever(copy.deepcopy(m.encoder)), queue_size=K, momentum=MOMENTUM, temperature=TEMP,
                          norm_query=norm, norm_doc=norm, projection_size=dim) for norm in (True, False)}
    b = m.tokenizer(TEXTS[B: B + K], padding=True, return_tensors="pt")
    with torch.no_grad():
        for norm, r in refs.items():
            r.queue.copy_(r.encoder_k(b["input_ids"], b["attention_mask"], normalize=norm).T)
        m.queue.copy_(m.embed(m.key_encoder, b))
        m.queue_filled.fill_(K)
    torch.testing.assert_close(m.queue, refs[True].queue.T, **WEIGHT_TOL)
    loss, _ = m.loss(TEXTS[:B])
    va, vb = rec[-1]
    out = {n: r(va["input_ids"], va["attention_mask"], vb["input_ids"], vb["attention_mask"])
           for n, r in refs.items()}
    torch.testing.assert_close(loss.detach(), out[True][0].detach(), **LOSS_TOL)
    assert loss.item() > 0.1
    assert abs(loss.item() - out[False][0].item()) > 0.1
    assert torch.allclose(m._pending_keys.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert (out[False][1].norm(dim=-1) > 1.5).all()  # the released run's keys are not unit vectors


def test_diff_moco_queue_starts_empty(ckpt):
    """DIFFERENCE (deliberate: "only filled rows are used"): the reference's queue starts as
    ``queue_size`` random unit vectors, all of them negatives from step 1; dr-lab's starts empty,
    so its first step has the positive alone (loss exactly 0, no gradient) and step t has
    min(queue_size, (t - 1) x batch) negatives."""
    m = _contriever(ckpt, moco=True, queue_size=K, momentum=MOMENTUM, temperature=TEMP)
    rec = _record_views(m)
    ref = RefMoCo(RefContriever(copy.deepcopy(m.encoder)), queue_size=K, momentum=MOMENTUM, temperature=TEMP,
                  norm_query=True, norm_doc=True, projection_size=m.encoder.config.hidden_size)
    loss, logs = m.loss(TEXTS[:B])
    assert logs["queue"] == 0 and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.encoder.parameters())
    va, vb = rec[-1]
    loss_ref, _ = ref(va["input_ids"], va["attention_mask"], vb["input_ids"], vb["attention_mask"])
    assert loss_ref.item() > 0  # K random negatives: some signal from the first step
    loss_ref.backward()
    assert any(p.grad is not None and p.grad.any() for p in ref.encoder_q.parameters())
    m.after_step()
    _, logs = m.loss(TEXTS[B: 2 * B])
    assert logs["queue"] == B


def test_diff_moco_queue_size_need_not_divide_the_batch(ckpt):
    """DIFFERENCE: the reference asserts ``queue_size % batch == 0``; dr-lab's queue wraps around
    (FIFO) for any size. Where the reference runs (size 8, batch 4) the contents agree (above)."""
    m = _contriever(ckpt, moco=True, queue_size=6, momentum=MOMENTUM)
    dim = m.encoder.config.hidden_size
    ref = RefMoCo(RefContriever(copy.deepcopy(m.encoder)), queue_size=6, momentum=MOMENTUM, temperature=TEMP,
                  projection_size=dim)
    k1, k2 = torch.randn(4, dim), torch.randn(4, dim)
    ref._dequeue_and_enqueue(k1[:2])  # 2 divides 6: fine
    with pytest.raises(AssertionError):
        ref._dequeue_and_enqueue(k1)
    m.enqueue(k1)
    m.enqueue(k2)
    assert torch.equal(m.queue, torch.cat([k2[2:], k1[2:], k2[:2]]))  # k2[2:] overwrote k1[:2], the oldest
    assert int(m.queue_ptr) == 2 and int(m.queue_filled) == 6


class _StubRng:
    """Stands in for ContrieverPretrainer.rng: fixed crop ratio and start, given deletion draws."""

    def __init__(self, ratio, start, deletes):
        self.ratio, self.start, self.deletes = ratio, start, iter(deletes)

    def uniform(self, lo, hi):
        assert lo <= self.ratio <= hi
        return self.ratio

    def integers(self, lo, hi):
        assert lo <= self.start < hi
        return self.start

    def random(self):
        return next(self.deletes)


def test_diff_contriever_crop_length_rounding(ckpt):
    """Same draws (ratio, start, deletion uniforms) through the reference's randomcrop + deleteword +
    add_bos_eos and dr-lab's ``_crop``: the same view when ``n * ratio`` rounds down; DIFFERENCE:
    dr-lab rounds to nearest (one token longer when the fraction is >= .5, the reference truncates)
    and never returns an empty crop (the reference's is empty when ``n * ratio < 1``, a bare
    [CLS] [SEP] view; dr-lab keeps one token, also when deletion drops all). (Not testable here: the
    reference crops 256-token chunks of the concatenated corpus, dr-lab each passage.)"""
    m = _contriever(ckpt, moco=False, crop_min=0.1, crop_max=0.5, delete_p=0.1)
    cls, sep = m.tokenizer.cls_token_id, m.tokenizer.sep_token_id
    toks = list(range(100, 120))  # n = 20
    draws = [0.5, 0.05, 0.9, 0.3, 0.7, 0.95, 0.2, 0.6]  # the second token is deleted

    def drlab(ratio, start, dels):
        m.rng = _StubRng(ratio, start, dels)
        return [cls, *m._crop(toks), sep]

    # 20 x 0.32 = 6.4: six tokens on both sides, the same one deleted
    same = ref_view(toks, 0.32, 3, draws, 0.1, cls, sep)
    assert drlab(0.32, 3, draws) == same == [cls, 103, 105, 106, 107, 108, sep]
    # 20 x 0.34 = 6.8: the reference crops 6, dr-lab 7
    assert len(ref_view(toks, 0.34, 3, draws, 0.1, cls, sep)) - 2 == 5
    assert len(drlab(0.34, 3, draws)) - 2 == 6
    # n x ratio < 1: the reference's crop is empty, dr-lab keeps one token
    short = toks[:5]
    assert ref_view(short, 0.1, 2, [], 0.1, cls, sep) == [cls, sep]
    m.rng = _StubRng(0.1, 2, [0.5])
    assert m._crop(short) == [102]
    # deletion drops everything: the reference's view is empty, dr-lab keeps the first token of the span
    assert ref_view(toks, 0.1, 4, [0.0, 0.0], 0.1, cls, sep) == [cls, sep]
    m.rng = _StubRng(0.1, 4, [0.0, 0.0])
    assert m._crop(toks) == [104]
