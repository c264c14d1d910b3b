"""Family ``sgopt``: self-guided contrastive learning (Kim, Yoo and Lee, ACL 2021, arXiv 2106.07345).

"Self-Guided Contrastive Learning for BERT Sentence Representations". The encoder is copied into a
fixed copy BERT_F and a tuned copy BERT_T. The tuned copy's [CLS] vector is pulled towards *views* of
the same sentence from the fixed copy's layers (each layer's hidden states pooled over the tokens),
and pushed from the other sentences' views. No labels, no data augmentation. After training only
BERT_T's [CLS] vector is used. Details the paper leaves open are taken from the official code,
galsang/SG-BERT @ 23d5ebe (``loss.py``, ``training.py``):

* **Views**: every layer from the embedding output (hidden state 0) to the last, ``layer_min`` ..
  ``layer_max`` (0 .. L+1, exclusive end); each is **mean**-pooled over the real tokens
  (``--pooling2 mean``; ``view_pooling: max`` is the other choice the code has).
* **SG-OPT loss** (``variant: sg-opt``, ``NTXentLoss``): for every sentence i and every layer k, the
  positive is cos(c_i, h_i^k); the negatives are cos(c_i, h_j^k) for every other sentence j of the
  batch at *every* layer (not other [CLS] vectors, not other views of sentence i); softmax at
  temperature ``temperature`` (0.01) over [positive, negatives], averaged over the B x K rows. Both
  c and h go through one projection head (Linear(H, 4096), GELU, Linear(4096, 4096), GELU; weights
  ~ N(0, initializer_range), biases 0) used only in training.
* **SG** (``variant: sg``): one layer sampled uniformly per sentence, and SimCLR's NT-Xent over the
  2B vectors [views; CLS]. The reference's ``NTXentLossOriginal`` builds B labels for 2B logit rows
  (``CrossEntropyLoss`` then raises); here each of the 2B rows has its label, as in SimCLR.
* **Regulariser**: ``lamb`` (0.1) x sum over BERT_T's parameters of ||theta_T - theta_F||^2 (squared
  L2, summed, not averaged).
* BERT_T's embedding layer is frozen (``--freeze``); BERT_F never changes.
* Training (``conf/model/sgopt.yaml``): batch 16, lr 5e-5, 1 epoch, 10% linear warm-up, weight decay
  0, clipping at 1, on STS-B sentences with their labels removed (each pair gives two sentences).

What differs from the reference, on purpose:

* BERT_F runs in eval mode (no dropout). The reference calls ``eval()`` on it, but its training loop's
  ``loss_model.train()`` turns dropout back on in BERT_F every epoch.
* The reference trains on the sentences of every STS-B split (train, dev *and* test) and picks the
  checkpoint with the best labelled STS-B dev score (evaluated every 50 steps, early stopping). Here
  the text is ``data.text`` (STS-B train by default) and the last step is kept: no labels are used.
* AdamW's betas are PyTorch's (0.9, 0.999); the reference uses (0.9, 0.9).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from retrievers.encoder import BiEncoder, build_biencoder
from retrievers.pretraining import base_of, load_mlm, tokenize_batch

VARIANTS = ("sg", "sg-opt")


def build(checkpoint: str, pooling: str, normalize: bool, similarity: str, temperature: float,
          query_max_len: int, doc_max_len: int, local_dirs: dict | None) -> BiEncoder:
    return build_biencoder(checkpoint, shared=True, pooling=pooling, normalize=normalize, similarity=similarity,
                           temperature=temperature, query_max_len=query_max_len, doc_max_len=doc_max_len,
                           local_dirs=local_dirs)


def pool_layers(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, K, T, H] hidden states of K layers -> [B, K, H], pooled over the real tokens (``mask`` [B, T])."""
    m = mask[:, None, :, None].to(hidden.dtype)
    if how == "mean":
        return (hidden * m).sum(2) / m.sum(2)
    if how == "max":
        return hidden.masked_fill(m == 0, -1e9).max(dim=2).values
    raise ValueError(f"view pooling '{how}'; valid choices: mean, max")


def sgopt_loss(cls: torch.Tensor, views: torch.Tensor, temperature: float) -> torch.Tensor:
    """SG-OPT's NT-Xent: ``cls`` [B, H] against ``views`` [B, K, H] (already projected).

    Row (k, i): positive cos(c_i, h_i^k); negatives cos(c_i, h_j^k') for every j != i and every k'.
    """
    c = nn.functional.normalize(cls, dim=-1)
    h = nn.functional.normalize(views, dim=-1)
    b, k = views.shape[0], views.shape[1]
    sims = torch.einsum("ih,jkh->kij", c, h)  # [K, B(cls), B(view)]
    pos = torch.diagonal(sims, dim1=1, dim2=2).reshape(k * b, 1)  # layer-major, as the reference
    off = ~torch.eye(b, dtype=torch.bool, device=cls.device)
    neg = sims[:, off].reshape(k, b, b - 1).permute(1, 0, 2).reshape(b, k * (b - 1))  # [B, K(B-1)]
    logits = torch.cat([pos, neg.repeat(k, 1)], dim=1) / temperature
    return nn.functional.cross_entropy(logits.float(), torch.zeros(k * b, dtype=torch.long, device=cls.device))


