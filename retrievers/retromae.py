"""Family ``retromae``: masked auto-encoding pre-training (Xiao et al., EMNLP 2022).

"RetroMAE: Pre-Training Retrieval-oriented Language Models Via Masked Auto-Encoder".

* **Encoder**: the input with moderate masking (``enc_rate``, 15-30%) -> BERT; MLM loss on
  the masked positions; the [CLS] vector is the sentence embedding ``h``.
* **Decoder**: one transformer layer with *enhanced decoding*: a query stream
  ``H1 = h + p_i`` (the sentence embedding plus position ``i``'s embedding) attends, through
  a position-specific attention mask, to a content stream ``H2 = [h + p_0, e(x_1) + p_1,
  ...]`` of the original tokens. Row ``i`` of the mask lets position ``i`` see the sentence
  embedding (position 0) and a random subset (each other real position with probability
  ``dec_visible``, 0.5: the paper's 50-70% hidden) of the content stream, never itself: the
  aggressive masking of the decoder is this attention mask, as in FlagEmbedding's
  implementation (``tests/test_parity_retromae.py``). ``dec_rate > 0`` additionally replaces that
  share of the content tokens with [MASK] (the first version's default, 0.5: each row then saw
  ~25% of the text, not ~50%; the pre-training table's RetroMAE rows were measured so). The
  decoder reconstructs *every* original text token from this ([CLS] / [SEP], whose labels are
  constant, only with ``loss_on_special``); ``L = L_enc + L_dec``.
  The decoder is dropped after pre-training.

What differs (pinned against FlagEmbedding 1.2.11 in ``tests/test_parity_retromae.py``): the
decoder layer is a plain post-LN transformer layer (attention + FFN, LayerNorm eps 1e-5)
initialised randomly (the paper: a BERT layer); the visible subset is sampled per row with a
probability rather than a fixed count of whole words; the encoder masks single tokens, always
with [MASK] (FlagEmbedding: whole words, 80/10/10); the query stream is ``h + p_i`` without
LayerNorm or token-type embedding, and content slot 0 is ``LN(h + p_0)`` (FlagEmbedding: raw
``h``). The fine-tuning family is the dpr-style
bi-encoder with [CLS] pooling (``model=retromae``).
"""

from __future__ import annotations

import torch
from torch import nn

from retrievers.encoder import BiEncoder, build_biencoder


def build(checkpoint: str, pooling: str, normalize: bool, similarity: str,
          temperature: float, query_max_len: int, doc_max_len: int,
          local_dirs: dict | None) -> BiEncoder:
    return build_biencoder(checkpoint, shared=True, pooling=pooling, normalize=normalize, similarity=similarity,
                           temperature=temperature, query_max_len=query_max_len, doc_max_len=doc_max_len,
                           local_dirs=local_dirs)


class EnhancedDecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ln1 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))
        self.ln2 = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, content: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """``blocked`` [B, L, L]: True where query position i may NOT attend to content position j."""
        mask = blocked.repeat_interleave(self.heads, dim=0)
        a, _ = self.attn(query, content, content, attn_mask=mask, need_weights=False)
        x = self.ln1(query + self.drop(a))
        return self.ln2(x + self.drop(self.ffn(x)))


class RetroMAEPretrainer(nn.Module):
    def __init__(self, checkpoint: str, init_config: dict | None = None, enc_rate: float = 0.3,
                 dec_rate: float = 0.0, dec_visible: float = 0.5, max_len: int = 144,
                 loss_on_special: bool = False, local_dirs: dict | None = None, seed: int = 0):
        super().__init__()
        from retrievers.pretraining import base_of, load_mlm

        self.mlm, self.tokenizer = load_mlm(checkpoint, init_config, local_dirs, seed)
        self.encoder = base_of(self.mlm)
        c = self.mlm.config
        self.decoder = EnhancedDecoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size)
        self.enc_rate, self.dec_rate, self.dec_visible, self.max_len = enc_rate, dec_rate, dec_visible, max_len
        self.loss_on_special = bool(loss_on_special)

    def _mask(self, ids, attn, rate):
        from retrievers.pretraining import special_mask

        m = (torch.rand(ids.shape, device=ids.device) < rate) & ~special_mask(self.tokenizer, ids) & attn.bool()
        return ids.masked_fill(m, self.tokenizer.mask_token_id), m

    def visibility(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, L, L] True = blocked: row i sees position 0 and a random subset of the others, never i."""
        b, n = attn.shape
        see = torch.rand(b, n, n, device=attn.device) < self.dec_visible
        see &= attn.bool()[:, None, :]
        see[:, :, 0] = True
        eye = torch.eye(n, dtype=torch.bool, device=attn.device)[None]
        see &= ~eye
        see[:, 0, 0] = True  # row 0 must see something (its own sentence slot)
        return ~see

    def decoder_loss(self, h: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        from retrievers.pretraining import head_loss, mlm_head, special_mask

        dec_ids, _ = self._mask(ids, attn, self.dec_rate)
        emb = self.encoder.embeddings
        pos = emb.position_embeddings(torch.arange(ids.shape[1], device=ids.device))[None]
        query = h[:, None, :] + pos
        words = emb.word_embeddings(dec_ids)
        content = torch.cat([h[:, None, :], words[:, 1:]], dim=1) + pos
        content = emb.LayerNorm(content) if hasattr(emb, "LayerNorm") else content
        x = self.decoder(query, content, self.visibility(attn))
        where = attn.bool() if self.loss_on_special else attn.bool() & ~special_mask(self.tokenizer, ids)
        return head_loss(mlm_head(self.mlm), x, ids, where)

    def loss(self, texts):
        from retrievers.pretraining import head_loss, mlm_head, tokenize_batch

        b = tokenize_batch(self.tokenizer, texts, self.max_len)
        dev = next(self.parameters()).device
        ids, attn = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        enc_ids, enc_m = self._mask(ids, attn, self.enc_rate)
        out = self.encoder(input_ids=enc_ids, attention_mask=attn, return_dict=True)
        l_enc = head_loss(mlm_head(self.mlm), out.last_hidden_state, ids, enc_m)
        l_dec = self.decoder_loss(out.last_hidden_state[:, 0], ids, attn)
        return l_enc + l_dec, {"enc": l_enc.item(), "dec": l_dec.item(), "tokens": int(attn.sum())}

    def backbone(self) -> nn.Module:
        return self.encoder

    def describe(self) -> dict:
        return {"enc_rate": self.enc_rate, "dec_rate": self.dec_rate, "dec_visible": self.dec_visible,
                "loss_on_special": self.loss_on_special}


def pretrainer(**kw) -> RetroMAEPretrainer:
    return RetroMAEPretrainer(**kw)
