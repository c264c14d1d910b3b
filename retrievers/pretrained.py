"""Family ``pretrained``: evaluate any Hugging Face / sentence-transformers checkpoint.

No training: the chain is ``index -> eval``. When the checkpoint is a
sentence-transformers model, its own files decide pooling, normalisation and
max length (``1_Pooling/config.json``, ``2_Normalize``, ``sentence_bert_config.json``),
so scores match ``SentenceTransformer.encode`` (MTEB's numbers); otherwise the
knobs in ``conf/model/pretrained.yaml`` apply.
"""

from __future__ import annotations

from retrievers.encoder import BiEncoder, build_biencoder


def build(
    checkpoint: str,
    pooling: str,
    normalize: bool,
    similarity: str,
    query_prefix: str,
    doc_prefix: str,
    query_max_len: int,
    doc_max_len: int,
    local_dirs: dict | None,
) -> BiEncoder:
    return build_biencoder(
        checkpoint,
        shared=True,
        pooling=pooling,
        normalize=normalize,
        similarity=similarity,
        query_prefix=query_prefix,
        doc_prefix=doc_prefix,
        query_max_len=query_max_len,
        doc_max_len=doc_max_len,
        read_st=True,
        local_dirs=local_dirs,
    )
