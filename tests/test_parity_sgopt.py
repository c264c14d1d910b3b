"""Ported-reference oracle for SG-OPT (Kim, Yoo and Lee, ACL 2021), run against dr-lab on identical inputs.

Reference: ``galsang/SG-BERT`` at commit ``23d5ebec1ab7834ac5e74a8597117d366963a41e`` (the code
release; ``loss.py`` and ``training.py`` unchanged since ``266c5ca``):

* ``loss.py`` -- ``NTXentLoss`` (the SG-OPT objective; :class:`RefNTXentLoss`),
  ``NTXentLossOriginal`` (the SG objective; :class:`RefNTXentLossOriginal`), ``Loss.mean_pooling`` /
  ``Loss.max_pooling`` / ``Loss.compute_diff`` and ``Loss.forward``'s composition with the projection
  head (:func:`ref_forward`).
* ``training.py`` -- the defaults: ``--T 1e-2``, ``--lamb 0.1``, ``--lmin 0``, ``--lmax -1`` (all
  hidden states), ``--pooling2 mean``, ``--obj SG-OPT``, ``--freeze``, ``--clone``.

Copied with only the changes marked ``ADAPT`` (CPU, no ``sentence_transformers`` wrapper: the
fixed / tuned models' outputs are passed in). dr-lab: ``retrievers/sgopt.py``.

What matches (asserted below): the SG-OPT loss and its gradients, the view pooling (mean and max),
the regulariser, and the whole ``SGOPTPretrainer.loss`` on a tiny random BERT against the reference's
``Loss.forward`` composition, to rtol 1e-5 / atol 1e-6 (fp32). Differences, each pinned by a
``test_diff_*`` test: the SG variant's labels (the reference's ``NTXentLossOriginal`` cannot run:
B labels for 2B rows), and BERT_F in eval mode.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TINY_DOCS, make_tiny_bert
from torch import nn

from retrievers.sgopt import SGOPTPretrainer, nt_xent, pool_layers, sgopt_loss

T = 0.01


# ----------------------------------------------------------------------------- the reference, ported


class RefNTXentLoss(nn.Module):
    """loss.py ``NTXentLoss`` (SG-OPT), verbatim but for ``ADAPT`` lines."""

    def __init__(self, device, batch_size, temperature=1, use_cosine_similarity=True):
        super().__init__()
        self.batch_size = batch_size
        self.temperature = temperature
        self.device = device
        self.similarity_function = self._cosine_simililarity  # ADAPT: use_cosine_similarity=True, as training.py
        self._cosine_similarity = torch.nn.CosineSimilarity(dim=-1)
        self.criterion = torch.nn.CrossEntropyLoss(reduction="sum")

    def _cosine_simililarity(self, x, y):
        return self._cosine_similarity(x.unsqueeze(1), y.unsqueeze(0))

    def forward(self, cls, cont):
        batch_size = cls.size(0)
        num_layers = cont.size(1)
        positives, negatives = [], []
        for i in range(num_layers):
            similarity_matrix = self.similarity_function(cls, cont[:, i])
            positives.append(torch.diag(similarity_matrix))
            neg_idx = (1 - torch.eye(batch_size)).bool()
            negatives.append(similarity_matrix[neg_idx].view(batch_size, -1))
        positives = torch.cat(positives).view(-1, 1)
        negatives = torch.cat(negatives, dim=1)
        negatives = torch.cat([negatives] * num_layers, dim=0)
        logits = torch.cat((positives, negatives), dim=1)
        logits /= self.temperature
        labels = torch.zeros(batch_size * num_layers).to(self.device).long()
        loss = self.criterion(logits, labels)
        return loss / (batch_size * num_layers)


class RefNTXentLossOriginal(nn.Module):
    """loss.py ``NTXentLossOriginal`` (SG), with one ``ADAPT``: 2B labels (the reference builds B)."""

    def __init__(self, batch_size, temperature):
        super().__init__()
        self.batch_size, self.temperature = batch_size, temperature
        self._cosine_similarity = torch.nn.CosineSimilarity(dim=-1)
        self.criterion = torch.nn.CrossEntropyLoss(reduction="sum")

    def _get_correlated_mask(self):
        diag = np.eye(2 * self.batch_size)
        l1 = np.eye((2 * self.batch_size), 2 * self.batch_size, k=-self.batch_size)
        l2 = np.eye((2 * self.batch_size), 2 * self.batch_size, k=self.batch_size)
        mask = torch.from_numpy((diag + l1 + l2))
        return (1 - mask).type(torch.bool)

    def forward(self, zis, zjs, fixed_labels=True):
        self.batch_size = zis.size(0)
        representations = torch.cat([zjs, zis], dim=0)
        similarity_matrix = self._cosine_similarity(representations.unsqueeze(1), representations.unsqueeze(0))
        l_pos = torch.diag(similarity_matrix, self.batch_size)
        r_pos = torch.diag(similarity_matrix, -self.batch_size)
        positives = torch.cat([l_pos, r_pos]).view(2 * self.batch_size, 1)
        negatives = similarity_matrix[self._get_correlated_mask()].view(2 * self.batch_size, -1)
        logits = torch.cat((positives, negatives), dim=1)
        logits /= self.temperature
        n = 2 * self.batch_size if fixed_labels else self.batch_size  # ADAPT: the reference's n is batch_size
        labels = torch.zeros(n).long()
        loss = self.criterion(logits, labels)
        return loss / self.batch_size  # NOTE: the reference divides the 2B-row sum by B


def ref_mean_pooling(t, mask):
    return (t * mask).sum(2) / mask.sum(2)


def ref_max_pooling(t, mask):
    t = t.clone()  # ADAPT: the reference writes into the hidden states in place
    t[mask == 0] = -1e9
    return t.max(dim=2)[0]


def ref_compute_diff(model, original_params):
    diff = 0.0
    for n, p in model.named_parameters():
        diff += torch.norm(original_params[n] - p, p=2) ** 2
    return diff


def ref_forward(target, original, head, features, lmin, lmax, pooling2, lamb):
    """``Loss.forward`` for ``--obj SG-OPT --clone``: ``target`` / ``original`` are the tuned / fixed BERTs
    (ADAPT: HF models called directly; ``sentence_embedding`` = the [CLS] token, ``--pooling cls``)."""
    ori = original(**features, output_hidden_states=True, return_dict=True)
    tgt = target(**features, return_dict=True)
    sent_emb = tgt.last_hidden_state[:, 0]
    intermediate = torch.stack([h for h in ori.hidden_states[lmin:lmax]], dim=1)
    mask = features["attention_mask"].unsqueeze(1).unsqueeze(-1).expand(intermediate.size()).float()
    pooled = {"mean": ref_mean_pooling, "max": ref_max_pooling}[pooling2](intermediate, mask)
    loss1 = RefNTXentLoss("cpu", sent_emb.size(0), temperature=T)(head(sent_emb), head(pooled))
    original_params = dict(original.named_parameters())
    return loss1 + lamb * ref_compute_diff(target, original_params)


# ----------------------------------------------------------------------------- tests


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("b, k", [(4, 3), (7, 1), (2, 5)])
def test_sgopt_loss_and_gradients_equal_the_reference(b, k):
    g = torch.Generator().manual_seed(b * 10 + k)
    cls = torch.randn(b, 16, generator=g, requires_grad=True)
    views = torch.randn(b, k, 16, generator=g, requires_grad=True)
    cls2, views2 = cls.detach().clone().requires_grad_(), views.detach().clone().requires_grad_()
    ours = sgopt_loss(cls, views, T)
    ref = RefNTXentLoss("cpu", b, temperature=T)(cls2, views2)
    _close(ours, ref)
    ours.backward()
    ref.backward()
    _close(cls.grad, cls2.grad, rtol=1e-4)
    _close(views.grad, views2.grad, rtol=1e-4)


@pytest.mark.parametrize("how, ref", [("mean", ref_mean_pooling), ("max", ref_max_pooling)])
def test_view_pooling_equals_the_reference(how, ref):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 4, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    full = mask.unsqueeze(1).unsqueeze(-1).expand(hidden.size()).float()
    _close(pool_layers(hidden, mask, how), ref(hidden, full))


def test_diff_sg_variant_labels_every_row():
    """The SG objective: the reference's NTXentLossOriginal gives CrossEntropyLoss B labels for 2B rows and
    raises; with 2B labels (SimCLR's code) it is dr-lab's nt_xent times 2 (it divides a 2B-row sum by B)."""
    g = torch.Generator().manual_seed(3)
    cls, view = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    with pytest.raises((ValueError, RuntimeError)):
        RefNTXentLossOriginal(5, T)(cls, view, fixed_labels=False)
    _close(2 * nt_xent(cls, view, T), RefNTXentLossOriginal(5, T)(cls, view))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), [f"{t} {x}" for _, t, x in TINY_DOCS], hidden=32)


TEXTS = [f"{t} {x}" for _, t, x in TINY_DOCS[:6]]


@pytest.mark.parametrize("pooling, layers", [("mean", (0, -1)), ("max", (1, 3))])
def test_the_whole_sgopt_loss_equals_the_reference_forward(bert, pooling, layers):
    m = SGOPTPretrainer(str(bert), variant="sg-opt", temperature=T, lamb=0.1, layer_min=layers[0],
                        layer_max=layers[1], view_pooling=pooling, projection_dim=64, seed=0)
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)  # move BERT_T off BERT_F
    loss, _ = m.loss(TEXTS)
    loss.backward()
    opt.step()
    opt.zero_grad()
    ours, logs = m.loss(TEXTS)
    assert logs["reg"] > 0  # the step moved the tuned copy: the regulariser is live
    features = m.tokenizer(TEXTS, truncation=True, max_length=m.max_len, padding=True, return_tensors="pt")
    hi = m.encoder.config.num_hidden_layers + 1 if layers[1] == -1 else layers[1]
    ref = ref_forward(m.encoder, m.fixed, m.head, dict(features), layers[0], hi, pooling, 0.1)
    _close(ours, ref)
    g_ours = torch.autograd.grad(ours, [m.encoder.encoder.layer[0].attention.self.query.weight, m.head[0].weight])
    ref = ref_forward(m.encoder, m.fixed, m.head, dict(features), layers[0], hi, pooling, 0.1)
    g_ref = torch.autograd.grad(ref, [m.encoder.encoder.layer[0].attention.self.query.weight, m.head[0].weight])
    for a, b in zip(g_ours, g_ref):
        _close(a, b, rtol=1e-4)


def test_tuned_embeddings_frozen_fixed_copy_never_moves(bert):
    m = SGOPTPretrainer(str(bert), projection_dim=32, seed=0)
    before = copy.deepcopy(m.fixed.state_dict())
    emb = m.encoder.embeddings.word_embeddings.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss, _ = m.loss(TEXTS)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, m.fixed.state_dict()[k]) for k, v in before.items())
    assert torch.equal(emb, m.encoder.embeddings.word_embeddings.weight)
    assert not torch.equal(m.encoder.encoder.layer[0].attention.self.query.weight,
                           m.fixed.encoder.layer[0].attention.self.query.weight)


def test_diff_fixed_copy_stays_in_eval_mode(bert):
    """The reference's training loop calls ``loss_model.train()``, which turns dropout back on in BERT_F;
    dr-lab keeps BERT_F in eval mode whatever mode the method is put in."""
    m = SGOPTPretrainer(str(bert), projection_dim=32, seed=0)
    m.train()
    assert m.encoder.training and not m.fixed.training
    assert not any(mod.training for mod in m.fixed.modules())


def test_sg_variant_samples_one_layer_per_sentence_reproducibly(bert):
    a = SGOPTPretrainer(str(bert), variant="sg", projection_dim=32, seed=7)
    b = SGOPTPretrainer(str(bert), variant="sg", projection_dim=32, seed=7)
    la, _ = a.loss(TEXTS)
    lb, _ = b.loss(TEXTS)
    _close(la, lb)


def test_bad_settings_name_the_key(bert):
    with pytest.raises(ValueError, match="variant"):
        SGOPTPretrainer(str(bert), variant="simclr")
    with pytest.raises(ValueError, match="view_pooling"):
        SGOPTPretrainer(str(bert), view_pooling="cls")
    with pytest.raises(ValueError, match="layer_max"):
        SGOPTPretrainer(str(bert), layer_min=2, layer_max=9)
