"""dr-lab entry point.

    python run.py model=<family> data=<dataset> stage=<target> [key=value ...]
    python run.py -m model=dpr,ance pipeline.retriever1.lr=1e-5,2e-5     # sweep

Runs the upstream closure of ``stage`` in the family's chain, reusing every cached
stage, and ends with the line ``summary: <path of summary.json>``.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipelines.runner import REPO, run_pipeline

GROUPS = ("model", "data", "index", "pipeline", "loss", "teacher", "paths", "hydra", "experiment", "debug", "local")


def _user_errors():
    from retrievers.bm25 import JavaError
    from retrievers.data import DataError
    from retrievers.errors import ConfigError

    return (ConfigError, DataError, JavaError)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_pipeline(cfg, run_dir)
    except _user_errors() as e:
        logging.getLogger("drlab").error("%s", e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if not cfg.get("dry_run") and int(os.environ.get("RANK", "0")) == 0:
        print(f"summary: {run_dir / 'summary.json'}", flush=True)
    return summary.get("metrics", {}).get(f"{cfg.data.eval_split}/{cfg.pipeline.eval.primary}")


def check_overrides(argv: list[str]) -> str | None:
    """An override naming a config key that does not exist: say which keys do.

    Hydra's own message ("Key 'x' is not in struct") does not list the choices.
    Returns an error message or None.
    """
    from hydra import compose, initialize_config_dir

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    groups = [a for a in args if a.lstrip("+~").split("=")[0].split("/")[0] in GROUPS and "." not in a.split("=")[0]]
    keys = [a.split("=")[0] for a in args if a not in groups and not a.startswith(("+", "~", "hydra."))]
    if not keys:
        return None
    first_choice = [g.split("=")[0] + "=" + g.split("=", 1)[1].split(",")[0] for g in groups]
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=first_choice)
    except Exception:
        return None  # Hydra reports group errors itself, with the available options
    # Plain containers, unresolved: a mandatory '???' value (data.name of data=beir) is a
    # key that exists, though `key in DictConfig` says it is not.
    tree = OmegaConf.to_container(cfg, resolve=False)
    for key in keys:
        parts = key.split(".")
        node = tree
        for i, p in enumerate(parts):
            if not isinstance(node, dict) or p not in node:
                parent = ".".join(parts[:i]) or "<top level>"
                valid = sorted(node.keys()) if isinstance(node, dict) else []
                close = difflib.get_close_matches(p, [str(v) for v in valid], n=1, cutoff=0.5)
                hint = f" Did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
                return (
                    f"error: config key '{key}' does not exist.{hint}\n"
                    f"  valid keys under {parent}: {', '.join(map(str, valid))}\n"
                    f"  (to add a new key on purpose, write +{key}=...)"
                )
            node = node[p]
    return None


def rank_run_dir(argv: list[str], rank: int) -> list[str]:
    """Under torchrun, ranks > 0 keep their Hydra directory (config, log) out of ``runs/``.

    Hydra names a run directory by the second it starts in; ranks of one job can start in
    different seconds (a loaded machine), which would leave several run directories. Rank 0
    owns ``runs/<time>_<model>_<data>``; rank r writes ``ranks/<time>_<model>_<data>_rank<r>``.
    """
    if rank == 0 or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    return [*argv, f"hydra.run.dir=${{paths.output_dir}}/ranks/${{now:%Y-%m-%d_%H-%M-%S}}_${{model.name}}_"
                   f"${{data.name}}_rank{rank}"]


if __name__ == "__main__":
    msg = check_overrides(sys.argv[1:])
    if msg:
        print(msg, file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *rank_run_dir(sys.argv[1:], int(os.environ.get("RANK", "0")))]
    main()
