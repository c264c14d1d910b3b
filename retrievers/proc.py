"""Child processes that die with their parent.

A ``kill -9`` of a run cannot run cleanup code, so a child (the Java BM25 process, the ANCE
refresh worker, an LLM server) would be left running as an orphan. On Linux the kernel can send
the child a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``); :func:`die_with_parent` asks
for SIGKILL. Use it as ``subprocess.Popen(..., preexec_fn=die_with_parent)`` or call it first
thing in a ``multiprocessing`` target. Elsewhere (macOS) it is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before the prctl
        os._exit(1)


def failpoint(name: str) -> None:
    """Fault injection for the fault suite (tests/test_faults.py): ``DRLAB_FAILPOINT=<name>`` makes this
    process SIGKILL itself here, as a power cut or an OOM kill would. Unset, it costs one dict lookup."""
    if os.environ.get("DRLAB_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
