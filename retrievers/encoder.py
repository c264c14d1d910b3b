"""The bi-encoder every dense family is built from.

A query tower and a passage tower (the same module when ``shared``) from
``AutoModel``, a pooling, an optional projection head, optional L2 normalisation
and a similarity. The knobs cover what DPR, ANCE, Contriever, TCT-ColBERT and
SimLM differ in:

=================  ========  ======================  =========  ==========
family             towers    pooling                 normalise  similarity
=================  ========  ======================  =========  ==========
DPR                separate  cls                     no         dot
ANCE               shared    first token+Linear+LN   no         dot
Contriever         shared    mean                    no         dot
TCT-ColBERT        shared    mean after prefix       no         dot
SimLM              shared    cls                     no         dot (t=0.01 in training)
sentence-transf.   shared    as its 1_Pooling says   if 2_Norm  cos
=================  ========  ======================  =========  ==========

Checkpoints are plain Hugging Face directories (``save_pretrained``) plus
``drlab_encoder.json`` (the knobs) and sentence-transformers' ``modules.json``,
so a trained shared-tower model loads in sentence-transformers as is. Separate
towers go to ``query_encoder/`` and ``passage_encoder/``, each a full HF directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from retrievers import token_cache
from retrievers.hub import resolve_model
from retrievers.st_config import read_st_config, write_st_config

log = logging.getLogger("drlab")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


_quiet_transformers()

POOLINGS = ("cls", "mean", "mean_skip_prefix", "first_token_head")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, skip: int = 0) -> torch.Tensor:
    """Pool token states ``hidden`` [B, T, H] under attention ``mask`` [B, T]."""
    if pooling in ("cls", "first_token_head"):
        return hidden[:, 0]
    if pooling in ("mean", "mean_skip_prefix"):
        m = mask.to(hidden.dtype).clone()
        if pooling == "mean_skip_prefix" and skip:
            m[:, :skip] = 0  # TCT-ColBERT: average the tokens after "[CLS] [Q]"
        return (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
    raise ValueError(f"pooling '{pooling}' unknown; valid choices: {', '.join(POOLINGS)}")


class BiEncoder(nn.Module):
    #: how :meth:`encode` runs the tower: ``torch``, or ``openvino`` on the CPU (the inference stages set it
    #: from the ``backend`` config node: :mod:`retrievers.openvino_backend`)
    backend: str = "torch"

    def __init__(
        self,
        query_model: nn.Module,
        tokenizer,
        *,
        doc_model: nn.Module | None = None,
        pooling: str = "cls",
        head: nn.Module | None = None,
        normalize: bool = False,
        similarity: str = "dot",
        temperature: float = 1.0,
        query_prefix: str = "",
        doc_prefix: str = "",
        query_max_len: int = 64,
        doc_max_len: int = 256,
        skip_prefix_tokens: int = 0,
        title_sep: str = " ",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling '{pooling}' unknown; valid choices: {', '.join(POOLINGS)}")
        if similarity not in ("dot", "cos"):
            raise ValueError(f"similarity '{similarity}' unknown; valid choices: dot, cos")
        self.query_model = query_model
        self.doc_model = doc_model  # None: shared towers
        self.tokenizer = tokenizer
        self.head = head
        self.cfg = dict(
            pooling=pooling,
            normalize=bool(normalize),
            similarity=similarity,
            temperature=float(temperature),
            query_prefix=query_prefix,
            doc_prefix=doc_prefix,
            query_max_len=int(query_max_len),
            doc_max_len=int(doc_max_len),
            skip_prefix_tokens=int(skip_prefix_tokens),
            title_sep=title_sep,
            shared=doc_model is None,
            head=head is not None,
        )

    # ------------------------------------------------------------------ encoding
    def tower(self, side: str) -> nn.Module:
        return self.doc_model if side == "doc" and self.doc_model is not None else self.query_model

    def tokenize(self, texts: Sequence[str], side: str) -> dict[str, torch.Tensor]:
        prefix = self.cfg["query_prefix"] if side == "query" else self.cfg["doc_prefix"]
        max_len = self.cfg["query_max_len"] if side == "query" else self.cfg["doc_max_len"]
        return self.tokenizer(
            [prefix + t for t in texts], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )

    def embed(self, batch: dict[str, torch.Tensor], side: str, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of a tokenized batch (with gradients when training); ``hidden``: the tower's
        last hidden state when another backend computed it."""
        if hidden is None:
            hidden = self.tower(side)(**batch, return_dict=True).last_hidden_state
        emb = pool(hidden, batch["attention_mask"], self.cfg["pooling"], self.cfg["skip_prefix_tokens"])
        if self.head is not None:
            emb = self.head(emb)
        if self.cfg["normalize"]:
            emb = nn.functional.normalize(emb, dim=-1)
        return emb

    def score(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Similarity logits [Nq, Nd] (divided by the temperature)."""
        if self.cfg["similarity"] == "cos" and not self.cfg["normalize"]:
            q, d = nn.functional.normalize(q, dim=-1), nn.functional.normalize(d, dim=-1)
        return q @ d.T / self.cfg["temperature"]

    def doc_texts(self, docs: Sequence[dict[str, str]]) -> list[str]:
        sep = self.cfg["title_sep"]
        return [(d["title"] + sep + d["text"]).strip() if d.get("title") else d["text"].strip() for d in docs]

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        side: str,
        batch_size: int = 128,
        device: str | torch.device = "cpu",
        bf16: bool = False,
        progress: bool = True,
        max_tokens: int | None = None,
    ) -> np.ndarray:
        """Encode ``texts`` in length-sorted batches; returns float32 [N, dim] in input order.

        Texts are tokenized once without padding and sorted by token count, so each
        batch pads only to its own longest member (``self.padding`` counts, over all calls, the real
        tokens and the tokens computed, sorted and as batches in input order would have been). ``max_tokens`` (optional) caps
        batch_size x longest length, giving larger batches of short texts.
        """
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        prefix = self.cfg["query_prefix"] if side == "query" else self.cfg["doc_prefix"]
        max_len = self.cfg["query_max_len"] if side == "query" else self.cfg["doc_max_len"]
        enc = token_cache.tokenize(self.tokenizer, [prefix + t for t in texts], max_len)  # ids reused across stages
        ids = enc["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        batches: list[np.ndarray] = []
        i = 0
        while i < len(order):
            n = batch_size
            if max_tokens:
                n = max(1, min(batch_size * 8, max_tokens // max(1, len(ids[order[i]]))))
            batches.append(order[i : i + n])
            i += n
        lens = [len(x) for x in ids]
        pad = self.__dict__.setdefault("padding", {"tokens": 0, "padded": 0, "padded_unsorted": 0})
        pad["tokens"] += sum(lens)  # what length-sorting saves: padded tokens against batches in input order
        pad["padded"] += sum(len(b) * lens[b[0]] for b in batches)
        pad["padded_unsorted"] += sum(len(c) * max(c) for c in (lens[i : i + batch_size]
                                                                 for i in range(0, len(lens), batch_size)))
        dim = None
        out: np.ndarray | None = None
        dev = torch.device(device)
        use_bf16 = bf16 and dev.type in ("cuda", "cpu")
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        ov_run = None
        if self.backend == "openvino" and dev.type == "cpu" and len(order):
            from retrievers.openvino_backend import compiled_tower

            example = self.tokenizer.pad({k: [enc[k][j] for j in order[-2:]] for k in keys}, return_tensors="pt")
            ov_run = compiled_tower(self.tower(side), self.__dict__.setdefault("_ov_cache", {}), tuple(keys),
                                    use_bf16, dict(example))
        bar = tqdm(total=len(texts), desc=f"encode {side} texts", unit="txt", disable=not progress, mininterval=2)
        for b in batches:
            feats = self.tokenizer.pad({k: [enc[k][j] for j in b] for k in keys}, return_tensors="pt")
            feats = {k: v.to(dev) for k, v in feats.items()}
            if ov_run is not None:  # bf16 is OpenVINO's precision hint; the rest runs in fp32
                emb = self.embed(feats, side, hidden=ov_run(feats))
            else:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    emb = self.embed(feats, side)
            emb = emb.float().cpu().numpy()
            if out is None:
                dim = emb.shape[1]
                out = np.empty((len(texts), dim), dtype=np.float32)
            out[b] = emb
            bar.update(len(b))
        bar.close()
        self.train(was_training)
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.doc_model is None:
            self._save_tower(self.query_model, path)
        else:
            self._save_tower(self.query_model, path / "query_encoder")
            self._save_tower(self.doc_model, path / "passage_encoder")
        if self.head is not None:
            torch.save(self.head.state_dict(), path / "head.pt")
            (path / "head.json").write_text(
                json.dumps({"in": self.head[0].in_features, "out": self.head[0].out_features})
            )
        (path / "drlab_encoder.json").write_text(json.dumps(self.cfg, indent=2) + "\n")

    def _save_tower(self, model: nn.Module, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        write_st_config(path, model.config.hidden_size, self.cfg)

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "BiEncoder":
        """Load a directory written by :meth:`save`."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        cfg = json.loads((path / "drlab_encoder.json").read_text())
        cfg.update(overrides)
        shared = cfg.pop("shared")
        has_head = cfg.pop("head")
        qdir = path if shared else path / "query_encoder"
        tok = AutoTokenizer.from_pretrained(qdir)
        qm = AutoModel.from_pretrained(qdir, add_pooling_layer=False) if _is_bert_like(qdir) else AutoModel.from_pretrained(qdir)
        dm = None if shared else AutoModel.from_pretrained(path / "passage_encoder")
        head = None
        if has_head:
            dims = json.loads((path / "head.json").read_text())
            head = ance_head(dims["in"], dims["out"])
            head.load_state_dict(torch.load(path / "head.pt", map_location="cpu"))
        return cls(qm, tok, doc_model=dm, head=head, **cfg)


def _is_bert_like(path: Path) -> bool:
    try:
        mt = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except OSError:
        return False
    return mt in ("bert", "roberta", "xlm-roberta", "electra")


def ance_head(dim_in: int, dim_out: int) -> nn.Sequential:
    """ANCE's projection: Linear then LayerNorm on the first token (Xiong et al. 2021)."""
    return nn.Sequential(nn.Linear(dim_in, dim_out), nn.LayerNorm(dim_out))


def build_biencoder(
    checkpoint: str,
    shared: bool = True,
    pooling: str = "cls",
    normalize: bool = False,
    similarity: str = "dot",
    temperature: float = 1.0,
    query_prefix: str = "",
    doc_prefix: str = "",
    query_max_len: int = 64,
    doc_max_len: int = 256,
    skip_prefix_tokens: int = 0,
    head_dim: int | None = None,
    read_st: bool = False,
    local_dirs: dict | None = None,
) -> BiEncoder:
    """Builder with flat arguments (Hydra ``_target_``). ``checkpoint``: HF id or path.

    A directory written by :meth:`BiEncoder.save` loads with its own knobs. With
    ``read_st``, pooling, normalisation and max length come from the checkpoint's
    sentence-transformers files when it has them.
    """
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(checkpoint, dict(local_dirs or {}))
    if (Path(path) / "drlab_encoder.json").exists():
        return BiEncoder.load(path)
    knobs = dict(
        pooling=pooling,
        normalize=normalize,
        similarity=similarity,
        temperature=temperature,
        query_prefix=query_prefix,
        doc_prefix=doc_prefix,
        query_max_len=query_max_len,
        doc_max_len=doc_max_len,
        skip_prefix_tokens=skip_prefix_tokens,
    )
    if read_st:
        knobs.update(read_st_config(path))
    tok = AutoTokenizer.from_pretrained(path)
    kw = {"add_pooling_layer": False} if _is_bert_like(Path(path)) else {}
    qm = AutoModel.from_pretrained(path, **kw)
    dm = None if shared else AutoModel.from_pretrained(path, **kw)
    head = ance_head(qm.config.hidden_size, head_dim or qm.config.hidden_size) if pooling == "first_token_head" else None
    return BiEncoder(qm, tok, doc_model=dm, head=head, **knobs)


# ---------------------------------------------------------------------- stage helpers


def instantiate_encoder(encoder_cfg, checkpoint: str | Path | None = None) -> BiEncoder:
    """Build the family's encoder from its ``model.encoder`` node (a ``_target_`` builder).

    With ``checkpoint`` (a directory an upstream stage saved), that checkpoint is
    loaded with the knobs it was saved with.
    """
    from hydra.utils import instantiate

    kw = {"checkpoint": str(checkpoint)} if checkpoint else {}
    return instantiate(encoder_cfg, **kw)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available and every local ``torchrun`` rank gets a GPU of its own, else the CPU.

    More local ranks than GPUs (``torchrun --nproc_per_node 2`` on a 1-GPU machine) would make
    rank 1 call ``torch.cuda.set_device(1)`` ("invalid device ordinal"), and NCCL refuses two
    ranks on one GPU anyway: those runs go to the CPU (gloo), on every rank alike.
    """
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > torch.cuda.device_count():
            log.warning(
                "runtime.device=auto: %d local ranks but %d GPU(s); using the CPU (gloo). "
                "Set runtime.device=cuda with --nproc_per_node <= the GPU count to train on GPUs.",
                local_world, torch.cuda.device_count(),
            )
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device(device)
