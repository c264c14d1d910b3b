"""Cross-encoder reranker: query and passage through one encoder, a scalar relevance score.

The ``Re-ranker`` of SimLM's fine-tuning pipeline (Wang et al. 2023, "SimLM: Pre-training
with Representation Bottleneck for Dense Passage Retrieval") and of RocketQA: ``[CLS] q
[SEP] p [SEP]`` into a Hugging Face sequence-classification model with one output, trained
listwise with *localized contrastive estimation* (Gao et al. 2021, "Rethink Training of BERT
Rerankers in Multi-Stage Retrieval Pipeline"): one positive against ``n`` mined negatives of
the same query, softmax cross-entropy over the group (:func:`retrievers.colbert.group_ce_loss`).

Saved in the Hugging Face sequence-classification layout (``AutoModelForSequenceClassification``
and ``sentence_transformers.CrossEncoder`` load it) plus ``drlab_reranker.json``. What differs:
offline the default init is all-MiniLM-L6-v2's encoder with a fresh scoring head (no
MS MARCO cross-encoder ships here), so the head is learned from the train split alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


class CrossEncoder(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, max_len: int = 256):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = {"max_len": int(max_len)}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def score_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> torch.Tensor:
        """Relevance logits of ``(queries[i], docs[i])`` ([N])."""
        enc = self.tokenizer(list(queries), list(docs), truncation="only_second", max_length=self.cfg["max_len"],
                             padding=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        return self.model(**enc, return_dict=True).logits.squeeze(-1)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        (path / "drlab_reranker.json").write_text(json.dumps({"kind": "cross_encoder", **self.cfg}) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CrossEncoder":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        cfg = json.loads((path / "drlab_reranker.json").read_text())
        return cls(AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                   max_len=cfg["max_len"])


def build(checkpoint: str, max_len: int, local_dirs: dict | None) -> CrossEncoder:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from retrievers.hub import resolve_model

    path = resolve_model(checkpoint, dict(local_dirs or {}))
    if (Path(path) / "drlab_reranker.json").exists():
        return CrossEncoder.load(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return CrossEncoder(model, AutoTokenizer.from_pretrained(path), max_len=max_len)
