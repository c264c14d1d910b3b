"""Family ``colbert``: late interaction over token embeddings (Khattab & Zaharia, SIGIR 2020).

"ColBERT: Efficient and Effective Passage Search via Contextualized Late Interaction
over BERT". What is implemented, as in the paper (v1):

* one BERT tower; a linear layer (no bias) projects every output token to ``dim`` (128)
  and each token vector is L2-normalised;
* queries: ``[CLS] [Q] q... `` padded to ``query_max_len`` (32) with ``[MASK]`` tokens
  (*query augmentation*); the [MASK] positions are not attended to as keys (the pad
  attention mask is kept) but their outputs are used in MaxSim, as in ColBERT's code and
  PyLate's defaults. ``query_expansion: false`` (not in the paper) drops them: a query scores
  with its real tokens only;
* documents: ``[CLS] [D] d... [SEP]`` up to ``doc_max_len`` (180); punctuation tokens
  are dropped from the document side (``mask_punctuation``);
* score: ``sum_i max_j q_i . d_j`` (MaxSim); training: softmax cross-entropy over
  (q, d+, d-...) groups (:func:`group_ce_loss`).

``[Q]`` / ``[D]`` are BERT's ``[unused0]`` / ``[unused1]``, as in the original code; a
tokenizer without them gets them added (and the embedding matrix resized).

Use as a reranker (``rerank`` stage, ``teacher: colbert``), as the teacher of TCT-ColBERT
(:func:`maxsim_all` gives the in-batch N x N teacher scores) and end to end
(:func:`retrievers.colbert.ColbertIndex`: FAISS over token embeddings for candidates,
exact MaxSim to rank them). What differs: the backbone starts from any BERT-style
checkpoint (offline: all-MiniLM-L6-v2, 384-d, projected to 128); the end-to-end index is a
flat (or IVF) FAISS index of fp16-stored token vectors, not ColBERTv2's residual compression.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

Q_MARKER, D_MARKER = "[unused0]", "[unused1]"


class ColBERT(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        *,
        dim: int = 128,
        query_max_len: int = 32,
        doc_max_len: int = 180,
        mask_punctuation: bool = True,
        query_expansion: bool = True,
        linear: nn.Linear | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        hidden = backbone.config.hidden_size
        self.linear = linear if linear is not None else nn.Linear(hidden, dim, bias=False)
        self.cfg = dict(dim=int(dim), query_max_len=int(query_max_len), doc_max_len=int(doc_max_len),
                        mask_punctuation=bool(mask_punctuation), query_expansion=bool(query_expansion))
        added = [t for t in (Q_MARKER, D_MARKER) if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if added:
            tokenizer.add_special_tokens({"additional_special_tokens": added})
            backbone.resize_token_embeddings(len(tokenizer))
        self.q_id = tokenizer.convert_tokens_to_ids(Q_MARKER)
        self.d_id = tokenizer.convert_tokens_to_ids(D_MARKER)
        self.skip_ids = set()
        if mask_punctuation:
            for c in string.punctuation:
                ids = tokenizer.encode(c, add_special_tokens=False)
                if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
                    self.skip_ids.add(ids[0])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ tokenization
    def _with_marker(self, texts: Sequence[str], marker: int, max_len: int, pad_to_max: bool):
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_len - 1,
                             padding="max_length" if pad_to_max else True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        # insert the marker after [CLS]
        col = torch.full((ids.shape[0], 1), marker, dtype=ids.dtype)
        ids = torch.cat([ids[:, :1], col, ids[:, 1:]], dim=1)
        mask = torch.cat([mask[:, :1], torch.ones_like(col), mask[:, 1:]], dim=1)
        return ids, mask

    def tokenize_queries(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        expand = self.cfg.get("query_expansion", True)
        ids, mask = self._with_marker(texts, self.q_id, self.cfg["query_max_len"], pad_to_max=expand)
        if expand:
            ids = ids.masked_fill(mask == 0, self.tokenizer.mask_token_id)  # query augmentation
        return {"input_ids": ids, "attention_mask": mask}

    def tokenize_docs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids, mask = self._with_marker(texts, self.d_id, self.cfg["doc_max_len"], pad_to_max=False)
        return {"input_ids": ids, "attention_mask": mask}

    # ------------------------------------------------------------------ encoding
    def _encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=True)
        return nn.functional.normalize(self.linear(out.last_hidden_state), dim=-1)

    def query(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, Lq, dim]. With query expansion (the paper's) every position, the [MASK]s included, is used
        (Lq = query_max_len); without, padding positions are zero vectors, which add nothing to MaxSim."""
        batch = self.tokenize_queries(texts)
        q = self._encode(batch)
        if self.cfg.get("query_expansion", True):
            return q
        return q * batch["attention_mask"].to(q.device).unsqueeze(-1)

    def doc(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L, dim] token vectors, [B, L] bool mask: real, non-punctuation tokens)."""
        batch = self.tokenize_docs(texts)
        emb = self._encode(batch)
        keep = batch["attention_mask"].bool()
        if self.skip_ids:
            skip = torch.zeros_like(keep)
            for t in self.skip_ids:
                skip |= batch["input_ids"] == t
            keep &= ~skip
        keep = keep.to(emb.device)
        return emb * keep.unsqueeze(-1), keep

    def score_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> torch.Tensor:
        """MaxSim of ``queries[i]`` with ``docs[i]`` ([N])."""
        q = self.query(queries)
        d, m = self.doc(docs)
        return maxsim_pairs(q, d, m)

    def score_all(self, queries: Sequence[str], docs: Sequence[str]) -> torch.Tensor:
        """MaxSim of every query with every document ([Nq, Nd]): TCT-ColBERT's in-batch teacher."""
        q = self.query(queries)
        d, m = self.doc(docs)
        return maxsim_all(q, d, m)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        torch.save(self.linear.state_dict(), path / "colbert_linear.pt")
        (path / "colbert.json").write_text(json.dumps(self.cfg, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ColBERT":
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        cfg = json.loads((path / "colbert.json").read_text())
        tok = AutoTokenizer.from_pretrained(path)
        bb = AutoModel.from_pretrained(path, add_pooling_layer=False)
        lin = nn.Linear(bb.config.hidden_size, cfg["dim"], bias=False)
        lin.load_state_dict(torch.load(path / "colbert_linear.pt", map_location="cpu"))
        return cls(bb, tok, linear=lin, **cfg)


def maxsim_pairs(q: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """``sum_i max_j q[n,i] . d[n,j]`` over real doc tokens, for each n ([N])."""
    sim = torch.einsum("nid,njd->nij", q, d)
    sim = sim.masked_fill(~d_mask.unsqueeze(1), float("-inf"))
    return sim.max(dim=2).values.sum(dim=1)


def maxsim_all(q: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """MaxSim for every (query, doc) pair ([Nq, Nd])."""
    sim = torch.einsum("aid,bjd->abij", q, d)
    sim = sim.masked_fill(~d_mask[None, :, None, :], float("-inf"))
    return sim.max(dim=3).values.sum(dim=2)


def group_ce_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy with the positive in column 0 of ``scores`` [N, 1 + negatives]."""
    return nn.functional.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))


def build(
    checkpoint: str,
    dim: int,
    query_max_len: int,
    doc_max_len: int,
    mask_punctuation: bool,
    query_expansion: bool,
    local_dirs: dict | None,
) -> ColBERT:
    from transformers import AutoModel, AutoTokenizer

    from retrievers.hub import resolve_model

    path = resolve_model(checkpoint, dict(local_dirs or {}))
    if (Path(path) / "colbert.json").exists():
        return ColBERT.load(path)
    tok = AutoTokenizer.from_pretrained(path)
    bb = AutoModel.from_pretrained(path, add_pooling_layer=False)
    return ColBERT(bb, tok, dim=dim, query_max_len=query_max_len, doc_max_len=doc_max_len,
                   mask_punctuation=mask_punctuation, query_expansion=query_expansion)


class ColbertIndex:
    """End-to-end ColBERT retrieval: FAISS over doc token vectors -> candidates -> exact MaxSim.

    ``add(doc_ids, texts)`` encodes documents and stores their token vectors (fp16) and
    a token -> document map; ``search(queries, k, candidates_per_token)`` searches each
    query token's ``candidates_per_token`` nearest doc tokens, takes the union of their
    documents and ranks them by exact MaxSim.
    """

    def __init__(self, model: ColBERT, batch_size: int = 32):
        self.model = model
        self.batch_size = batch_size
        self.doc_ids: list[str] = []
        self.vecs: list[np.ndarray] = []  # per doc [L, dim] fp16
        self.index = None
        self.tok2doc: np.ndarray | None = None

    @torch.inference_mode()
    def add(self, doc_ids: Sequence[str], texts: Sequence[str], progress: bool = False) -> None:
        import faiss
        from tqdm.auto import tqdm

        self.model.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        vecs: list[np.ndarray | None] = [None] * len(texts)
        for lo in tqdm(range(0, len(texts), self.batch_size), desc="colbert encode", disable=not progress):
            idx = order[lo : lo + self.batch_size]
            emb, keep = self.model.doc([texts[i] for i in idx])
            for row, i in enumerate(idx):
                vecs[i] = emb[row][keep[row]].float().cpu().numpy().astype(np.float16)
        self.doc_ids = list(doc_ids)
        self.vecs = [v for v in vecs if v is not None]
        flat = np.concatenate(self.vecs).astype(np.float32)
        self.tok2doc = np.concatenate([np.full(len(v), i, dtype=np.int32) for i, v in enumerate(self.vecs)])
        self.index = faiss.IndexFlatIP(flat.shape[1])
        self.index.add(flat)

    @torch.inference_mode()
    def search(self, queries: dict[str, str], k: int = 100, candidates_per_token: int = 32) -> dict[str, dict[str, float]]:
        self.model.eval()
        out: dict[str, dict[str, float]] = {}
        qids = list(queries)
        for lo in range(0, len(qids), self.batch_size):
            chunk = qids[lo : lo + self.batch_size]
            q = self.model.query([queries[x] for x in chunk]).float().cpu().numpy()
            for row, qid in enumerate(chunk):
                toks = q[row][np.abs(q[row]).sum(axis=1) > 0]  # without query expansion, padding rows are zero
                _, I = self.index.search(np.ascontiguousarray(toks), candidates_per_token)
                cands = np.unique(self.tok2doc[I[I >= 0]])
                scores = [float((toks @ self.vecs[c].astype(np.float32).T).max(axis=1).sum()) for c in cands]
                top = np.argsort(scores)[::-1][:k]
                out[qid] = {self.doc_ids[cands[i]]: scores[i] for i in top}
        return out
