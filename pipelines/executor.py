"""The staged executor: content-addressed, lock-protected, resumable stage runs.

The idea is allenai/tango's content-hashed steps, cut down to what a retrieval
chain needs. A stage's *key* is

    <name>-v<version>-<sha256(resolved reads, data fingerprint, upstream keys)[:12]>

where *reads* are the config nodes the stage declares (and the only ones it is
shown), *upstream keys* are the keys of the enabled stages before it in the
family's chain, and *version* is bumped by hand when the stage's code changes
what it writes. ``runtime.*`` (device, encode batch size, threads) is never
hashed.

Life of a stage directory (all under ``outputs/cache/<stage>/``)::

    <key>.work/      scratch that survives a kill (training checkpoints); resumed
    <key>.partial/   the stage writes its artifacts here
    <key>/           atomic rename of .partial once manifest.json is written last

A directory without ``manifest.json`` is never treated as finished. Two jobs
(e.g. a Hydra ``-m`` sweep) that need the same stage serialise on a file lock in
``outputs/locks/``; the second one finds the manifest and reuses the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("drlab")

#: Canonical order of every stage dr-lab knows. A family's chain is a sub-sequence.
STAGE_ORDER = ("bm25", "pretrain", "retriever1", "mine", "retriever2", "rerank", "distill", "index", "eval")


class ConfigError(ValueError):
    """A user-facing configuration mistake (unknown stage, bad chain, ...)."""


@dataclass(frozen=True)
class Stage:
    """One step of a chain. ``run`` gets a :class:`Context` and returns metrics."""

    name: str
    version: str
    reads: tuple[str, ...]
    run: Callable[["Context"], dict[str, float]]
    #: under torchrun: True = every rank runs ``run`` (it shards its own work);
    #: False = rank 0 runs it while the other ranks wait
    distributed: bool = False
    #: options added after the stage's results were first cached, as (dotted key, value that
    #: reproduces the behaviour from before the option existed): at that value the option is left
    #: out of the key, so adding it does not invalidate finished stages; any other value is hashed
    added_options: tuple[tuple[str, Any], ...] = ()


class _AnyValue:
    """An ``added_options`` value that matches every value: the option never enters the key."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "ANY_VALUE"


ANY_VALUE = _AnyValue()

#: options added to ``model.pretrain`` after results were cached. Stages that read the whole
#: ``model`` node (retriever1 ... eval) see a pre-training change through the pretrain stage's key
#: in their ``upstream``, so these stay out of their own keys whatever their value.
PRETRAIN_METHOD_OPTIONS: tuple[tuple[str, Any], ...] = (("model.pretrain.loss_on_special", ANY_VALUE),)


@dataclass
class Context:
    """What a running stage may see: its own config reads, runtime knobs, its dirs."""

    stage: str
    key: str
    cfg: DictConfig  # only the declared reads (+ runtime)
    out: Path  # <key>.partial/ : write artifacts here
    work: Path  # <key>.work/ : checkpoints that survive a kill
    upstream: dict[str, Path]  # finished dirs of the earlier enabled chain stages

    @property
    def runtime(self) -> DictConfig:
        return self.cfg.runtime


@dataclass
class PlanItem:
    stage: str
    key: str | None
    status: str  # cached | run | force | disabled
    dir: Path | None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float | None = None


# --------------------------------------------------------------------------- keys


def _select(cfg: DictConfig, dotted: str) -> Any:
    node = OmegaConf.select(cfg, dotted, throw_on_missing=True)
    if node is None and OmegaConf.select(cfg, dotted, default="__absent__") == "__absent__":
        raise ConfigError(f"stage reads config node '{dotted}', which does not exist")
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def data_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """Content fingerprint of a dataset directory (so the key does not hold a machine path).

    Files up to 256 MiB are hashed whole; larger ones by size + first and last MiB.
    """
    root = Path(path)
    out: dict[str, str] = {}
    if not root.exists():
        return {"absent": str(root.name)}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.suffix.lower() in {".md", ".zip", ".gz", ".tar"} and f.name.lower() != "corpus.jsonl.gz":
            continue
        h = hashlib.sha256()
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if size <= 256 << 20:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
        out[str(f.relative_to(root))] = h.hexdigest()[:16]
    return out


_FP_CACHE: dict[tuple, dict[str, str]] = {}


