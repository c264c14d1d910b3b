"""Stage keys: a content hash of exactly what a stage uses.

    key = <name>-v<version>-<sha256(KEY_FORMAT, reads, keys of the used stages)[:12]>

*reads* are the config nodes the stage declares (resolved), with two rewrites so that a key
does not depend on the machine:

* ``data.path`` is replaced by a content fingerprint of the dataset's files, and
  ``data.url`` (where the files came from, not what they hold) is dropped; the same holds for a
  read part of ``data`` with a ``path`` of its own (``data.text``: the sentences STS pre-training reads);
* ``precision``, a training stage's ``pipeline.<stage>.precision`` and ``backend`` (``auto``) are
  replaced by what they mean on this machine: ``fp32`` or ``bf16``, ``torch`` or ``openvino``;
* every key named in :data:`MACHINE_KEYS` (``local_dirs``: model id -> directory on this
  machine) is dropped wherever it appears, and so is a knob of :data:`NEUTRAL` at its neutral value.

``runtime.*`` is never a read. Bump :data:`KEY_FORMAT` when the payload itself changes shape:
every cache from before is then recomputed (README, "Stage keys").
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines.manifest import file_hash
from retrievers.errors import ConfigError

#: 2: narrow reads + only the used stages' keys (issue 13); 1: every earlier chain stage
KEY_FORMAT = "2"
#: config keys that name things on this machine: never hashed, at any depth
MACHINE_KEYS = frozenset({"local_dirs"})
#: knobs added after caches existed, at the value that computes what came before: not hashed at that
#: value (at any depth), so adding one does not move every existing key; any other value is hashed
NEUTRAL = {"length_sort": False}
#: files in a dataset directory that are documentation or archives, not data
_NOT_DATA = {".md", ".zip", ".gz", ".tar", ".txt"}


def digest(obj: Any, n: int = 12) -> str:
    """Short sha256 of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def select(cfg: DictConfig, dotted: str) -> Any:
    """The resolved value at ``dotted`` (containers as plain dicts / lists); a missing node is a ConfigError."""
    if OmegaConf.select(cfg, dotted, default="__absent__") == "__absent__":
        raise ConfigError(f"config node '{dotted}' does not exist")
    node = OmegaConf.select(cfg, dotted, throw_on_missing=True)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _strip_unhashed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_unhashed(v) for k, v in value.items()
                if k not in MACHINE_KEYS and not (k in NEUTRAL and v == NEUTRAL[k])}
    if isinstance(value, list):
        return [_strip_unhashed(v) for v in value]
    return value


_FP_CACHE: dict[str, str] = {}
#: where file hashes persist between runs (the runner sets ``<output_dir>/cache/fingerprints.json``)
FINGERPRINT_STORE: Path | None = None
STORE_WRITABLE = True  # a dry run reads the store but writes nothing
_store_loaded: Path | None = None


def _load_store() -> None:
    global _store_loaded
    if FINGERPRINT_STORE is None or _store_loaded == FINGERPRINT_STORE:
        return
    _store_loaded = FINGERPRINT_STORE
    try:
        _FP_CACHE.update(json.loads(Path(FINGERPRINT_STORE).read_text()))
    except (OSError, ValueError):
        pass  # no store yet, or a damaged one: files are hashed again


def _save_store() -> None:
    if FINGERPRINT_STORE is None or not STORE_WRITABLE:
        return
    store = Path(FINGERPRINT_STORE)
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_FP_CACHE, sort_keys=True))
    os.replace(tmp, store)


def data_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """Content fingerprint of a dataset directory: relative file name -> hash of the whole file.

    Whole files are hashed (an edit anywhere moves the key). Each hash is remembered by the file's
    (absolute path, size, mtime, inode), in this process and in :data:`FINGERPRINT_STORE`, so a
    large corpus is read once, not once per run; a file changed in place gets a new entry.
    """
    root = Path(path)
    if not root.exists():
        return {"absent": root.name}
    _load_store()
    out: dict[str, str] = {}
    new = False
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.suffix.lower() in _NOT_DATA and f.name.lower() != "corpus.jsonl.gz":
            continue
        st = f.stat()
        ck = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if ck not in _FP_CACHE:
            _FP_CACHE[ck], new = file_hash(f), True
        out[str(f.relative_to(root))] = _FP_CACHE[ck]
    if new:
        _save_store()
    return out


def hashed_value(cfg: DictConfig, dotted: str) -> Any:
    """What a read contributes to a key: the resolved node, without machine paths."""
    value = _strip_unhashed(select(cfg, dotted))
    if (dotted == "data" or dotted.startswith("data.")) and isinstance(value, dict):
        value = dict(value)  # the dataset, or a part of it with its own files (data.text of STS data)
        value.pop("url", None)
        path = value.pop("path", None)
        if path is not None:
            value["fingerprint"] = data_fingerprint(path)
    elif dotted == "precision" or dotted == "backend" or (
            dotted.startswith("pipeline.") and isinstance(value, dict) and value.get("precision") == "auto"):
        value = _planned(cfg, dotted, value)
    elif dotted.startswith("data.") and dotted.split(".")[-1] in ("path", "url"):
        raise ConfigError(f"a stage may not read '{dotted}' on its own (a machine path); read its parent node")
    return value


def _planned(cfg: DictConfig, dotted: str, value: Any) -> Any:
    """``auto`` -> what this machine will use: precision fp32 / bf16 (``retrievers/precision.py``, also a training
    stage's ``pipeline.<stage>.precision``), backend torch / openvino (``retrievers/openvino_backend.py``)."""
    from retrievers import openvino_backend, precision

    device = str(OmegaConf.select(cfg, "runtime.device", default="auto"))
    if dotted == "backend":
        return openvino_backend.planned(str(value), device)
    if dotted == "precision":
        return precision.planned(str(value), device)
    return {**value, "precision": precision.planned("auto", device)}


def stage_key(name: str, version: str, reads: dict[str, Any], upstream: dict[str, str]) -> str:
    payload = {"format": KEY_FORMAT, "stage": name, "version": version, "reads": reads, "upstream": upstream}
    return f"{name}-v{version}-{digest(payload)}"
