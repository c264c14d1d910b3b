"""run.py under torchrun (2 CPU ranks, gloo): rank-aware executor end to end.

Every rank runs a ``distributed`` stage (the index stage shards corpus encoding),
rank 0 alone runs the others and writes manifests and the run directory, and the
result equals the single-process run: same stage keys, same metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_beir, make_tiny_bert, tiny_texts

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(tmp_path: Path):
    data = make_tiny_beir(tmp_path / "data" / "tiny")
    model = make_tiny_bert(tmp_path / "model", tiny_texts(data))
    common = [
        "run.py", "model=pretrained", f"model.checkpoint={model}", "data=beir", "data.name=tiny",
        f"paths.data_dir={tmp_path / 'data'}", "runtime.threads=1", "runtime.device=cpu",
    ]
    dist = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         *common, f"paths.output_dir={tmp_path / 'dist'}"],
        tmp_path,
    )
    assert dist.returncode == 0, dist.stdout[-3000:] + dist.stderr[-3000:]
    summaries = [l for l in dist.stdout.splitlines() if l.startswith("summary: ")]
    assert len(summaries) == 1, "only rank 0 prints the summary line"
    s_dist = json.loads(Path(summaries[0].split(" ", 1)[1]).read_text())
    assert s_dist["stages"]["index"]["status"] == "ran"
    assert len(list((tmp_path / "dist" / "runs").iterdir())) == 1, "only rank 0 writes a run directory"

    single = _run([sys.executable, *common, f"paths.output_dir={tmp_path / 'single'}"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    s_single = json.loads(Path(single.stdout.strip().splitlines()[-1].split(" ", 1)[1]).read_text())
    for stage in ("index", "eval"):
        assert s_dist["stages"][stage]["key"] == s_single["stages"][stage]["key"]
    for k, v in s_single["metrics"].items():
        assert abs(s_dist["metrics"][k] - v) < 1e-6, k


@pytest.mark.slow
def test_torchrun_dpr_chain_trains_on_two_ranks(tmp_path: Path):
    """bm25 (rank 0) -> retriever1 (both ranks, gathered in-batch negatives) -> index -> eval."""
    data = make_tiny_beir(tmp_path / "data" / "tiny")
    model = make_tiny_bert(tmp_path / "model", tiny_texts(data))
    res = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
         "run.py", "model=dpr", f"model.checkpoint={model}", "data=beir", "data.name=tiny", "data.train_split=train",
         f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}", "runtime.threads=1", "runtime.device=cpu",
         "pipeline.retriever1.max_steps=3", "pipeline.retriever1.batch_size=2", "pipeline.bm25.hits=10"],
        tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "on 2 rank(s)" in res.stdout + res.stderr
    summary = json.loads(Path(res.stdout.strip().splitlines()[-1].split(" ", 1)[1]).read_text())
    assert [summary["stages"][s]["status"] for s in ("bm25", "retriever1", "index", "eval")] == ["ran"] * 4
    ckpt = Path(summary["stages"]["retriever1"]["dir"]) / "checkpoint"
    assert (ckpt / "drlab_encoder.json").exists() and (ckpt / "query_encoder" / "config.json").exists()
    assert "test/ndcg@10" in summary["metrics"]
