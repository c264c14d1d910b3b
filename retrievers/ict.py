"""Family ``ict``: Inverse Cloze Task pre-training (Chang et al., ICLR 2020; Lee et al., ACL 2019).

"Pre-training Tasks for Embedding-based Large-scale Retrieval" (ICT, BFS, WLP).

* **ICT**: a random sentence of a passage is the query; the passage *without* that sentence
  is its positive (with probability ``remove_p`` = 0.9; otherwise the sentence stays, so the
  model also learns lexical matching); other passages of the batch are the negatives
  (in-batch softmax, :func:`retrievers.contrastive.info_nce`).
* **BFS** (body first selection): the query is a sentence from the *first section* of a
  Wikipedia article, the positive a random passage of the same article. Needs each corpus
  line to carry ``metadata.article`` (article id) and ``metadata.section`` (0 = first).
* **WLP** (wiki link prediction): the query is a sentence from an article's first section,
  the positive a passage of an article *linked from* it. Needs ``metadata.article``,
  ``metadata.section`` and ``metadata.links`` (article ids).
  ``tasks: [ict, bfs, wlp]`` mixes them (one task drawn per example); a task whose metadata
  the corpus lacks raises an error naming the missing fields.

One shared tower, mean pooling, cosine / ``temperature``. What differs: sentences are split
with a regular expression, not a trained splitter; passages are the corpus entries as given.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from retrievers.encoder import BiEncoder, build_biencoder, pool

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text) if s.strip()]


def build(checkpoint: str, pooling: str, normalize: bool, similarity: str,
          temperature: float, query_max_len: int, doc_max_len: int,
          local_dirs: dict | None) -> BiEncoder:
    return build_biencoder(checkpoint, shared=True, pooling=pooling, normalize=normalize, similarity=similarity,
                           temperature=temperature, query_max_len=query_max_len, doc_max_len=doc_max_len,
                           local_dirs=local_dirs)


def ict_pair(text: str, rng: np.random.Generator, remove_p: float = 0.9) -> tuple[str, str]:
    """(query sentence, passage with it removed -- or kept with probability 1 - remove_p)."""
    sents = split_sentences(text)
    if len(sents) < 2:
        words = text.split()
        cut = max(1, len(words) // 3)
        return " ".join(words[:cut]), text if rng.random() >= remove_p else " ".join(words[cut:]) or text
    i = int(rng.integers(len(sents)))
    rest = sents[:i] + sents[i + 1 :] if rng.random() < remove_p else sents
    return sents[i], " ".join(rest)


class ICTPretrainer(nn.Module):
    def __init__(self, checkpoint: str, init_config: dict | None = None, tasks: tuple = ("ict",),
                 remove_p: float = 0.9, temperature: float = 0.05, query_max_len: int = 64,
                 doc_max_len: int = 192, local_dirs: dict | None = None, seed: int = 0):
        super().__init__()
        from retrievers.pretraining import base_of, load_mlm

        mlm, self.tokenizer = load_mlm(checkpoint, init_config, local_dirs, seed)
        self.encoder = base_of(mlm)
        del mlm
        self.tasks = tuple(tasks)
        unknown = set(self.tasks) - {"ict", "bfs", "wlp"}
        if unknown:
            raise ValueError(f"ICT tasks {sorted(unknown)} unknown; valid choices: ict, bfs, wlp")
        self.remove_p, self.temperature = float(remove_p), float(temperature)
        self.q_len, self.d_len = int(query_max_len), int(doc_max_len)
        self.rng = np.random.default_rng(int(seed))
        self.by_text: dict[str, dict] = {}
        self.articles: dict[str, list[str]] = {}

    def set_corpus(self, docs: list[dict]) -> None:
        """Index article metadata for BFS / WLP (``metadata.article``, ``.section``, ``.links``)."""
        need = {"bfs": ("article", "section"), "wlp": ("article", "section", "links")}
        for task in self.tasks:
            if task == "ict":
                continue
            fields = need[task]
            have = [d for d in docs if all(f in (d.get("metadata") or {}) for f in fields)]
            if not have:
                raise ValueError(
                    f"ICT task '{task}' needs corpus lines with metadata fields {list(fields)} "
                    f"(Wikipedia article id, section index{', outgoing links' if task == 'wlp' else ''}); "
                    f"this corpus has none. Use tasks=[ict]."
                )
        for d in docs:
            meta = d.get("metadata") or {}
            text = f"{d.get('title', '')} {d.get('text', '')}".strip()
            self.by_text[text] = meta
            if "article" in meta:
                self.articles.setdefault(str(meta["article"]), []).append(text)

    def pair(self, text: str) -> tuple[str, str]:
        task = self.tasks[int(self.rng.integers(len(self.tasks)))]
        meta = self.by_text.get(text, {})
        if task != "ict" and int(meta.get("section", -1)) == 0:
            sents = split_sentences(text) or [text]
            q = sents[int(self.rng.integers(len(sents)))]
            if task == "bfs":
                pool_ = [t for t in self.articles.get(str(meta["article"]), []) if t != text]
            else:
                pool_ = [t for a in meta.get("links", []) for t in self.articles.get(str(a), [])]
            if pool_:
                return q, pool_[int(self.rng.integers(len(pool_)))]
        return ict_pair(text, self.rng, self.remove_p)

    def _embed(self, texts, max_len):
        b = self.tokenizer(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        dev = next(self.parameters()).device
        b = {k: v.to(dev) for k, v in b.items()}
        out = self.encoder(**b, return_dict=True).last_hidden_state
        return nn.functional.normalize(pool(out, b["attention_mask"], "mean"), dim=-1), int(b["attention_mask"].sum())

    def loss(self, texts):
        from retrievers.contrastive import info_nce

        pairs = [self.pair(t) for t in texts]
        q, nq = self._embed([a for a, _ in pairs], self.q_len)
        d, nd = self._embed([b for _, b in pairs], self.d_len)
        scores = q @ d.T / self.temperature
        loss = info_nce(scores, torch.arange(len(q), device=q.device))
        return loss, {"ict": loss.item(), "tokens": nq + nd}

    def backbone(self) -> nn.Module:
        return self.encoder

    def describe(self) -> dict:
        return {"tasks": list(self.tasks), "remove_p": self.remove_p}


def pretrainer(**kw) -> ICTPretrainer:
    return ICTPretrainer(**kw)
