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

import torch
from torch import nn

from retrievers.encoder import BiEncoder, build_biencoder


def build(
    checkpoint: str,
    pooling: str,
    normalize: bool,
    similarity: str,
    temperature: float,
    query_max_len: int,
    doc_max_len: int,
    local_dirs: dict | None,
) -> BiEncoder:
    return build_biencoder(
        checkpoint, shared=True, pooling=pooling, normalize=normalize, similarity=similarity,
        temperature=temperature, query_max_len=query_max_len, doc_max_len=doc_max_len, local_dirs=local_dirs,
    )


# =========================================================================== pre-training


class SimLMPretrainer(nn.Module):
    """SimLM's replaced language modelling with a representation bottleneck.

    * **Corruption** (:meth:`corrupt`): one uniform draw per token decides both masks, so the
      encoder's positions (rate ``enc_rate``, 0.3) are a subset of the decoder's (``dec_rate``,
      0.5); the masked input goes through the *generator* and each masked position is replaced
      by a token sampled from its distribution; the encoder input carries the replacements at
      its positions, the decoder input at its (larger) set -- same sampled token where both.
    * **Encoder** (the model being pre-trained) predicts the original token at *every*
      text position (replaced LM). [CLS] and [SEP] are not scored (``loss_on_special=False``,
      as MLM recipes leave special tokens out): their labels are constant, position 0's is always
      [CLS]. ``loss_on_special=True`` scores them (the first version here). Measured on a small
      random-init BERT after 275 steps, either way: the [CLS] vectors are near-constant (mean
      pairwise cosine 0.997 / 0.998 on SciFact); the README's pre-training section says why.
    * **Decoder**: ``decoder_layers`` (2) BERT layers initialised from the encoder's last
      ones; its input is the decoder-corrupted sequence's embeddings with position 0 replaced
      by the encoder's [CLS] vector -- the only path from encoder to decoder (no skip
      connection; :meth:`decoder_loss` reads nothing else of the encoder's output). It also
      predicts every original token. ``L = L_enc + L_dec`` (+ the generator's MLM loss when
      it is trained jointly). The decoder and generator are dropped after pre-training.
    * **Generator**: ``generator`` = a model id / path (a frozen pretrained MLM, as in the
      paper); ``"joint"`` (a small MLM trained with the main model, ELECTRA-style); or
      ``"random"`` (a small randomly initialised, frozen MLM: replacements are noise).
      Offline no pretrained MLM ships, so the default is ``joint``; ``describe()`` records it.
    """

    def __init__(
        self,
        checkpoint: str,
        init_config: dict | None = None,
        generator: str = "joint",
        generator_config: dict | None = None,
        enc_rate: float = 0.3,
        dec_rate: float = 0.5,
        decoder_layers: int = 2,
        max_len: int = 144,
        loss_on_special: bool = False,
        local_dirs: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        import copy

        from transformers import AutoModelForMaskedLM

        from retrievers.pretraining import base_of, load_mlm

        if not 0 < enc_rate <= dec_rate < 1:
            raise ValueError(f"need 0 < enc_rate <= dec_rate < 1, got {enc_rate}, {dec_rate}")
        self.mlm, self.tokenizer = load_mlm(checkpoint, init_config, local_dirs, seed)
        self.encoder = base_of(self.mlm)
        layers = self.encoder.encoder.layer
        if decoder_layers > len(layers):
            raise ValueError(f"decoder_layers={decoder_layers} > the encoder's {len(layers)} layers")
        self.decoder = nn.ModuleList(copy.deepcopy(layers[-decoder_layers:]))
        self.enc_rate, self.dec_rate, self.max_len = float(enc_rate), float(dec_rate), int(max_len)
        self.loss_on_special = bool(loss_on_special)
        self.generator_kind = generator
        if generator in ("joint", "random"):
            from transformers import AutoConfig

            cfg = copy.deepcopy(self.mlm.config)
            small = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 256}
            for k, v in {**small, **dict(generator_config or {})}.items():
                setattr(cfg, k, v)
            torch.manual_seed(int(seed) + 1)
            self.generator = AutoModelForMaskedLM.from_config(cfg)
            del AutoConfig
        else:
            gen, _ = load_mlm(generator, None, local_dirs)
            if gen.config.vocab_size != self.mlm.config.vocab_size:
                raise ValueError(f"generator {generator} has vocab {gen.config.vocab_size}, the encoder "
                                 f"{self.mlm.config.vocab_size}: they must share a tokenizer")
            self.generator = gen
        if generator != "joint":
            for p in self.generator.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ parts
    def corrupt(self, ids: torch.Tensor, attn: torch.Tensor):
        """(encoder ids, decoder ids, encoder mask, decoder mask, generator MLM loss or None)."""
        from retrievers.pretraining import masked_logits, sample_tokens, special_mask

        cand = ~special_mask(self.tokenizer, ids) & attn.bool()
        u = torch.rand(ids.shape, device=ids.device)
        enc_m = (u < self.enc_rate) & cand
        dec_m = (u < self.dec_rate) & cand  # enc_m is a subset by construction
        gen_in = ids.masked_fill(dec_m, self.tokenizer.mask_token_id)
        joint = self.generator_kind == "joint"
        with torch.set_grad_enabled(joint and self.training):
            logits = masked_logits(self.generator, gen_in, attn, dec_m)  # only the masked positions are sampled
        gen_loss = nn.functional.cross_entropy(logits.float(), ids[dec_m]) if joint and dec_m.any() else None
        replaced = ids.clone()
        if dec_m.any():
            replaced[dec_m] = sample_tokens(logits)
        return torch.where(enc_m, replaced, ids), torch.where(dec_m, replaced, ids), enc_m, dec_m, gen_loss

    def scored(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Positions the replaced-LM losses score: every text token; [CLS] / [SEP] too with ``loss_on_special``."""
        from retrievers.pretraining import special_mask

        where = attn.bool()
        return where if self.loss_on_special else where & ~special_mask(self.tokenizer, ids)

    def decoder_loss(self, enc_hidden: torch.Tensor, dec_ids: torch.Tensor, attn: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        """The decoder's replaced-LM loss; it reads only ``enc_hidden[:, 0]`` (the [CLS] bottleneck)."""
        from retrievers.pretraining import extended_mask, head_loss, mlm_head

        emb = self.encoder.embeddings(input_ids=dec_ids)
        x = torch.cat([enc_hidden[:, :1], emb[:, 1:]], dim=1)
        ext = extended_mask(attn, x.dtype)
        for layer in self.decoder:
            x = layer(x, attention_mask=ext)
            x = x[0] if isinstance(x, tuple) else x
        return head_loss(mlm_head(self.mlm), x, labels, self.scored(labels, attn))

    def loss(self, texts):
        from retrievers.pretraining import head_loss, mlm_head, tokenize_batch

        b = tokenize_batch(self.tokenizer, texts, self.max_len)
        dev = next(self.parameters()).device
        ids, attn = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        enc_ids, dec_ids, _, _, gen_loss = self.corrupt(ids, attn)
        out = self.encoder(input_ids=enc_ids, attention_mask=attn, return_dict=True)
        l_enc = head_loss(mlm_head(self.mlm), out.last_hidden_state, ids, self.scored(ids, attn))
        l_dec = self.decoder_loss(out.last_hidden_state, dec_ids, attn, ids)
        loss = l_enc + l_dec + (gen_loss if gen_loss is not None else 0.0)
        logs = {"enc": l_enc.item(), "dec": l_dec.item(), "tokens": int(attn.sum())}
        if gen_loss is not None:
            logs["gen"] = gen_loss.item()
        return loss, logs

    def backbone(self) -> nn.Module:
        return self.encoder

    def describe(self) -> dict:
        return {"generator": self.generator_kind, "enc_rate": self.enc_rate, "dec_rate": self.dec_rate,
                "decoder_layers": len(self.decoder), "loss_on_special": self.loss_on_special}


def pretrainer(**kw) -> SimLMPretrainer:
    return SimLMPretrainer(**kw)
