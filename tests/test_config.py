"""Every config in conf/ composes and resolves; override typos are caught with a useful message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, REPO, compose
from omegaconf import OmegaConf

from pipelines.executor import STAGE_ORDER, chain_of
from retrievers.data import expected_files


def _names(group: str) -> list[str]:
    names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert names, f"conf/{group}/ has no yaml files"
    return names


def _resolve(cfg) -> dict:
    out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize("name", _names("model"))
def test_model_composes_and_chain_follows_stage_order(name, tmp_path):
    cfg = compose([f"model={name}"], tmp_path)
    resolved = _resolve(cfg)
    chain = list(resolved["model"]["chain"])
    assert chain, f"model {name} has an empty chain"
    unknown = [s for s in chain if s not in STAGE_ORDER]
    assert not unknown, f"model {name}: unknown stages {unknown}"
    positions = [STAGE_ORDER.index(s) for s in chain]
    assert positions == sorted(set(positions)), f"model {name}: chain {chain} not in STAGE_ORDER {STAGE_ORDER}"
    assert chain_of(cfg) == chain
    assert isinstance(resolved["model"]["name"], str) and resolved["model"]["name"]


@pytest.mark.parametrize("name", _names("data"))
def test_data_composes_and_resolves(name, tmp_path):
    overrides = [f"data={name}"] + (["data.name=some-beir-set"] if name == "beir" else [])
    cfg = compose(overrides, tmp_path, data_dir=tmp_path / "datasets")
    resolved = _resolve(cfg)
    data = resolved["data"]
    assert data["format"] in {"beir", "msmarco", "dpr", "sts"}
    assert data["eval_split"]
    # The dataset lives in <paths.data_dir>/<name>/ (STS sets: <paths.data_dir>/sts/<set>/), whatever the machine.
    assert data["path"] == str(tmp_path / "datasets" / ("sts" if data["format"] == "sts" else data["name"]))
    splits = [s for s in (data["eval_split"], data.get("train_split")) if s]
    files = expected_files(data, splits)
    assert files and all(Path(f).is_relative_to(data["path"]) for f in files)


def test_beir_data_needs_a_name(tmp_path):
    cfg = compose(["data=beir"], tmp_path)
    with pytest.raises(Exception, match="name"):
        OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("name", _names("index"))
def test_index_composes_and_resolves(name, tmp_path):
    resolved = _resolve(compose([f"index={name}"], tmp_path))
    assert resolved["index"]["name"] == name
    assert resolved["index"]["factory"]


@pytest.mark.parametrize("name", _names("experiment"))
def test_experiment_composes_and_resolves(name, tmp_path):
    # config.yaml lists `experiment: null` in its defaults, so the group is selected with
    # `experiment=<name>`; `+experiment=<name>` (as its comment says) fails in Hydra with
    # "Multiple values for experiment".
    cfg = compose([f"experiment={name}"], tmp_path)
    resolved = _resolve(cfg)
    assert chain_of(cfg) == list(resolved["model"]["chain"])
    # An experiment is a `# @package _global_` file: it must not leave an `experiment` node.
    assert "experiment" not in resolved


def test_experiment_sets_its_values(tmp_path):
    base = _resolve(compose(["pipeline.bm25.fields=flat"], tmp_path))
    multi = _resolve(compose(["experiment=bm25-beir-multifield"], tmp_path))
    assert base["pipeline"]["bm25"]["fields"] == "flat"
    assert multi["pipeline"]["bm25"]["fields"] == "multifield"
    assert multi["model"]["name"] == "bm25"


@pytest.mark.parametrize("name", _names("debug"))
def test_debug_composes_and_resolves(name, tmp_path):
    base = _resolve(compose([], tmp_path))
    resolved = _resolve(compose([f"debug={name}"], tmp_path))
    assert "debug" not in resolved  # @package _global_
    assert resolved != base, f"debug={name} changes nothing"


def test_debug_tiny_is_small(tmp_path):
    resolved = _resolve(compose(["debug=tiny"], tmp_path))
    assert resolved["pipeline"]["bm25"]["hits"] <= 100
    assert resolved["runtime"]["threads"] == 1


def test_data_dir_from_env(monkeypatch, tmp_path):
    """paths.data_dir comes from DRLAB_DATA_DIR when set, else <repo>/data."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def data_path() -> str:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=["data=scifact"])
        return OmegaConf.to_container(cfg, resolve=True)["data"]["path"]

    monkeypatch.setenv("DRLAB_DATA_DIR", str(tmp_path / "elsewhere"))
    assert data_path() == str(tmp_path / "elsewhere" / "scifact")
    monkeypatch.delenv("DRLAB_DATA_DIR")
    assert data_path() == str(REPO / "data" / "scifact")


def test_defaults_are_the_documented_ones(tmp_path):
    resolved = _resolve(compose([], tmp_path))
    assert resolved["model"]["name"] == "bm25"
    assert resolved["data"]["name"] == "scifact"
    assert resolved["stage"] == "all" and resolved["force"] == [] and resolved["dry_run"] is False
    assert resolved["paths"]["root_dir"] == str(REPO)


# --------------------------------------------------------------------------- check_overrides


def test_check_overrides_unknown_key_lists_valid_keys():
    import run

    msg = run.check_overrides(["model=bm25", "pipeline.bm25.k3=1"])
    assert msg is not None
    assert "k3" in msg and "does not exist" in msg
    assert "k1" in msg and "remove_query" in msg  # the valid keys are listed
    assert "Did you mean 'pipeline.bm25.k1'" in msg


def test_check_overrides_unknown_intermediate_node():
    import run

    msg = run.check_overrides(["pipeline.bmm25.k1=1.2"])
    assert msg is not None
    assert "pipeline.bmm25.k1" in msg and "does not exist" in msg
    assert "Did you mean 'pipeline.bm25'" in msg
    assert "eval" in msg  # valid keys under pipeline


@pytest.mark.parametrize(
    "argv",
    [
        ["pipeline.bm25.k1=1.2"],
        ["model=bm25", "data=scifact", "pipeline.bm25.b=0.7", "stage=eval"],
        ["model=bm25"],  # group choices are not config keys
        ["data=beir", "data.name=trec-covid"],
        ["+pipeline.bm25.k3=1"],  # adding a key on purpose
        ["-m", "pipeline.bm25.k1=0.8,0.9"],
        ["runtime.threads=4", "hydra.job.chdir=true"],
    ],
)
def test_check_overrides_accepts_valid(argv):
    import run

    assert run.check_overrides(argv) is None


def test_check_overrides_uses_group_choice():
    """A key that only exists under another group choice is judged against that choice."""
    import run

    assert run.check_overrides(["data=beir", "data.name=x", "data.url=null"]) is None
    msg = run.check_overrides(["data=scifact", "data.nmae=x"])
    assert msg is not None and "Did you mean 'data.name'" in msg


def test_cli_rejects_unknown_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "pipeline.bm25.k3=1", f"paths.output_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "pipeline.bm25.k3" in proc.stderr and "does not exist" in proc.stderr
    assert not any(tmp_path.iterdir()), "a rejected command must not create outputs"
