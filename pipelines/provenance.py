"""What a run records about itself: git state, package versions, peak memory."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger("drlab")


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
        return {"commit": commit or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError) as e:  # no git on the machine
        return {"commit": None, "dirty": None, "error": str(e)}


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "faiss-cpu", "faiss-gpu", "pyserini", "ranx", "hydra-core", "numpy", "dr-lab"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def release_freed_memory() -> None:
    """Hand memory that earlier stages freed back to the OS (``gc`` + glibc's ``malloc_trim``).

    Without it the allocator may keep freed heap pages, and a stage's peak RSS would include
    what the stages before it had used: a MiniLM retriever1 measured 10.5 GiB after a SimLM
    pretrain stage in the same process and 3.9 GiB after none (the likely cause; not yet
    re-measured with the trim). No-op off glibc.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError) as e:  # not glibc (macOS, musl): the peak may include retained memory
        log.debug("malloc_trim unavailable (%s): a stage's peak RSS may include memory earlier stages freed", e)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux >= 4.0: ``5 > /proc/self/clear_refs``).

    Returns False where the kernel does not allow it; the peak read afterwards then counts
    from the process's start, not from the stage's.
    """
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def status_mb(field: str) -> float | None:
    """A memory line of ``/proc/self/status`` (VmHWM, VmRSS, RssAnon, ...) in MiB, None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float | None:
    """The process's peak resident set size (VmHWM) in MiB, None off Linux."""
    return status_mb("VmHWM")