def _fp_cache_key(path: str) -> tuple:
    """Path plus every file's size and mtime: a file changed in place invalidates the cache."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return (path, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def resolved_reads(stage: Stage, cfg: DictConfig) -> dict[str, Any]:
    reads: dict[str, Any] = {}
    for r in stage.reads:
        try:
            value = _select(cfg, r)
        except ConfigError as e:
            raise ConfigError(
                f"{e} (read by stage '{stage.name}'; model '{OmegaConf.select(cfg, 'model.name')}'). Fix: give the "
                f"config that node, or drop '{stage.name}' from model.chain"
            ) from None
        if r == "data" and isinstance(value, dict):
            # Hash the content, not where it lives on this machine.
            value = dict(value)
            path = value.pop("path", None)
            if path is not None:
                ck = _fp_cache_key(path)
                if ck not in _FP_CACHE:
                    _FP_CACHE[ck] = data_fingerprint(path)
                value["fingerprint"] = _FP_CACHE[ck]
        reads[r] = value
    options = stage.added_options + (PRETRAIN_METHOD_OPTIONS if "model" in stage.reads else ())
    for dotted, old_behaviour in options:
        read = next((r for r in stage.reads if dotted.startswith(r + ".")), None)
        if read is None:
            raise ValueError(f"stage '{stage.name}': added option '{dotted}' is not under one of its reads {stage.reads}")
        *parents, leaf = dotted[len(read) + 1 :].split(".")
        value = json.loads(json.dumps(reads[read]))  # a copy: the caller's containers stay as they are
        node = value
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == old_behaviour:
            del node[leaf]
            reads[read] = value
    return reads


def stage_key(stage: Stage, cfg: DictConfig, upstream_keys: list[str]) -> str:
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "reads": resolved_reads(stage, cfg),
        "upstream": upstream_keys,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"{stage.name}-v{stage.version}-{digest[:12]}"


# --------------------------------------------------------------------------- plan


def chain_of(cfg: DictConfig) -> list[str]:
    chain = list(cfg.model.chain)
    unknown = [s for s in chain if s not in STAGE_ORDER]
    if unknown:
        raise ConfigError(
            f"model '{cfg.model.name}' chain names unknown stage(s) {unknown}; "
            f"valid stages: {', '.join(STAGE_ORDER)}"
        )
    positions = [STAGE_ORDER.index(s) for s in chain]
    if positions != sorted(positions) or len(set(chain)) != len(chain):
        raise ConfigError(f"model '{cfg.model.name}' chain {chain} must follow the order {list(STAGE_ORDER)}")
    return chain


def _enabled(cfg: DictConfig, name: str) -> bool:
    node = OmegaConf.select(cfg, f"pipeline.{name}")
    return bool(node.get("enabled", True)) if node is not None else True


def plan(cfg: DictConfig, stages: dict[str, Stage], target: str, force: list[str], cache_dir: Path) -> list[PlanItem]:
    """The upstream closure of ``target`` in the family's chain, with keys and statuses."""
    chain = chain_of(cfg)
    if target == "all":
        target = chain[-1]
    if target not in chain:
        raise ConfigError(
            f"stage '{target}' is not in the chain of model '{cfg.model.name}'. "
            f"Valid choices: all, {', '.join(chain)}"
        )
    for f in force:
        if f != "all" and f not in chain:
            raise ConfigError(f"force names stage '{f}', not in the chain; valid choices: all, {', '.join(chain)}")
    items: list[PlanItem] = []
    upstream_keys: list[str] = []
    for name in chain[: chain.index(target) + 1]:
        if not _enabled(cfg, name):
            if name == target:
                raise ConfigError(f"target stage '{name}' is disabled (pipeline.{name}.enabled=false)")
            items.append(PlanItem(name, None, "disabled", None))
            continue
        if name not in stages:
            raise ConfigError(f"stage '{name}' is not implemented yet; implemented: {', '.join(stages)}")
        key = stage_key(stages[name], cfg, list(upstream_keys))
        d = cache_dir / name / key
        if name in force or "all" in force:
            status = "force"
        elif (d / "manifest.json").exists():
            status = "cached"
        else:
            status = "run"
        items.append(PlanItem(name, key, status, d))
        upstream_keys.append(key)
    return items


def format_plan(items: list[PlanItem]) -> str:
    width = max(len(i.stage) for i in items)
    label = {"cached": "cached", "run": "to run", "force": "forced", "disabled": "disabled", "ran": "ran"}
    rows = [f"  {i.stage:<{width}}  {label[i.status]:<8}  {i.key or '-'}" for i in items]
    return "plan:\n" + "\n".join(rows)


# --------------------------------------------------------------------------- run


def _git_state() -> dict[str, Any]:
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


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "faiss-cpu", "faiss-gpu", "pyserini", "ranx", "hydra-core", "numpy", "dr-lab"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def _stage_view(cfg: DictConfig, stage: Stage) -> DictConfig:
    view: dict[str, Any] = {}
    for r in stage.reads:
        parts = r.split(".")
        node = view
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _select(cfg, r)
    view["runtime"] = OmegaConf.to_container(cfg.runtime, resolve=True)
    out = OmegaConf.create(view)
    OmegaConf.set_struct(out, True)
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


