"""Inspect and tidy the stage cache.

    python -m pipelines.cache verify [--outputs DIR] [--sizes-only]
        check every finished stage against its manifest (content hashes; sizes only with
        --sizes-only); prints one line per problem and exits 1 if there is any.
    python -m pipelines.cache gc [--outputs DIR] [--remove]
        list what the cache holds that no finished run needs, with sizes: half-written
        ``.partial/`` dirs, resumable ``.work/`` dirs, ``.damaged-*`` dirs set aside by a check, and
        finished entries that no run summary or experiment pointer references, and the token-id
        cache (``outputs/tokens/``, ``retrievers/token_cache.py``). ``--remove``
        deletes them; a stage whose lock is held by a running job is skipped.

``--outputs`` defaults to ``$DRLAB_OUTPUT_DIR`` or ``./outputs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from pipelines.locks import StageLock
from pipelines.manifest import MANIFEST, problems


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def entries(cache: Path) -> list[Path]:
    return sorted(d for stage in cache.iterdir() if stage.is_dir() for d in stage.iterdir()) if cache.exists() else []


def referenced(out: Path) -> set[str]:
    """Names of the finished stage dirs that some run summary or experiment pointer references."""
    names: set[str] = set()
    summaries = list((out / "runs").glob("*/summary.json")) + list((out / "multiruns").glob("*/*/summary.json"))
    for p in (out / "experiments").glob("*.json") if (out / "experiments").exists() else []:
        try:
            summaries.append(Path(json.loads(p.read_text())["summary"]))
        except (ValueError, KeyError, OSError):
            continue
    for s in summaries:
        try:
            stages = json.loads(s.read_text()).get("stages", {})
        except (ValueError, OSError):
            continue
        names |= {Path(v["dir"]).name for v in stages.values() if v.get("dir")}
    return names


def verify(out: Path, hashes: bool = True) -> int:
    bad = checked = 0
    for d in entries(out / "cache"):
        if not (d / MANIFEST).exists() or "." in d.name:
            continue
        checked += 1
        for problem in problems(d, hashes=hashes):
            bad += 1
            print(f"DAMAGED {problem}")
    print(f"{checked} finished stage(s) checked ({'content hashes' if hashes else 'sizes'}), {bad} problem(s)")
    return 1 if bad else 0


def gc(out: Path, remove: bool) -> int:
    refs = referenced(out)
    total = 0
    for d in entries(out / "cache"):
        kind = next((k for k in (".partial", ".work", ".damaged-") if k in d.name), None)
        if kind is None:
            if not (d / MANIFEST).exists():
                kind = "unfinished"
            elif d.name in refs:
                continue
            else:
                kind = "unreferenced"
        key = d.name.split(".")[0]
        try:
            with StageLock(out / "locks" / f"{key}.lock").acquire(timeout=0):
                size = _size(d)
                total += size
                print(f"{kind:<13} {_human(size):>10}  {d}")
                if remove:
                    shutil.rmtree(d) if d.is_dir() else d.unlink()
        except TimeoutError:
            print(f"{'in use':<13} {'':>10}  {d} (a running job holds its lock: skipped)")
    tokens = out / "tokens"  # runtime.token_cache's default: always rebuildable, never referenced
    for d in sorted(tokens.iterdir()) if tokens.is_dir() else []:
        size = _size(d)
        total += size
        print(f"{'token ids':<13} {_human(size):>10}  {d}")
        if remove:
            shutil.rmtree(d) if d.is_dir() else d.unlink()
    print(f"{'removed' if remove else 'removable (--remove)'}: {_human(total)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["verify", "gc"])
    ap.add_argument("--outputs", type=Path, default=Path(os.environ.get("DRLAB_OUTPUT_DIR", "outputs")))
    ap.add_argument("--sizes-only", action="store_true", help="verify: compare sizes, not content hashes")
    ap.add_argument("--remove", action="store_true", help="gc: delete what it lists")
    a = ap.parse_args(argv)
    (a.outputs / "locks").mkdir(parents=True, exist_ok=True)
    return verify(a.outputs, not a.sizes_only) if a.command == "verify" else gc(a.outputs, a.remove)


if __name__ == "__main__":
    sys.exit(main())
