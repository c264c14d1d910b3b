"""Shared pieces of the pre-training methods (``pretrain`` stage).

* :func:`load_mlm` -- a BERT-style masked LM from a checkpoint (the MLM head is new when
  the checkpoint ships only the encoder, as all-MiniLM-L6-v2 does), or a *randomly
  initialised* one with the checkpoint's vocabulary and ``init_config`` overrides (e.g.
  4 layers, hidden 256: the "small BERT from scratch" rows), seeded.
* :func:`tokenize_batch` -- passages to ids with special tokens, truncated to ``max_len``.
* :func:`special_mask` -- True at [CLS] / [SEP] / [PAD] (never masked or replaced).
* :func:`extended_mask` -- an additive attention mask for calling BERT layers directly.
* :func:`mlm_head` / :func:`head_loss` -- the vocabulary head applied only at the positions a
  loss reads (gathering hidden states first: a [tokens, vocab] logits tensor is the largest
  thing these objectives build, so pads and unscored positions never get one).
* :func:`masked_logits` -- a generator's logits at the masked positions only.
* :func:`sample_tokens` -- one token per row of logits by inverse-CDF sampling (a cumulative
  sum and a binary search; ``torch.distributions.Categorical`` draws an exponential per
  vocabulary entry, 1.2 s of an 8.8 s SimLM step on 2 cores).
* :class:`NoPretraining` -- no steps: the given (or random) init, saved like a pre-trained one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def load_mlm(checkpoint: str, init_config: dict | None = None, local_dirs: dict | None = None, seed: int = 0):
    """(AutoModelForMaskedLM, tokenizer); random weights when ``init_config`` is given."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    from retrievers.encoder import _quiet_transformers
    from retrievers.hub import resolve_model

    _quiet_transformers()
    path = resolve_model(checkpoint, dict(local_dirs or {}))
    tok = AutoTokenizer.from_pretrained(path)
    if init_config:
        cfg = AutoConfig.from_pretrained(path)
        for k, v in dict(init_config).items():
            if not hasattr(cfg, k):
                raise ValueError(f"init_config key '{k}' is not a field of {type(cfg).__name__}")
            setattr(cfg, k, v)
        torch.manual_seed(int(seed))
        return AutoModelForMaskedLM.from_config(cfg), tok
    return AutoModelForMaskedLM.from_pretrained(path), tok


def base_of(mlm: nn.Module) -> nn.Module:
    """The encoder inside a ``*ForMaskedLM`` (``bert``, ``roberta``, ... attribute)."""
    return getattr(mlm, mlm.base_model_prefix)


def tokenize_batch(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")


def special_mask(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    special = torch.zeros_like(ids, dtype=torch.bool)
    for t in {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}:
        if t is not None:
            special |= ids == t
    return special


def extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 1/0 -> [B, 1, 1, L] additive (0 / dtype min), what BERT's attention adds to its scores."""
    m = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


def mlm_head(mlm: nn.Module) -> nn.Module:
    """The module of a ``*ForMaskedLM`` that maps hidden states to vocabulary logits."""
    for name in ("cls", "lm_head"):  # BERT-like, RoBERTa-like
        if hasattr(mlm, name):
            return getattr(mlm, name)
    if hasattr(mlm, "generator_lm_head"):  # ELECTRA's generator (SimLM's generator in the paper)
        return nn.Sequential(mlm.generator_predictions, mlm.generator_lm_head)
    raise TypeError(f"{type(mlm).__name__} has no MLM head this code knows (.cls, .lm_head, .generator_lm_head)")


def masked_logits(mlm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  where: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits [where.sum(), V] of ``mlm`` at the positions ``where`` is True.

    Runs the head only there when :func:`mlm_head` knows the model's head; any other
    ``*ForMaskedLM`` computes every position's logits and is indexed.
    """
    try:
        head = mlm_head(mlm)
    except TypeError:
        return mlm(input_ids=input_ids, attention_mask=attention_mask).logits[where]
    return head(base_of(mlm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[where])


def head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``labels`` at the positions ``where`` is True.

    The head runs only at those positions: the same loss as applying it everywhere and
    indexing the logits, without the other positions' logits or the [B, L, V] gather and
    scatter (in fp32, also under bf16 autocast).
    """
    if not where.any():
        return hidden.sum() * 0.0
    logits = head(hidden[where])
    return nn.functional.cross_entropy(logits.float(), labels[where])


def sample_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``logits`` [N, V], drawn from softmax(logits) (inverse CDF)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=logits.shape[-1] - 1)


class NoPretraining(nn.Module):
    """Zero pre-training steps: the init itself (random with ``init_config``), for the baseline row."""

    trainable = False  # the pretrain loop runs no step

    def __init__(self, checkpoint: str, init_config: dict | None = None, local_dirs: dict | None = None, seed: int = 0):
        super().__init__()
        self.mlm, self.tokenizer = load_mlm(checkpoint, init_config, local_dirs, seed)
        self.init_config = dict(init_config or {})

    def loss(self, texts):
        raise RuntimeError("NoPretraining has no loss (the pretrain loop runs no step for it)")

    def backbone(self) -> nn.Module:
        return base_of(self.mlm)

    def describe(self) -> dict:
        return {"init": f"random {self.init_config}" if self.init_config else "checkpoint"}


def no_pretraining(checkpoint: str, init_config: dict | None = None, local_dirs: dict | None = None, seed: int = 0,
                   **ignored) -> NoPretraining:
    """Builder for the no-pre-training row; other keys of a family's ``model.pretrain`` node are ignored,
    so ``model.pretrain._target_=retrievers.pretraining.no_pretraining`` works with any family."""
    return NoPretraining(checkpoint, init_config, local_dirs, seed)
