"""Encoding precision: bf16 where the hardware runs it fast and a check shows it safe, else fp32.

``precision: auto`` (the default, a top-level config node) encodes under bf16 autocast when the
device has a fast bf16 path -- a GPU that supports it, or a CPU with AMX (``amx_bf16``) or
AVX512-BF16 (``avx512_bf16``) -- and fp32 elsewhere. Before a stage encodes under ``auto``, a check
encodes a sample of its own texts both ways and keeps bf16 only if every sample's cosine to its fp32
vector is at least :data:`COSINE_FLOOR` (0.9999); otherwise the stage warns and encodes in fp32.
``precision: fp32`` / ``bf16`` force one (a forced bf16 is not checked).

:func:`planned` (hardware only, no model) is what stage keys hash, so a cache made with bf16 vectors is
never served to a run that asked for fp32, or ran on a machine without bf16: README, "Precision".
Weights and the returned vectors stay fp32 either way; only the matmuls run in bf16.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("drlab")

CHOICES = ("auto", "fp32", "bf16")
#: the smallest cosine between a sample's bf16 and fp32 vectors that ``auto`` accepts
COSINE_FLOOR = 0.9999
#: texts in the check's sample (evenly spaced over the stage's texts, so long ones are included)
CHECK_SAMPLE = 64
_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=None)
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The CPU's flags among ``amx_bf16`` / ``avx512_bf16`` (empty where /proc/cpuinfo is absent)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path(cpuinfo).read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(f for f in _CPU_FLAGS if f in flags)


def fast_bf16(device: str) -> bool:
    """Whether ``device`` (a torch device string; ``auto`` is resolved) has a fast bf16 path."""
    import torch

    from retrievers.encoder import resolve_device

    dev = resolve_device(str(device))
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return dev.type == "cpu" and bool(cpu_bf16_flags())


def planned(requested: str, device: str) -> str:
    """``fp32`` or ``bf16``: what ``requested`` means on ``device`` before any check (stage keys hash this)."""
    if requested not in CHOICES:
        from retrievers.errors import ConfigError

        raise ConfigError(f"precision '{requested}' unknown; valid choices: {', '.join(CHOICES)} (key 'precision')")
    if requested == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return requested


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def choose(requested: str, encoder, texts: Sequence[str], side: str, *, device, batch_size: int,
           who: str = "encode") -> tuple[bool, dict[str, Any]]:
    """(use bf16?, record) for encoding ``texts`` with ``encoder``; ``record`` goes into the stage's metrics.

    Under ``auto`` with a fast bf16 path, :data:`CHECK_SAMPLE` of ``texts`` are encoded in fp32 and bf16;
    bf16 is used only if their smallest cosine is at least :data:`COSINE_FLOOR`.
    """
    plan = planned(requested, str(device))
    rec: dict[str, Any] = {"precision_requested": requested, "precision_planned": plan}
    if plan == "fp32" or requested == "bf16" or not texts:
        rec["precision"] = plan
        return plan == "bf16", rec
    step = max(1, len(texts) // CHECK_SAMPLE)
    sample = list(texts[::step][:CHECK_SAMPLE])
    kw = dict(batch_size=batch_size, device=device, progress=False)
    c = cosine_rows(encoder.encode(sample, side, bf16=True, **kw), encoder.encode(sample, side, bf16=False, **kw))
    ok = bool(c.min() >= COSINE_FLOOR)
    rec.update(precision="bf16" if ok else "fp32", bf16_check_min_cosine=round(float(c.min()), 6),
               bf16_check_texts=len(sample))
    if ok:
        log.info("[%s] bf16 check passed on %d %s texts (min cosine to fp32 %.6f >= %s): encoding in bf16",
                 who, len(sample), side, c.min(), COSINE_FLOOR)
    else:
        log.warning("[%s] bf16 check failed on %d %s texts (min cosine to fp32 %.6f < %s): encoding in fp32 "
                    "(precision=bf16 forces bf16)", who, len(sample), side, c.min(), COSINE_FLOOR)
    return ok, rec


def precision_metrics(rec: dict[str, Any]) -> dict[str, float]:
    """The numeric part of a :func:`choose` record, for a stage's metrics (1.0 = encoded in bf16)."""
    out = {"bf16": 1.0 if rec.get("precision") == "bf16" else 0.0}
    if "bf16_check_min_cosine" in rec:
        out["bf16_check_min_cosine"] = float(rec["bf16_check_min_cosine"])
    return out
