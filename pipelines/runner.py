"""What ``run.py`` does with a composed config: plan, execute, summarise, report.

Kept apart from ``run.py`` so tests call it on a config composed with Hydra's
compose API, without a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines import all_stages, keys
from pipelines.executor import PlanItem, execute, format_plan, plan
from retrievers import token_cache
from retrievers.data import ensure_available
from retrievers.errors import ConfigError

log = logging.getLogger("drlab")

REPO = Path(__file__).resolve().parent.parent


#: one per process: the run directory's suffix, so two runs started in the same second differ
RUN_UID = secrets.token_hex(3)


def register_resolvers() -> None:
    """``${drlab_root:}``: the repository root (where run.py lives); ``${drlab_uid:}``: :data:`RUN_UID`."""
    if not OmegaConf.has_resolver("drlab_root"):
        OmegaConf.register_new_resolver("drlab_root", lambda: str(REPO))
    if not OmegaConf.has_resolver("drlab_uid"):
        OmegaConf.register_new_resolver("drlab_uid", lambda: RUN_UID)


register_resolvers()


def _data_splits(cfg: DictConfig) -> list[str]:
    return [s for s in dict.fromkeys([cfg.data.get("eval_split"), cfg.data.get("train_split")]) if s]


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run ``cfg.stage``'s upstream closure; write ``summary.json`` into ``run_dir``."""
    torch_threads(cfg)
    token_cache.configure(cfg.runtime.get("token_cache"))
    out_root = Path(cfg.paths.output_dir)
    cache = out_root / "cache"
    keys.FINGERPRINT_STORE, keys.STORE_WRITABLE = cache / "fingerprints.json", not cfg.get("dry_run")
    stages = all_stages()
    force = list(cfg.get("force") or [])
    data = check_data(cfg)
    # a dry run never downloads: a missing dataset is reported, and its stages show as absent data
    ensure_available(data, _data_splits(cfg), download=not cfg.get("dry_run"))
    items = plan(cfg, stages, str(cfg.stage), force, cache)
    print(format_plan(items), flush=True)
    if cfg.get("dry_run"):
        return {"plan": [{"stage": i.stage, "key": i.key, "status": i.status} for i in items]}
    rank = init_distributed_from_env(cfg)
    t0 = time.perf_counter()
    error: BaseException | None = None
    try:
        execute(cfg, stages, items, cache, out_root / "locks")
    except BaseException as e:
        error = e
        raise
    finally:
        summary = _summary(cfg, items, time.perf_counter() - t0, error)
        if rank == 0:  # under torchrun only rank 0 writes the run directory
            run_dir.mkdir(parents=True, exist_ok=True)
            _link_stages(run_dir, items)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if error is None:  # a failed run never replaces the last good one
                _point_latest(out_root, run_dir)
                _point_experiment(cfg, out_root, run_dir)
    if rank != 0:
        return summary
    if cfg.get("logger") == "wandb":
        _log_wandb(cfg, summary, run_dir)
    _print_metrics(summary["metrics"])
    return summary


def export_submitit_ranks() -> None:
    """Inside a submitit job with several tasks (``hydra/launcher=slurm``: one task per GPU), set the
    variables torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's."""
    if "WORLD_SIZE" in os.environ or not (os.environ.get("SUBMITIT_EXECUTOR") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # every rank sees every GPU of the node and picks cuda:LOCAL_RANK, as under torchrun
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed_from_env(cfg: DictConfig) -> int:
    """Under ``torchrun`` or a multi-task submitit job (WORLD_SIZE > 1) join the process group; returns this rank."""
    export_submitit_ranks()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from retrievers.encoder import resolve_device

        cuda = resolve_device(str(cfg.runtime.device)).type == "cuda"
        if cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"runtime.device={cfg.runtime.device}: local rank {local_rank} has no GPU "
                    f"({torch.cuda.device_count()} visible); lower --nproc_per_node or use runtime.device=cpu"
                )
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank()


def torch_threads(cfg: DictConfig) -> None:
    n = int(cfg.runtime.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)


def check_data(cfg: DictConfig) -> dict[str, Any]:
    """The resolved ``data`` node, or a ConfigError naming the missing key and the fix."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"data.{e.key} is not set (conf/data/{cfg.data.get('format', 'beir')}.yaml leaves it '???'). "
            f"Fix: give it on the command line, e.g. data=beir data.name=trec-covid"
        ) from None


def _summary(cfg: DictConfig, items: list[PlanItem], seconds: float, error: BaseException | None = None) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    for i in items:
        if i.stage == "eval":
            metrics.update(i.metrics)
    return {
        "name": experiment_name(cfg),
        "status": "ok" if error is None else "failed",
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "model": cfg.model.name,
        "data": cfg.data.name,
        "stage": cfg.stage,
        "metrics": metrics,
        "stages": {
            i.stage: {
                "status": {"force": "pending", "run": "pending", "damaged": "pending"}.get(i.status, i.status),
                "seconds": round(i.seconds, 2),
                "peak_rss_mb": i.peak_rss_mb,
                "key": i.key,
                "dir": str(i.dir) if i.dir else None,
                "metrics": i.metrics,
                **({"produced_by": i.produced_by} if i.produced_by else {}),
            }
            for i in items
        },
        "seconds": round(seconds, 2),
        "command": sys.argv,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _link_stages(run_dir: Path, items: list[PlanItem]) -> None:
    links = run_dir / "stages"
    links.mkdir(exist_ok=True)
    for i in items:
        if i.dir is None or not i.dir.exists():
            continue
        link = links / i.stage
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(i.dir, links))


def _point_latest(out_root: Path, run_dir: Path) -> None:
    latest = out_root / "latest"
    tmp = out_root / f".latest-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(run_dir, out_root))
    os.replace(tmp, latest)


def experiment_name(cfg: DictConfig) -> str:
    return str(cfg.get("name") or f"{cfg.model.name}-{cfg.data.name}")


def _point_experiment(cfg: DictConfig, out_root: Path, run_dir: Path) -> None:
    """``outputs/experiments/<name>.json``: the newest run of a named experiment (used by tables)."""
    exp = out_root / "experiments"
    exp.mkdir(parents=True, exist_ok=True)
    (exp / f"{experiment_name(cfg)}.json").write_text(
        json.dumps({"summary": str(run_dir / "summary.json"), "run_dir": str(run_dir)}, indent=2) + "\n"
    )


def _print_metrics(metrics: dict[str, float]) -> None:
    if not metrics:
        return
    w = max(len(k) for k in metrics)
    print("metrics:")
    for k, v in metrics.items():
        print(f"  {k:<{w}}  {v:.4f}")


def _log_wandb(cfg: DictConfig, summary: dict, run_dir: Path) -> None:
    os.environ.setdefault("WANDB_MODE", str(cfg.get("wandb", {}).get("mode", "offline")))
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(
        project=cfg.get("wandb", {}).get("project", "dr-lab"),
        name=f"{cfg.model.name}-{cfg.data.name}",
        dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    run.log(summary["metrics"])
    run.summary.update({f"seconds/{k}": v["seconds"] for k, v in summary["stages"].items()})
    run.finish()
