"""Family ``contriever``: unsupervised contrastive pre-training (Izacard et al., TMLR 2022).

"Unsupervised Dense Information Retrieval with Contrastive Learning".

* **Positive pairs**: two independent random crops of the same passage, each a contiguous
  span of ``crop_min``-``crop_max`` (0.1-0.5) of its tokens, then token deletion (each
  token dropped with probability ``delete_p``, 0.1) -- :meth:`ContrieverPretrainer.views`.
* **Encoder**: one BERT tower, mean pooling (as released).
* **Negatives**: ``moco: true`` -- a queue of ``queue_size`` keys from a momentum encoder
  (He et al. 2020, MoCo): keys come from the momentum copy (no gradient), updated after
  every step as ``theta_k = m theta_k + (1 - m) theta_q`` (``momentum`` 0.999), the queue
  is first-in first-out; ``moco: false`` -- in-batch negatives (both views through the
  trained encoder). InfoNCE at ``temperature`` (0.05).

Chains: ``pretrain -> index -> eval`` (zero-shot, ``model=contriever``) or in front of a
fine-tuning chain. What differs: the paper pre-trains for 500k steps on CCNet + Wikipedia
with batch 2048 and a 131k queue; here the corpus is the dataset's own text (plus
``pipeline.pretrain.extra_corpora``) and everything is scaled to a CPU budget. The InfoNCE here
is on L2-normalised vectors (cosine / ``temperature``), stable from a random init in a few hundred
steps; the released model scores with raw dot products. ``conf/model/contriever.yaml`` scores with
cosine to match what the pre-training optimised.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from retrievers.encoder import BiEncoder, build_biencoder, pool


def build(checkpoint: str, pooling: str, normalize: bool, similarity: str,
          temperature: float, query_max_len: int, doc_max_len: int,
          local_dirs: dict | None) -> BiEncoder:
    return build_biencoder(checkpoint, shared=True, pooling=pooling, normalize=normalize, similarity=similarity,
                           temperature=temperature, query_max_len=query_max_len, doc_max_len=doc_max_len,
                           local_dirs=local_dirs)


class ContrieverPretrainer(nn.Module):
    def __init__(self, checkpoint: str, init_config: dict | None = None, moco: bool = True,
                 queue_size: int = 4096, momentum: float = 0.999, temperature: float = 0.05,
                 crop_min: float = 0.1, crop_max: float = 0.5, delete_p: float = 0.1, max_len: int = 128,
                 local_dirs: dict | None = None, seed: int = 0):
        super().__init__()
        from retrievers.pretraining import base_of, load_mlm

        mlm, self.tokenizer = load_mlm(checkpoint, init_config, local_dirs, seed)
        self.encoder = base_of(mlm)
        del mlm
        self.moco, self.momentum, self.temperature = bool(moco), float(momentum), float(temperature)
        self.crop = (float(crop_min), float(crop_max))
        self.delete_p, self.max_len = float(delete_p), int(max_len)
        self.rng = np.random.default_rng(int(seed))
        dim = self.encoder.config.hidden_size
        if self.moco:
            self.key_encoder = copy.deepcopy(self.encoder)
            for p in self.key_encoder.parameters():
                p.requires_grad_(False)
            self.register_buffer("queue", torch.zeros(int(queue_size), dim))  # only filled rows are used
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._pending_keys: torch.Tensor | None = None

    # ------------------------------------------------------------------ data
    def _crop(self, toks: list[int]) -> list[int]:
        n = len(toks)
        if n <= 2:
            return list(toks)
        length = max(1, int(round(n * self.rng.uniform(*self.crop))))
        start = int(self.rng.integers(0, n - length + 1))
        span = toks[start : start + length]
        kept = [t for t in span if self.rng.random() >= self.delete_p]
        return kept or span[:1]

    def views(self, texts) -> tuple[dict, dict]:
        """Two independently cropped + token-deleted views of each passage, tokenized."""
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        a, b = [], []
        for t in texts:
            toks = self.tokenizer(t, add_special_tokens=False, truncation=True, max_length=4 * self.max_len)["input_ids"]
            a.append([cls] + self._crop(toks)[: self.max_len - 2] + [sep])
            b.append([cls] + self._crop(toks)[: self.max_len - 2] + [sep])
        return self._pad(a), self._pad(b)

    def _pad(self, seqs):
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": attn}

    def embed(self, model: nn.Module, batch: dict) -> torch.Tensor:
        dev = next(model.parameters()).device
        batch = {k: v.to(dev) for k, v in batch.items()}
        out = model(**batch, return_dict=True).last_hidden_state
        return nn.functional.normalize(pool(out, batch["attention_mask"], "mean"), dim=-1)

    # ------------------------------------------------------------------ loss
    def loss(self, texts):
        va, vb = self.views(texts)
        q = self.embed(self.encoder, va)
        tokens = int(va["attention_mask"].sum() + vb["attention_mask"].sum())
        if not self.moco:
            k = self.embed(self.encoder, vb)
            logits = q @ k.T / self.temperature
            loss = nn.functional.cross_entropy(logits, torch.arange(len(q), device=q.device))
            return loss, {"inbatch": loss.item(), "tokens": tokens}
        with torch.no_grad():
            k = self.embed(self.key_encoder, vb)
        pos = (q * k).sum(-1, keepdim=True)
        n_q = int(self.queue_filled)
        neg = q @ self.queue[:n_q].T if n_q else q.new_zeros(len(q), 0)
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        loss = nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        self._pending_keys = k.detach()
        return loss, {"moco": loss.item(), "queue": n_q, "tokens": tokens}

    @torch.no_grad()
    def after_step(self) -> None:
        if not self.moco:
            return
        m = self.momentum
        for pk, pq in zip(self.key_encoder.parameters(), self.encoder.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)
        if self._pending_keys is not None:
            self.enqueue(self._pending_keys)
            self._pending_keys = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """First in, first out: ``keys`` overwrite the oldest entries (the pointer wraps around)."""
        size = self.queue.shape[0]
        keys = keys[-size:]
        ptr = int(self.queue_ptr)
        idx = (torch.arange(len(keys), device=self.queue.device) + ptr) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + len(keys)) % size)
        self.queue_filled.fill_(min(size, int(self.queue_filled) + len(keys)))

    def backbone(self) -> nn.Module:
        return self.encoder

    def describe(self) -> dict:
        return {"moco": self.moco, "queue_size": int(self.queue.shape[0]) if self.moco else 0,
                "momentum": self.momentum, "crop": list(self.crop), "delete_p": self.delete_p}


def pretrainer(**kw) -> ContrieverPretrainer:
    return ContrieverPretrainer(**kw)
