"""The staged executor: content-addressed, lock-protected, resumable stage runs.

The idea is allenai/tango's content-hashed steps, cut down to what a retrieval chain needs.
Each :class:`Stage` declares what it reads and which earlier stages' artifacts it uses; its
key (:mod:`pipelines.keys`) hashes exactly those, so a teacher setting never moves
``retriever1``'s key and rewriting ``model.chain`` moves no stage whose inputs stayed.

Life of a stage directory (all under ``outputs/cache/<stage>/``)::

    <key>.work/      scratch that survives a kill (training checkpoints); resumed
    <key>.partial/   the stage writes its artifacts here
    <key>/           atomic rename of .partial once manifest.json is written last

A directory without ``manifest.json`` is never treated as finished. Two jobs (a Hydra ``-m``
sweep, on one host or on many sharing ``outputs/``) that need the same stage serialise on a lock
in ``outputs/locks/`` (:mod:`pipelines.locks`: ``O_EXCL`` + heartbeat, safe on NFS and Lustre;
a dead holder's lock is broken); the second finds the manifest and reuses the result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines import keys as K
from pipelines.contract import (  # noqa: F401  (re-exported: stages import the contract from here)
    CHECKPOINT_STAGES,
    STAGE_ORDER,
    UNHASHED_VIEWS,
    Context,
    Stage,
    newest_checkpoint,
    task_of,
)
from pipelines.locks import StageLock
from pipelines.manifest import DamagedCacheError, file_hash, problems, record_files  # noqa: F401  (re-exported)
from pipelines.provenance import git_state, package_versions, peak_rss_mb, reset_peak_rss
from retrievers.errors import ConfigError
from retrievers.proc import failpoint

log = logging.getLogger("drlab")

@dataclass
class PlanItem:
    stage: str
    key: str | None
    status: str  # cached | run | force | disabled | n/a (not for this data) | damaged (files do not match: recomputed)
    dir: Path | None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    uses: tuple[str, ...] = ()
    reads: dict[str, Any] = field(default_factory=dict)
    #: a cached stage: the run that made it (when, the command, its commit), from its manifest
    produced_by: dict[str, Any] | None = None


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


def resolved_reads(stage: Stage, cfg: DictConfig, before: list[str]) -> dict[str, Any]:
    out = {}
    for r in stage.reads_for(cfg, before):
        try:
            out[r] = K.hashed_value(cfg, r)
        except ConfigError as e:
            raise ConfigError(
                f"{e} (read by stage '{stage.name}'; model '{OmegaConf.select(cfg, 'model.name')}'). Fix: give the "
                f"config that node, or drop '{stage.name}' from model.chain"
            ) from None
    return out


def plan(cfg: DictConfig, stages: dict[str, Stage], target: str, force: list[str], cache_dir: Path) -> list[PlanItem]:
    """The stages ``target`` needs (its transitive ``uses``; ``all``: the whole chain), keyed, in chain order."""
    chain = chain_of(cfg)
    for f in force:
        if f != "all" and f not in chain:
            raise ConfigError(f"force names stage '{f}', not in the chain; valid choices: all, {', '.join(chain)}")
    if target != "all" and target not in chain:
        raise ConfigError(
            f"stage '{target}' is not in the chain of model '{cfg.model.name}'. Valid choices: all, {', '.join(chain)}"
        )
    if target != "all" and not _enabled(cfg, target):
        raise ConfigError(f"target stage '{target}' is disabled (pipeline.{target}.enabled=false)")
    for name in chain:
        if name not in stages:
            raise ConfigError(f"stage '{name}' is not implemented yet; implemented: {', '.join(stages)}")
    task = task_of(cfg)
    applies = {n for n in chain if task in stages[n].tasks}
    if target != "all" and target not in applies:
        raise ConfigError(f"stage '{target}' does not run on {task} data (data={cfg.data.name}); "
                          f"the stages that do: {', '.join(n for n in chain if n in applies)}")
    enabled = [n for n in chain if _enabled(cfg, n) and n in applies]
    uses: dict[str, tuple[str, ...]] = {}
    needed: set[str] = set()
    todo = list(enabled) if target == "all" else [target]
    while todo:  # the transitive closure of the target's uses (each stage's uses computed once)
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            uses[n] = stages[n].uses_for(cfg, enabled[: enabled.index(n)])
            todo.extend(uses[n])
    items: list[PlanItem] = []
    key_of: dict[str, str] = {}
    for name in chain:
        if name not in enabled:
            if target == "all" or STAGE_ORDER.index(name) < STAGE_ORDER.index(target):
                items.append(PlanItem(name, None, "disabled" if name in applies else "n/a", None))
            continue
        if name not in needed:
            continue
        reads = resolved_reads(stages[name], cfg, enabled[: enabled.index(name)])
        key = K.stage_key(name, stages[name].version, reads, {u: key_of[u] for u in uses[name]})
        key_of[name] = key
        d = cache_dir / name / key
        if name in force or "all" in force:
            status = "force"
        elif (d / "manifest.json").exists():
            status = "damaged" if problems(d) else "cached"
        else:
            status = "run"
        items.append(PlanItem(name, key, status, d, uses=uses[name], reads=reads))
    return items


def format_plan(items: list[PlanItem]) -> str:
    width = max(len(i.stage) for i in items)
    label = {"cached": "cached", "run": "to run", "force": "forced", "disabled": "disabled", "n/a": "n/a", "ran": "ran",
             "damaged": "damaged"}
    rows = [
        f"  {i.stage:<{width}}  {label[i.status]:<8}  {i.key or '-'}" + (f"  <- {', '.join(i.uses)}" if i.uses else "")
        for i in items
    ]
    return "plan:\n" + "\n".join(rows)


# --------------------------------------------------------------------------- run


def stage_view(cfg: DictConfig, reads: tuple[str, ...]) -> DictConfig:
    """A struct config holding only ``reads`` (and ``runtime``, ``gates``): what a stage is shown."""
    view: dict[str, Any] = {}
    for r in reads:
        parts = r.split(".")
        node = view
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = K.select(cfg, r)
    for shown in UNHASHED_VIEWS:
        view[shown] = OmegaConf.to_container(cfg[shown], resolve=True) if shown in cfg else {}
    out = OmegaConf.create(view)
    OmegaConf.set_struct(out, True)
    return out


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
    for item in items:
        if item.status in ("disabled", "n/a"):
            continue
        stage = stages[item.stage]
        final = item.dir
        assert final is not None and item.key is not None
        lock = (StageLock(lock_dir / f"{item.key}.lock", stale_after=float(cfg.runtime.get("lock_stale_s", 600)))
                if rank == 0 else nullcontext())
        with lock:
            manifest = final / "manifest.json"
            cached = _agree(dist, manifest.exists() and item.status != "force" and _intact(cfg, item, final))
            if cached:
                m = json.loads(manifest.read_text())
                item.status, item.metrics, item.seconds = "cached", m.get("metrics", {}), 0.0
                made = item.produced_by = {"started": m.get("started"), "command": m.get("command"),
                                           "commit": (m.get("git") or {}).get("commit")}
                log.info("[%s] cached: %s (made %s by %s)", item.stage, final, made["started"],
                         " ".join(made["command"] or ["?"]))
            else:
                _run_one(cfg, stage, item, final, {u: done[u] for u in item.uses})
        done[item.stage] = final


def _intact(cfg: DictConfig, item: PlanItem, final: Path) -> bool:
    """A finished dir whose files match its manifest (sizes; hashes with ``verify=true``). A damaged one
    is set aside as ``<key>.damaged-<time>`` and recomputed, or stops the run with ``strict=true``."""
    found = problems(final, hashes=bool(cfg.get("verify", False)))
    if not found:
        return True
    listing = "\n  ".join(found)
    if cfg.get("strict", False):
        raise DamagedCacheError(
            f"[{item.stage}] the cached stage {final} does not match its manifest:\n  {listing}\n"
            f"Fix: recompute it (force=[{item.stage}]), or run without strict=true to set it aside and recompute."
        )
    aside = final.with_name(f"{final.name}.damaged-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.replace(final, aside)
    log.error("[%s] cached stage does not match its manifest, set aside as %s and recomputed:\n  %s",
              item.stage, aside.name, listing)
    item.status = "run"
    return False


def _run_one(cfg, stage: Stage, item: PlanItem, final: Path, upstream: dict[str, Path]):
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
    ctx = Context(stage.name, item.key, stage_view(cfg, tuple(item.reads)), partial, work, upstream, item.reads)
    started = datetime.now(timezone.utc)
    peak_is_stage = reset_peak_rss()
    t0 = time.perf_counter()
    log.info("[%s] running -> %s%s", stage.name, final, " (work dir has state to resume from)" if resumed else "")
    try:
        metrics = (stage.run(ctx) or {}) if (rank == 0 or stage.distributed) else {}
        failpoint(f"after_run:{stage.name}")
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
    files = record_files(partial)
    manifest = {
        "stage": stage.name,
        "version": stage.version,
        "key": item.key,
        "key_format": K.KEY_FORMAT,
        "upstream": {u: p.name for u, p in upstream.items()},
        "reads": item.reads,
        "metrics": metrics,
        "files": files,
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "started": started.isoformat(),
        "seconds": round(seconds, 3),
        "peak_rss_mb": item.peak_rss_mb,  # this process only, not DataLoader workers or helper processes
        "peak_rss_since": "stage start" if peak_is_stage else "process start",
        "command": sys.argv,
    }
    _write_json(partial / "manifest.json", manifest)  # written last: marks completion
    failpoint(f"before_rename:{stage.name}")
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
