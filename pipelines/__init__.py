"""dr-lab's runner: the executor, the run records and one thin file per stage (``pipelines/stages/``)."""

from __future__ import annotations

import importlib

from pipelines.executor import STAGE_ORDER, Stage


def all_stages() -> dict[str, Stage]:
    """Every implemented stage, by name, in chain order."""
    out: dict[str, Stage] = {}
    for name in STAGE_ORDER:
        try:
            mod = importlib.import_module(f"pipelines.stages.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"pipelines.stages.{name}":
                continue  # not implemented yet
            raise
        out[name] = mod.STAGE
    return out
