"""sentence-transformers checkpoint files: write them next to a saved tower, read them from a checkpoint.

So that ``SentenceTransformer(path)`` loads what dr-lab saves, and dr-lab loads a sentence-transformers
checkpoint with its pooling, normalisation and maximum length (the module files of sentence-transformers
2-5, and the >= 6 layout: ``pooling_mode`` as one string, the length as the tokenizer's ``model_max_length``).
"""

from __future__ import annotations

import json
from pathlib import Path


def write_st_config(path: Path, dim: int, cfg: dict) -> None:
    """sentence-transformers module files, so ``SentenceTransformer(path)`` loads the tower."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": dim,
                "pooling_mode_cls_token": cfg["pooling"] in ("cls", "first_token_head"),
                "pooling_mode_mean_tokens": cfg["pooling"].startswith("mean"),
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        )
    )
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if cfg["normalize"]:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": cfg["doc_max_len"], "do_lower_case": False})
    )
    (path / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": {"query": cfg["query_prefix"], "document": cfg["doc_prefix"]},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine" if cfg["similarity"] == "cos" or cfg["normalize"] else "dot",
            },
            indent=2,
        )
    )


def read_st_config(path: str | Path) -> dict:
    """Pooling, normalisation and max length from a sentence-transformers checkpoint, if it is one."""
    path = Path(path)
    if not (path / "modules.json").exists():
        return {}
    modules = json.loads((path / "modules.json").read_text())
    out: dict = {"normalize": any(m["type"].endswith("Normalize") for m in modules)}
    for m in modules:
        if m["type"].endswith("Pooling"):
            pc = json.loads((path / m["path"] / "config.json").read_text())
            mode = pc.get("pooling_mode")  # sentence-transformers >= 6 writes one string
            if pc.get("pooling_mode_cls_token") or mode == "cls":
                out["pooling"] = "cls"
            elif pc.get("pooling_mode_mean_tokens") or mode == "mean":
                out["pooling"] = "mean"
            else:
                raise ValueError(f"{path}: sentence-transformers pooling {pc} is not supported (cls or mean only)")
    sbc = path / "sentence_bert_config.json"
    if sbc.exists():
        n = json.loads(sbc.read_text()).get("max_seq_length")
        tc = path / "tokenizer_config.json"
        if n is None and tc.exists():  # sentence-transformers >= 6 keeps it as the tokenizer's model_max_length
            n = json.loads(tc.read_text()).get("model_max_length")
            n = n if isinstance(n, int) and n < 1_000_000 else None
        if n:
            out["query_max_len"] = out["doc_max_len"] = int(n)
    if out.get("normalize"):
        out["similarity"] = "cos"
    return out
