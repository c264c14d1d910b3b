"""Stage locks that hold when several hosts share ``outputs/`` over NFS or Lustre.

Why not ``filelock.FileLock``: it is ``flock(2)``. On Linux NFS clients ``flock`` is emulated with
byte-range locks through the NLM / NFSv4 lock service, so it holds across hosts only where that
service runs; on a mount with ``nolock`` or ``local_lock=flock`` (common on clusters) it is a local,
per-host lock and two hosts both "hold" it (``nfs(5)``, "local_lock"; tox-dev/filelock#6). Lustre
gives ``flock`` cluster-wide only when mounted ``-o flock``; ``localflock`` is per node (the Lustre
manual, "Mounting with flock"). A ``flock`` also dies silently with its process, so nothing records
who held it.

What this module uses instead: the lock is a file created with ``O_CREAT | O_EXCL``, which is atomic
on local filesystems, on NFSv3 and later (``open(2)``: "O_EXCL is supported on NFSv3 or later on
kernel 2.6 or later") and on Lustre. The file records who holds it (host, pid, start time, a random
token), and the holder touches it every ``heartbeat`` seconds. A waiting process breaks it when

* the holder ran on this host and its pid is gone (a killed job: broken at once), or
* its heartbeat is older than ``stale_after`` seconds (a dead host, or a job killed by SLURM) --
  measured against the shared filesystem's clock (the mtime of a file the waiter just touched in
  the same directory), so clock skew between hosts does not matter.

Breaking is serialised by a second ``O_EXCL`` file (``<lock>.break``): one breaker at a time re-reads
the lock and removes it only if it still holds the stale token, so two waiters never break a lock
that a third has just taken. Condition, stated: a holder whose heartbeat stalls for ``stale_after``
seconds (e.g. a suspended process) can lose its lock; the stage's result is still published by
one atomic rename, so the cache never holds a half-written stage, at worst one computed twice.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("drlab")

HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _create_exclusive(path: Path, payload: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(payload))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def read_holder(path: Path) -> dict | None:
    """The lock file's record plus its ``mtime`` (the last heartbeat); None if there is no lock."""
    try:
        st = path.stat()
        info = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except ValueError:  # created, not yet written (or torn): treat as fresh, by mtime
        info = {}
    return {**info, "mtime": st.st_mtime}


def filesystem_now(directory: Path) -> float:
    """The shared filesystem's clock: the mtime of a file this process just touched there."""
    probe = directory / f".now-{HOST}-{os.getpid()}"
    probe.touch()
    os.utime(probe)
    now = probe.stat().st_mtime
    probe.unlink(missing_ok=True)
    return now


class StageLock:
    """Exclusive lock on one stage key, across processes and hosts. A context manager."""

    def __init__(self, path: str | os.PathLike, stale_after: float = 600.0, heartbeat: float | None = None,
                 poll: float = 0.5):
        self.path = Path(path)
        self.stale_after = float(stale_after)
        self.heartbeat = float(heartbeat) if heartbeat else max(0.05, self.stale_after / 20)
        self.poll = float(poll)
        self.token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self, timeout: float | None = None) -> StageLock:
        """Block until the lock is ours (breaking a stale one); ``timeout`` seconds: TimeoutError after."""
        token = secrets.token_hex(8)
        me = {"host": HOST, "pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat(), "token": token}
        waited_on, deadline = None, None if timeout is None else time.monotonic() + float(timeout)
        while not _create_exclusive(self.path, me):
            holder = read_holder(self.path)
            if holder is None:
                continue  # released between our create and our read
            why = self.stale_reason(holder)
            if why:
                self._break(holder, why)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.path} is held by {holder.get('host')} pid {holder.get('pid')} "
                                   f"since {holder.get('started')}")
            if holder.get("token") != waited_on:
                waited_on = holder.get("token")
                log.info("waiting for %s, held by %s pid %s since %s", self.path.name, holder.get("host"),
                         holder.get("pid"), holder.get("started"))
            time.sleep(self.poll)
        self.token = token
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock-{self.path.name}", daemon=True)
        self._beat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = read_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink()
        else:
            log.error("%s was broken while this process held it (its heartbeat stalled for %.0f s?): another "
                      "job may have computed the same stage; the cache keeps whichever finished last",
                      self.path.name, self.stale_after)
        self.token = None

    def __enter__(self) -> StageLock:
        if self.token is None:  # ``with lock.acquire(timeout=...):`` has taken it already
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ staleness
    def stale_reason(self, holder: dict) -> str | None:
        """Why ``holder``'s lock may be broken, or None while it is live."""
        if holder.get("host") == HOST and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        age = filesystem_now(self.path.parent) - holder["mtime"]
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_after:.0f} s)"
        return None

    def _break(self, holder: dict, why: str) -> None:
        guard = self.path.with_name(self.path.name + ".break")
        if not _create_exclusive(guard, {"host": HOST, "pid": os.getpid()}):
            g = read_holder(guard)  # another breaker is at work; one that died leaves its guard behind
            if g is not None and filesystem_now(self.path.parent) - g["mtime"] > 60:
                guard.unlink(missing_ok=True)
            time.sleep(self.poll)
            return
        try:
            now = read_holder(self.path)
            if now is not None and now.get("token") == holder.get("token") and self.stale_reason(now):
                self.path.unlink()
                log.warning("broke the lock %s held by %s pid %s since %s: %s", self.path.name, holder.get("host"),
                            holder.get("pid"), holder.get("started"), why)
        finally:
            guard.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = read_holder(self.path)
            if holder is None or holder.get("token") != self.token:
                return  # broken: release() reports it
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return
