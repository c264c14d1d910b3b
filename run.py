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
from hydra.types import RunMode
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
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if cfg.get("name") is None and hc.mode == RunMode.MULTIRUN:
        cfg.name = sweep_job_name(cfg, list(hc.overrides.task), sys.argv[1:])
    try:
        summary = run_pipeline(cfg, run_dir)
    except _user_errors() as e:
        logging.getLogger("drlab").error("%s", e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if not cfg.get("dry_run") and int(os.environ.get("RANK", "0")) == 0:
        print(f"summary: {run_dir / 'summary.json'}", flush=True)
    return summary.get("metrics", {}).get(f"{cfg.data.eval_split}/{cfg.pipeline.eval.primary}")


def sweep_job_name(cfg: DictConfig, job_overrides: list[str], argv: list[str]) -> str:
    """A sweep job's experiment name: ``<model>-<data>-<its swept overrides>``, so that jobs never share
    one ``experiments/<name>.json`` (and compare.py never merges them). Swept = given with a comma."""
    swept = {a.split("=")[0].lstrip("+~") for a in argv
             if "=" in a and "," in a.split("=", 1)[1] and not a.split("=", 1)[1].startswith(("[", "{"))}
    mine = [o for o in job_overrides if o.split("=")[0].lstrip("+~") in swept] or \
        [o for o in job_overrides if not o.startswith(("paths.", "hydra."))]
    return f"{cfg.model.name}-{cfg.data.name}-" + ",".join(sorted(mine)).replace("/", "_")


def check_overrides(argv: list[str]) -> str | None:
    """Catch before any work what Hydra would report late or unclearly; returns an error message or None.

    * a key that does not exist: say which keys do (Hydra: "Key 'x' is not in struct");
    * a value of the wrong type: the schema is the type of the key's value in conf/ (a number
      where conf/ has a number, true/false where it has a bool, a list where it has a list), so
      ``pipeline.bm25.k1=abc`` fails here, in a dry run too, not after indexing;
    * a mandatory value left out (``data=beir`` without ``data.name``).
    """
    from hydra import compose, initialize_config_dir

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    groups = [a for a in args if a.lstrip("+~").split("=")[0].split("@")[0].split("/")[0] in GROUPS
              and "." not in a.split("=")[0].split("@")[0]]
    keys = [a for a in args if a not in groups and not a.startswith(("+", "~", "hydra."))]
    first = [a.split("=")[0] + "=" + a.split("=", 1)[1].split(",")[0] if "[" not in a and "{" not in a else a
             for a in groups + keys]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        try:
            cfg = compose("config", overrides=first[: len(groups)])
        except Exception:  # noqa: BLE001
            return None  # Hydra reports these errors itself, with the available options
        try:
            given = compose("config", overrides=first)
        except Exception:  # noqa: BLE001  an unknown key: reported below with the valid ones
            given = None
    # Plain containers, unresolved: a mandatory '???' value (data.name of data=beir) is a
    # key that exists, though `key in DictConfig` says it is not.
    tree = OmegaConf.to_container(cfg, resolve=False)
    for key in (k.split("=")[0] for k in keys):
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
        msg = _type_error(key, node, OmegaConf.to_container(given, resolve=False), parts) if given is not None else None
        if msg:
            return msg
    if given is not None and OmegaConf.is_missing(given.data, "name"):
        return (f"error: data.name is not set: data={given.data.get('format', 'beir')} reads any dataset by name.\n"
                f"  Fix: data=beir data.name=<directory under paths.data_dir>, e.g. data=beir data.name=trec-covid")
    return None


def _type_error(key: str, default, tree: dict, parts: list[str]) -> str | None:
    value = tree
    for p in parts:
        value = value[p]
    if default is None or (isinstance(default, str) and ("${" in default or default == "???")):
        return None  # no type to check against (null, interpolation, mandatory)

    def kind(v):
        if isinstance(v, bool):
            return "true/false"
        if isinstance(v, (int, float)):
            return "a number"
        return {list: "a list", dict: "a mapping", str: "a string"}.get(type(v))

    want, got = kind(default), kind(value)
    if want == "a string" and got in ("a number", "true/false"):
        return None  # '1' or 'true' where a name is expected is still a name
    if value is not None and want != got:
        return (f"error: config key '{key}' expects {want} (conf/ default: {default!r}), got {value!r}.\n"
                f"  Fix: {key}=<{want}>")
    return None


def rank_run_dir(argv: list[str], rank: int) -> list[str]:
    """Under torchrun, ranks > 0 keep their Hydra directory (config, log) out of ``runs/``.

    Hydra names a run directory by the second it starts in; ranks of one job can start in
    different seconds (a loaded machine), which would leave several run directories. Rank 0
    owns ``runs/<time>_<model>_<data>``; rank r writes ``ranks/<time>_<model>_<data>_rank<r>``.
    """
    if rank == 0 or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    return [*argv, f"hydra.run.dir=${{paths.output_dir}}/ranks/${{now:%Y-%m-%d_%H-%M-%S}}_${{drlab_uid:}}_"
                   f"${{model.name}}_${{data.name}}_rank{rank}"]


def dry_run_writes_nothing(argv: list[str]) -> list[str]:
    """``dry_run=true``: no run directory, no Hydra log file (Hydra creates both for every job)."""
    if not any(a.lower() in ("dry_run=true", "dry_run=1") for a in argv):
        return argv
    return [*argv, "hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]


if __name__ == "__main__":
    msg = check_overrides(sys.argv[1:])
    if msg:
        print(msg, file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *dry_run_writes_nothing(rank_run_dir(sys.argv[1:], int(os.environ.get("RANK", "0"))))]
    main()
