"""Family ``tct_colbert``: a bi-encoder student distilled from a ColBERT teacher, in batch.

Lin, Yang & Lin, RepL4NLP 2021, "In-Batch Negatives for Knowledge Distillation with
Tightly-Coupled Teachers for Dense Retrieval". Student: one BERT tower, inputs
``[CLS] [Q] query`` / ``[CLS] [D] passage``, mean pooling over the tokens after the
prefix (as Pyserini's TCT-ColBERT encoders: ``mean_skip_prefix`` with 4 skipped tokens:
``[CLS]``, ``[``, ``q``, ``]``), dot product. Teacher: ColBERT (``model.teacher``, trained by
the ``rerank`` stage); ``distill`` with ``loss: tct`` matches the teacher's softmax over
every query x passage pair of the batch (:func:`retrievers.losses.tct_inbatch_kd`). With
``pipeline.distill.n_negatives > 0`` hard negatives join the batch (HN); with the teacher
also trained on them (the rerank stage trains on the same pool) it is HN+.

What differs: the student and the teacher start from any BERT-style checkpoint (offline:
all-MiniLM-L6-v2; the paper: bert-base-uncased, ColBERT trained on MS MARCO). The query
side is not padded with 36 [MASK] tokens here (Pyserini's TCT query encoder does so at
inference); cosine / temperature is configurable (the paper: dot product).
"""

from __future__ import annotations

from retrievers.encoder import BiEncoder, build_biencoder


def build(
    checkpoint: str,
    pooling: str,
    skip_prefix_tokens: int,
    query_prefix: str,
    doc_prefix: str,
    normalize: bool,
    similarity: str,
    temperature: float,
    query_max_len: int,
    doc_max_len: int,
    local_dirs: dict | None,
) -> BiEncoder:
    return build_biencoder(
        checkpoint, shared=True, pooling=pooling, skip_prefix_tokens=skip_prefix_tokens,
        query_prefix=query_prefix, doc_prefix=doc_prefix, normalize=normalize, similarity=similarity,
        temperature=temperature, query_max_len=query_max_len, doc_max_len=doc_max_len, local_dirs=local_dirs,
    )