def nt_xent(cls: torch.Tensor, view: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2B vectors [view; cls]: each one's positive is its partner."""
    z = nn.functional.normalize(torch.cat([view, cls]), dim=-1)
    b = cls.shape[0]
    sims = (z @ z.T).float() / temperature
    sims = sims.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return nn.functional.cross_entropy(sims, target)


class SGOPTPretrainer(nn.Module):
    def __init__(self, checkpoint: str, init_config: dict | None = None, variant: str = "sg-opt",
                 temperature: float = 0.01, lamb: float = 0.1, layer_min: int = 0, layer_max: int = -1,
                 view_pooling: str = "mean", projection_dim: int = 4096, freeze_embeddings: bool = True,
                 max_len: int = 128, local_dirs: dict | None = None, seed: int = 0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"model.pretrain.variant is '{variant}'; valid choices: {', '.join(VARIANTS)}")
        mlm, self.tokenizer = load_mlm(checkpoint, init_config, local_dirs, seed)
        self.encoder = base_of(mlm)  # BERT_T
        del mlm
        self.fixed = copy.deepcopy(self.encoder).eval()  # BERT_F
        for p in self.fixed.parameters():
            p.requires_grad_(False)
        if freeze_embeddings:
            for p in self.encoder.embeddings.parameters():
                p.requires_grad_(False)
        cfg = self.encoder.config
        n_states = cfg.num_hidden_layers + 1
        self.layers = (int(layer_min), n_states if int(layer_max) == -1 else int(layer_max))
        if not 0 <= self.layers[0] < self.layers[1] <= n_states:
            raise ValueError(f"model.pretrain.layer_min/layer_max give layers {self.layers}; this encoder has hidden "
                             f"states 0..{n_states - 1} (layer_max is exclusive; -1 = all)")
        self.variant, self.temperature, self.lamb = variant, float(temperature), float(lamb)
        if view_pooling not in ("mean", "max"):
            raise ValueError(f"model.pretrain.view_pooling is '{view_pooling}'; valid choices: mean, max")
        self.view_pooling, self.max_len = str(view_pooling), int(max_len)
        d = int(projection_dim)
        torch.manual_seed(int(seed))
        self.head = nn.Sequential(nn.Linear(cfg.hidden_size, d), nn.GELU(), nn.Linear(d, d), nn.GELU())
        for lin in (self.head[0], self.head[2]):
            lin.weight.data.normal_(0.0, cfg.initializer_range)
            lin.bias.data.zero_()
        self.rng = np.random.default_rng(int(seed))  # layer sampling of the SG variant (resumable)

    def train(self, mode: bool = True):
        super().train(mode)
        self.fixed.eval()  # BERT_F never drops out (the reference's does; module docstring)
        return self

    def views(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            out = self.fixed(**batch, output_hidden_states=True, return_dict=True)
        lo, hi = self.layers
        return pool_layers(torch.stack(out.hidden_states[lo:hi], dim=1), batch["attention_mask"], self.view_pooling)

    def regulariser(self) -> torch.Tensor:
        fixed = dict(self.fixed.named_parameters())
        return sum(((p - fixed[n]) ** 2).sum() for n, p in self.encoder.named_parameters() if p.requires_grad)

    def loss(self, texts):
        dev = next(self.encoder.parameters()).device
        batch = {k: v.to(dev) for k, v in tokenize_batch(self.tokenizer, texts, self.max_len).items()}
        cls = self.encoder(**batch, return_dict=True).last_hidden_state[:, 0]
        views = self.views(batch)
        if self.variant == "sg-opt":
            contrastive = sgopt_loss(self.head(cls), self.head(views), self.temperature)
        else:
            pick = torch.as_tensor(self.rng.integers(0, views.shape[1], size=len(texts)), device=dev)
            view = views[torch.arange(len(texts), device=dev), pick]
            contrastive = nt_xent(self.head(cls), self.head(view), self.temperature)
        reg = self.regulariser() if self.lamb > 0 else contrastive.new_zeros(())
        loss = contrastive + self.lamb * reg
        return loss, {"contrastive": contrastive.item(), "reg": reg.item(), "tokens": int(batch["attention_mask"].sum())}

    def backbone(self) -> nn.Module:
        return self.encoder

    def describe(self) -> dict:
        return {"variant": self.variant, "temperature": self.temperature, "lamb": self.lamb,
                "layers": list(self.layers), "view_pooling": self.view_pooling}


def pretrainer(**kw) -> SGOPTPretrainer:
    return SGOPTPretrainer(**kw)
