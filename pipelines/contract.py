"""The stage contract: what a stage declares (:class:`Stage`) and what it sees while it runs (:class:`Context`).

:mod:`pipelines.executor` plans and runs stages against this contract and re-exports it, so a stage file
imports ``Context, Stage`` from either module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from pipelines import keys as K
from pipelines.manifest import problems
from retrievers.errors import ConfigError

#: Canonical order of every stage dr-lab knows. A family's chain is a sub-sequence.
STAGE_ORDER = ("bm25", "expand", "pretrain", "retriever1", "mine", "retriever2", "rerank", "distill", "index", "eval")
#: stages that write an encoder ``checkpoint/``, in chain order
CHECKPOINT_STAGES = ("pretrain", "retriever1", "retriever2", "distill")

Reads = "tuple[str, ...] | Callable[[DictConfig], tuple[str, ...]]"
Uses = "tuple[str, ...] | Callable[[DictConfig, list[str]], tuple[str, ...]]"


#: config nodes every stage is shown but no key hashes: how it runs and whether it may run
UNHASHED_VIEWS = ("runtime", "gates")


@dataclass(frozen=True)
class Stage:
    """One step of a chain. ``run`` gets a :class:`Context` and returns metrics.

    ``reads``: the config nodes the stage uses (it is shown only these, plus :data:`UNHASHED_VIEWS`), or a
    function ``(cfg, before) -> nodes``. ``uses``: the earlier stages whose artifacts it
    consumes, or a function ``(cfg, before) -> names`` where ``before`` lists the enabled
    stages ahead of it in the chain; a static tuple means "those of these in ``before``".
    Both enter the key; nothing else does.
    """

    name: str
    version: str
    reads: Any  # Reads
    run: Callable[["Context"], dict[str, float]]
    uses: Any = ()  # Uses
    #: under torchrun: True = every rank runs ``run`` (it shards its own work);
    #: False = rank 0 runs it while the other ranks wait
    distributed: bool = False
    #: the kinds of data it runs on (:func:`task_of`); on other data it is skipped ("n/a" in the plan)
    tasks: tuple[str, ...] = ("retrieval",)

    def reads_for(self, cfg: DictConfig, before: list[str]) -> tuple[str, ...]:
        return tuple(self.reads(cfg, before) if callable(self.reads) else self.reads)

    def uses_for(self, cfg: DictConfig, before: list[str]) -> tuple[str, ...]:
        if callable(self.uses):
            used = tuple(self.uses(cfg, before))
            wrong = [u for u in used if u not in before]
            if wrong:
                raise ConfigError(f"stage '{self.name}' uses {wrong}, which are not enabled before it in model.chain")
            return used
        return tuple(u for u in self.uses if u in before)


def newest_checkpoint(before: list[str]) -> tuple[str, ...]:
    """The last stage in ``before`` that writes an encoder checkpoint, as a 0- or 1-tuple."""
    ck = [s for s in before if s in CHECKPOINT_STAGES]
    return (ck[-1],) if ck else ()


@dataclass
class Context:
    """What a running stage may see: its own config reads, runtime knobs, its dirs."""

    stage: str
    key: str
    cfg: DictConfig  # only the declared reads (+ runtime, gates)
    out: Path  # <key>.partial/ : write artifacts here
    work: Path  # <key>.work/ : checkpoints that survive a kill
    upstream: dict[str, Path]  # finished dirs of the stages it uses, by name
    inputs: dict[str, Any] = field(default_factory=dict)  # the hashed reads (data fingerprinted)

    @property
    def runtime(self) -> DictConfig:
        return self.cfg.runtime

    def get(self, dotted: str) -> Any:
        """A read config node as plain Python (dicts, lists, scalars), resolved."""
        return K.select(self.cfg, dotted)

    def upstream_metrics(self, name: str) -> dict[str, Any]:
        """The metrics a used upstream stage recorded in its manifest."""
        return json.loads((self.upstream[name] / "manifest.json").read_text()).get("metrics", {})

    def checkpoint(self) -> Path | None:
        """The used upstream stage's encoder ``checkpoint/`` (newest in the chain), or None."""
        for name in reversed(CHECKPOINT_STAGES):
            if name in self.upstream:
                return self.upstream[name] / "checkpoint"
        return None

    def sibling_with(self, marker: str, value: str) -> Path | None:
        """A finished, intact dir of this stage under another key whose ``marker`` file holds ``value``: the
        costly part of its work depends on less than the whole key and is shared (the index stage's vectors
        across index types, the expand stage's generations across query builds). Never a damaged one."""
        for d in sorted(self.out.parent.iterdir()):
            if d == self.out or not (d / "manifest.json").exists() or not (d / marker).exists():
                continue
            if (d / marker).read_text().strip() == value and not problems(d):
                return d
        return None



def task_of(cfg: DictConfig) -> str:
    """``sts`` for sentence-pair data (``data.format: sts``), else ``retrieval``."""
    return "sts" if OmegaConf.select(cfg, "data.format") == "sts" else "retrieval"
