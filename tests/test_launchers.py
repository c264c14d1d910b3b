"""Sweeps through Hydra's submitit launcher: a 2-job sweep as local submitit jobs shares one stage cache
(the stage both jobs need is computed once), and the SLURM launcher config composes with one task per
GPU and the site's settings from ``cluster`` (conf/local/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, REPO, make_tiny_beir, make_tiny_bert, tiny_texts

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is a dependency")


@pytest.mark.slow
def test_a_sweep_of_submitit_local_jobs_shares_the_stage_cache(tmp_path):
    data = make_tiny_beir(tmp_path / "data" / "tiny")
    bert = make_tiny_bert(tmp_path / "bert", tiny_texts(data))
    out = tmp_path / "outputs"
    cmd = [sys.executable, str(REPO / "run.py"), "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           "model=pretrained", f"model.checkpoint={bert}", "model.encoder.doc_max_len=32", "data=beir",
           "data.name=tiny", "pipeline.eval.depth=10,20", f"paths.output_dir={out}",
           f"paths.data_dir={tmp_path / 'data'}", "runtime.threads=1", "runtime.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("multiruns/*/*/summary.json"))]
    assert len(summaries) == 2, list(out.rglob("summary.json"))
    index = sorted(s["stages"]["index"]["status"] for s in summaries)
    assert index == ["cached", "ran"], f"the shared index stage runs once: {index}"
    assert len({s["stages"]["index"]["key"] for s in summaries}) == 1
    assert len({s["stages"]["eval"]["key"] for s in summaries}) == 2
    assert [d.name for d in (out / "cache" / "index").iterdir()] == [summaries[0]["stages"]["index"]["key"]]
    assert list(out.glob("multiruns/*/.submitit/*/*_log.out")), "submitit wrote each job's log"


def test_the_slurm_launcher_runs_one_task_per_gpu_with_the_sites_settings(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "cluster.partition=gpu", "cluster.gpus_per_node=8",
                                 "cluster.nodes=4", f"paths.output_dir={tmp_path}"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    cfg.hydra.runtime.output_dir = str(tmp_path)  # what Hydra sets at launch
    assert OmegaConf.select(cfg, "hydra.launcher.tasks_per_node") == 8 == OmegaConf.select(cfg, "hydra.launcher.gpus_per_node")
    assert OmegaConf.select(cfg, "hydra.launcher.partition") == "gpu"
    assert OmegaConf.select(cfg, "hydra.launcher.nodes") == 4


def test_inside_a_multi_task_submitit_job_each_task_gets_torchruns_variables():
    """The export writes os.environ directly (not through monkeypatch, whose undo would put the exported
    WORLD_SIZE back and make every later run in this process wait for 8 ranks): restore it by hand."""
    from pipelines.runner import export_submitit_ranks

    saved = dict(os.environ)
    try:
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        os.environ.update({"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
                           "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu[01-02]"})
        export_submitit_ranks()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
        assert os.environ["MASTER_ADDR"] == "gpu01" and int(os.environ["MASTER_PORT"]) > 0
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):  # a plain run is left alone
            os.environ.pop(k)
        export_submitit_ranks()
        assert "WORLD_SIZE" not in os.environ
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == saved.get("WORLD_SIZE")


def test_launcher_configs_are_documented():
    text = (CONF_DIR / "hydra" / "launcher" / "slurm.yaml").read_text()
    assert "tasks_per_node: ${cluster.gpus_per_node}" in text
    assert Path(REPO / "README.md").read_text().count("hydra/launcher=slurm") >= 1
