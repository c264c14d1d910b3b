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

from conftest import make_tiny_beir, make_tiny_bert, tiny_texts

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )


def test_torchrun_two_ranks_equals_single_process(tmp_path: Path):
    data = make_tiny_beir(tmp_path / "data" / "tiny")
    model = make_tiny_bert(tmp_path / "model", tiny_texts(data))
    common = [
        "run.py", "model=pretrained", f"model.checkpoint={model}", "data=beir", "data.name=tiny",
        f"paths.data_dir={tmp_path / 'data'}", "runtime.threads=1",
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
