"""The token-id cache (retrievers/token_cache.py): same ids as the tokenizer, reused across calls,
keyed by what changes them, and never serving an entry that fails its hashes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_bert

from retrievers import token_cache
from retrievers.encoder import build_biencoder

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(token_cache, "MIN_TEXTS", 10)
    monkeypatch.setattr(token_cache, "stats", {"hits": 0, "misses": 0, "damaged": 0})
    token_cache.configure(tmp_path / "tokens")
    yield tmp_path / "tokens"
    token_cache.configure(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tok-bert"), [" ".join(WORDS)])


def encoder(model_dir: Path, **kw):
    return build_biencoder(str(model_dir), pooling="mean", doc_max_len=24, **kw)


def test_hit_returns_the_tokenizers_output_and_skips_it(cache, model_dir, monkeypatch):
    enc = encoder(model_dir)
    texts = corpus(50)
    direct = dict(enc.tokenizer(texts, truncation=True, max_length=24))
    first = token_cache.tokenize(enc.tokenizer, texts, 24)
    assert first == direct and token_cache.stats["misses"] == 1
    calls = []
    real_call = type(enc.tokenizer).__call__
    monkeypatch.setattr(type(enc.tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    again = token_cache.tokenize(enc.tokenizer, texts, 24)
    assert again == direct and token_cache.stats["hits"] == 1 and calls == []
    assert set(again) == set(direct) == {"input_ids", "token_type_ids", "attention_mask"}


def test_key_moves_with_max_length_texts_and_vocabulary(cache, model_dir, tmp_path):
    enc = encoder(model_dir)
    texts = corpus(30)
    token_cache.tokenize(enc.tokenizer, texts, 24)
    short = token_cache.tokenize(enc.tokenizer, texts, 8)
    assert max(map(len, short["input_ids"])) == 8
    token_cache.tokenize(enc.tokenizer, texts[:-1] + ["alpha"], 24)
    other = encoder(make_tiny_bert(tmp_path / "other", [" ".join(WORDS[::2])]))  # another vocabulary
    ids = token_cache.tokenize(other.tokenizer, texts, 24)["input_ids"]
    assert ids == other.tokenizer(texts, truncation=True, max_length=24)["input_ids"]
    assert token_cache.stats == {"hits": 0, "misses": 4, "damaged": 0}
    assert len(list(cache.iterdir())) == 4
    # a fresh load of the same tokenizer (not its name: its content) hits
    token_cache.tokenize(encoder(model_dir).tokenizer, texts, 24)
    assert token_cache.stats["hits"] == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_damaged_entry_is_retokenised_and_replaced(cache, model_dir, caplog, damage):
    enc = encoder(model_dir)
    texts = corpus(40)
    want = token_cache.tokenize(enc.tokenizer, texts, 24)
    (entry,) = cache.iterdir()
    f = entry / ("meta.json" if damage == "meta" else "ids.npy")
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[-3] ^= 0x01
    f.write_bytes(bytes(raw[: len(raw) // 2]) if damage != "flip" else bytes(raw))
    with caplog.at_level(logging.WARNING, logger="drlab"):
        got = token_cache.tokenize(enc.tokenizer, texts, 24)
    assert got == want
    assert token_cache.stats["damaged"] == 1 and "fails its check" in caplog.text and str(entry) in caplog.text
    assert token_cache.tokenize(enc.tokenizer, texts, 24) == want and token_cache.stats["hits"] == 1  # replaced


def test_encode_through_the_cache_gives_the_same_embeddings(cache, model_dir):
    texts = corpus(60, seed=3)
    enc = encoder(model_dir)
    token_cache.configure(None)
    plain = enc.encode(texts, "doc", batch_size=16, progress=False)
    token_cache.configure(cache)
    cold = enc.encode(texts, "doc", batch_size=16, progress=False)
    warm = enc.encode(texts, "doc", batch_size=16, progress=False)
    assert token_cache.stats["misses"] == 1 and token_cache.stats["hits"] == 1
    np.testing.assert_array_equal(plain, cold)
    np.testing.assert_array_equal(plain, warm)


def test_small_calls_and_a_disabled_cache_write_nothing(cache, model_dir):
    enc = encoder(model_dir)
    token_cache.tokenize(enc.tokenizer, corpus(5), 24)  # below MIN_TEXTS
    assert not cache.exists()
    token_cache.configure(None)
    token_cache.tokenize(enc.tokenizer, corpus(50), 24)
    assert not cache.exists() and token_cache.stats == {"hits": 0, "misses": 0, "damaged": 0}


def test_gc_lists_and_removes_token_entries(cache, model_dir, capsys):
    from pipelines.cache import gc

    token_cache.tokenize(encoder(model_dir).tokenizer, corpus(20), 24)
    out = cache.parent
    gc(out, remove=False)
    assert "token ids" in capsys.readouterr().out and any(cache.iterdir())
    gc(out, remove=True)
    assert not any(cache.iterdir())
