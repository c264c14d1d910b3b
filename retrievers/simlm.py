"""Family ``simlm``: SimLM's fine-tuning pipeline (Wang et al., ACL 2023).

"SimLM: Pre-training with Representation Bottleneck for Dense Passage Retrieval".
Fine-tuning: Retriever1 (BM25 hard negatives) -> mine -> Retriever2 (its own hard
negatives) -> Re-ranker (cross-encoder trained listwise on Retriever2's negatives) ->
Retriever_distill (KL to the re-ranker's scores + 0.2 x contrastive, temperature 0.02,
:func:`retrievers.losses.simlm_loss`). One shared tower, cosine similarity.
The replaced-language-modelling pre-training is the ``pretrain`` stage (its own issue); it
slots in front of this chain.

What differs: the offline init is all-MiniLM-L6-v2 (the paper: the SimLM-pretrained
BERT-base), so the default pooling is MiniLM's mean pooling (the paper: [CLS], set
``model.encoder.pooling=cls`` when starting from a SimLM checkpoint); the re-ranker starts
from the same MiniLM encoder with a fresh head (the paper: ELECTRA-base).
"""

from __future__ import annotations

from retrievers.encoder import BiEncoder, build_biencoder


def build(
    checkpoint: str,
    pooling: str = "mean",
    normalize: bool = True,
    similarity: str = "cos",
    temperature: float = 0.02,
    query_max_len: int = 64,
    doc_max_len: int = 256,
    local_dirs: dict | None = None,
) -> BiEncoder:
    return build_biencoder(
        checkpoint, shared=True, pooling=pooling, normalize=normalize, similarity=similarity,
        temperature=temperature, query_max_len=query_max_len, doc_max_len=doc_max_len, local_dirs=local_dirs,
    )
