"""Token ids of a corpus, tokenised once and reused by every stage and run that encodes it.

The index stage, dense mining, ANCE's refreshes and every run of a sweep encode the same corpus with
the same tokenizer; each used to tokenise it again. :func:`tokenize` stores the ids of a call's texts
under ``runtime.token_cache`` (default ``outputs/tokens/``), keyed by the tokenizer's content (its
serialised vocabulary, normaliser and special tokens, not its name), the maximum length and the texts
themselves. The entry is a flat ``int32`` array and the row offsets, with their SHA-256 in
``meta.json``; a read checks both hashes, and an entry that fails (a damaged or half-written file) is
reported, tokenised again and replaced, never used. ``runtime.token_cache=null`` turns it off.

Only single-sequence ids are stored: the attention mask (all ones) and the token type ids (all
zeros) of an unpadded single sequence are rebuilt, and a tokenizer whose output is not of that form is
not cached. Calls with fewer than :data:`MIN_TEXTS` texts (queries, the precision check's sample) are
tokenised directly. Ids go in and out as Python lists, exactly what the tokenizer returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("drlab")

MIN_TEXTS = 1000
_DIR: Path | None = None
stats = {"hits": 0, "misses": 0, "damaged": 0}


def configure(path: str | os.PathLike | None) -> None:
    """Where entries live (``runtime.token_cache``); None turns the cache off."""
    global _DIR
    _DIR = Path(path) if path else None


def directory() -> str | None:
    """The configured directory (for a worker process to configure the same one), or None."""
    return str(_DIR) if _DIR is not None else None


def fingerprint(tokenizer) -> str:
    """A digest of what the tokenizer computes (not its name or the state a call leaves behind)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: its full serialisation, less the per-call truncation/padding
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _key(fp: str, texts: Sequence[str], max_len: int) -> str:
    h = hashlib.sha256(f"{fp}|{int(max_len)}|{len(texts)}".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _rebuild(ids: list[list[int]], names: Sequence[str]) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {"input_ids": ids}
    if "attention_mask" in names:
        out["attention_mask"] = [[1] * len(x) for x in ids]
    if "token_type_ids" in names:
        out["token_type_ids"] = [[0] * len(x) for x in ids]
    return out


def _read(entry: Path, n: int) -> dict[str, list[list[int]]] | None:
    """The entry's tokenizer output, or None (with a warning) when it is missing, incomplete or fails its hashes."""
    meta_path = entry / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        bad = [f for f in ("ids.npy", "offsets.npy") if _sha(entry / f) != meta["sha256"][f]]
        if not bad:
            flat, off = np.load(entry / "ids.npy"), np.load(entry / "offsets.npy")
            if len(off) == n + 1 and int(off[-1]) == len(flat):
                return _rebuild([flat[off[i] : off[i + 1]].tolist() for i in range(n)], meta["keys"])
            bad = ["row count"]
    except (OSError, ValueError, KeyError) as e:
        bad = [f"{type(e).__name__}: {e}"]
    stats["damaged"] += 1
    log.warning("token cache entry %s fails its check (%s): tokenising again and replacing it", entry, ", ".join(bad))
    return None


def _write(entry: Path, ids: list[list[int]], meta: dict[str, Any]) -> None:
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lens)]))
    np.save(tmp / "ids.npy", np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lens.sum())))
    meta["sha256"] = {f: _sha(tmp / f) for f in ("ids.npy", "offsets.npy")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(entry, ignore_errors=True)  # a damaged entry being replaced
    try:
        os.replace(tmp, entry)
    except OSError:  # another process wrote the entry first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (entry / "meta.json").exists():
            raise


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, list[list[int]]]:
    """``tokenizer(texts, truncation=True, max_length=max_len)`` as a dict of lists, through the cache."""
    direct = _DIR is None or len(texts) < MIN_TEXTS
    if not direct:
        fp = fingerprint(tokenizer)
        entry = _DIR / _key(fp, texts, max_len)
        cached = _read(entry, len(texts))
        if cached is not None:
            stats["hits"] += 1
            log.info("token ids of %d texts read from %s (tokenised once, reused)", len(texts), entry)
            return cached
    enc = dict(tokenizer(list(texts), truncation=True, max_length=max_len))
    if direct:
        return enc
    stats["misses"] += 1
    if _rebuild(enc["input_ids"], list(enc)) != enc:
        log.info("token cache: %s's output is not plain single-sequence ids; not cached", type(tokenizer).__name__)
        return enc
    try:
        _write(entry, enc["input_ids"], {"tokenizer": fp, "max_len": int(max_len), "keys": list(enc),
                                         "texts": len(texts), "tokens": sum(map(len, enc["input_ids"]))})
    except OSError as e:  # a full or read-only disk costs the reuse, not the run
        log.warning("token cache: could not write %s (%s); continuing without it", entry, e)
    return enc
