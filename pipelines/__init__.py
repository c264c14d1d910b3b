"""dr-lab stages. One file per stage; each defines ``STAGE``. Heavy imports stay inside ``run``."""

from __future__ import annotations

import importlib

from pipelines.executor import STAGE_ORDER, Stage


def all_stages() -> dict[str, Stage]:
    """Every implemented stage, by name, in chain order."""
    out: dict[str, Stage] = {}
    for name in STAGE_ORDER:
        try:
            mod = importlib.import_module(f"pipelines.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"pipelines.{name}":
                continue  # not implemented yet
            raise
        out[name] = mod.STAGE
    return out