def peak_rss_mb() -> float | None:
    """The process's peak resident set size (VmHWM) in MiB, None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _rmtree(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


def dist_state() -> tuple[int, int, Any]:
    """(rank, world size, torch.distributed or None). Never imports torch itself."""
    d = sys.modules.get("torch.distributed")
    if d is not None and d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size(), d
    return 0, 1, None


def _agree(dist, value):
    """Rank 0's ``value`` on every rank."""
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def execute(cfg: DictConfig, stages: dict[str, Stage], items: list[PlanItem], cache_dir: Path, lock_dir: Path) -> None:
    """Run the plan in order. Raises whatever a stage raises, leaving no manifest behind.

    Under ``torchrun`` (a process group is initialised) every rank runs the stage body,
    so training and encoding can shard the work; only rank 0 takes the lock, prepares
    ``.partial``/``.work`` and writes the manifest, and the ranks meet at barriers.
    """
    rank, _, dist = dist_state()
    lock_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    upstream_keys: list[str] = []
    for item in items:
        if item.status == "disabled":
            continue
        stage = stages[item.stage]
        final = item.dir
        assert final is not None and item.key is not None
        lock = FileLock(str(lock_dir / f"{item.key}.lock")) if rank == 0 else nullcontext()
        with lock:
            manifest = final / "manifest.json"
            cached = _agree(dist, manifest.exists() and item.status != "force")
            if cached:
                m = json.loads(manifest.read_text())
                item.status, item.metrics, item.seconds = "cached", m.get("metrics", {}), 0.0
                log.info("[%s] cached: %s", item.stage, final)
            else:
                _run_one(cfg, stage, item, final, dict(done), list(upstream_keys))
        done[item.stage] = final
        upstream_keys.append(item.key)


def _run_one(cfg, stage: Stage, item: PlanItem, final: Path, upstream: dict[str, Path], upstream_keys: list[str]):
    rank, _, dist = dist_state()
    partial = final.with_name(final.name + ".partial")
    work = final.with_name(final.name + ".work")
    resumed = work.exists() and any(work.iterdir())
    if rank == 0:
        _rmtree(partial)  # a half-written attempt is never reused
        partial.mkdir(parents=True)
        work.mkdir(parents=True, exist_ok=True)
    if dist is not None:
        dist.barrier()
    ctx = Context(stage.name, item.key, _stage_view(cfg, stage), partial, work, upstream)
    started = datetime.now(timezone.utc)
    peak_is_stage = reset_peak_rss()
    t0 = time.perf_counter()
    log.info("[%s] running -> %s%s", stage.name, final, " (work dir has state to resume from)" if resumed else "")
    try:
        metrics = (stage.run(ctx) or {}) if (rank == 0 or stage.distributed) else {}
        if dist is not None:
            dist.barrier()
    except BaseException:
        if rank != 0:
            raise
        _rmtree(partial)
        if work.exists() and not any(work.iterdir()):
            work.rmdir()
        stage_dir = final.parent
        if stage_dir.exists() and not any(stage_dir.iterdir()):
            stage_dir.rmdir()
        raise
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    item.peak_rss_mb = round(peak, 1) if peak is not None else None
    if rank != 0:
        item.status, item.seconds, item.metrics = "ran", seconds, metrics
        dist.barrier()  # wait for rank 0's manifest and rename
        return
    files = {
        str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()
    }
    manifest = {
        "stage": stage.name,
        "version": stage.version,
        "key": item.key,
        "upstream": upstream_keys,
        "reads": resolved_reads(stage, cfg),
        "metrics": metrics,
        "files": files,
        "git": _git_state(),
        "packages": _package_versions(),
        "python": sys.version.split()[0],
        "started": started.isoformat(),
        "seconds": round(seconds, 3),
        "peak_rss_mb": item.peak_rss_mb,  # this process only, not DataLoader workers or helper processes
        "peak_rss_since": "stage start" if peak_is_stage else "process start",
        "command": sys.argv,
    }
    _write_json(partial / "manifest.json", manifest)  # written last: marks completion
    trash = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        os.replace(final, trash)
    os.replace(partial, final)
    _rmtree(trash)
    _rmtree(work)
    item.status, item.seconds, item.metrics = "ran", seconds, metrics
    if dist is not None:
        dist.barrier()
    log.info("[%s] done in %.1fs, peak RSS %s MiB", stage.name, seconds, item.peak_rss_mb)
