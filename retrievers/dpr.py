"""Family ``dpr``: Dense Passage Retrieval (Karpukhin et al., EMNLP 2020).

Paper recipe: two BERT-base towers (query and passage, not shared), [CLS]
pooling, dot-product similarity, trained with in-batch negatives plus one BM25
hard negative per question (NLL over the positive's softmax).

What differs here: the towers start from any checkpoint. The offline default is
sentence-transformers/all-MiniLM-L6-v2 (no raw BERT ships offline), a model trained
with mean pooling and cosine similarity, so ``conf/model/dpr.yaml`` keeps its mean
pooling and scores cosine / 0.05; the paper's [CLS] + dot product + bert-base-uncased
is ``experiment=dpr-paper``. The number and rank window of BM25 negatives are
configurable (``pipeline.retriever1``), as is a temperature on the similarity.
"""

from __future__ import annotations

from retrievers.encoder import BiEncoder, build_biencoder


def build(
    checkpoint: str,
    shared: bool,
    pooling: str,
    normalize: bool,
    similarity: str,
    temperature: float,
    query_max_len: int,
    doc_max_len: int,
    local_dirs: dict | None,
) -> BiEncoder:
    return build_biencoder(
        checkpoint,
        shared=shared,
        pooling=pooling,
        normalize=normalize,
        similarity=similarity,
        temperature=temperature,
        query_max_len=query_max_len,
        doc_max_len=doc_max_len,
        local_dirs=local_dirs,
    )
