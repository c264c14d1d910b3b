"""torch.distributed training on CPU (gloo, 2 processes) equals single-process training.

Two ranks each take half of a global batch; embeddings are all-gathered so in-batch
negatives span both ranks. The loss, the summed gradients (plain and GradCache) and
the weights after a few Trainer steps must equal the single-process ones on the same
global batch (tiny random BERT, dropout off).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_training import grads_of, tiny_data, tiny_encoder

from retrievers.contrastive import contrastive_step
from retrievers.distributed import all_reduce_grads
from retrievers.training import TrainArgs, Trainer

WORLD = 2
BATCH = 6  # global: 3 examples per rank, 3 documents each (positive + 2 BM25-style negatives)
ARGS = dict(batch_size=BATCH, max_steps=3, lr=1e-3, save_every=2, log_every=1, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_results(enc, rank: int, world: int) -> dict:
    """Loss and gradients of one contrastive step, plain and with GradCache (chunks of 2)."""
    batch = tiny_data(n_negatives=2).epoch_batches(0, seed=0, batch_size=BATCH)[0]
    local = batch.shard(rank, world)
    params = [p for p in enc.parameters() if p.requires_grad]
    out = {}
    for gc in (False, True):
        enc.zero_grad(set_to_none=True)
        loss = contrastive_step(enc, batch, local, device=torch.device("cpu"), grad_cache=gc, chunk_size=2)
        all_reduce_grads(params)
        out[gc] = (loss, grads_of(enc))
    return out


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        root = Path(tmp)
        enc = tiny_encoder(root / f"rank{rank}", shared=False)  # same seed: same weights on both ranks
        enc.train()
        steps = _step_results(enc, rank, world)
        trained = tiny_encoder(root / f"rank{rank}", shared=False)
        result = Trainer(trained, tiny_data(n_negatives=2), TrainArgs(**ARGS), root / "work-dist").train()
        torch.save(
            {"steps": steps, "trained": trained.state_dict(), "log": result.log}, root / f"rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], tmp


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("grad_cache", [False, True])
def test_two_ranks_loss_and_gradients_equal_single_process(two_ranks, tmp_path, grad_cache):
    ranks, _ = two_ranks
    enc = tiny_encoder(tmp_path, shared=False)
    enc.train()
    single = _step_results(enc, 0, 1)
    loss1, grads1 = single[grad_cache]
    for r in ranks:
        loss, grads = r["steps"][grad_cache]
        assert loss == pytest.approx(loss1, abs=1e-5)
        assert len(grads) == len(grads1) > 10
        assert _max_diff(grads, grads1) < 1e-5


def test_two_ranks_training_equals_single_process(two_ranks, tmp_path):
    ranks, tmp = two_ranks
    single = tiny_encoder(tmp_path, shared=False)
    log1 = Trainer(single, tiny_data(n_negatives=2), TrainArgs(**ARGS), tmp_path / "work").train().log
    # both ranks hold the same weights, equal to single-process training
    assert _max_diff(ranks[0]["trained"], ranks[1]["trained"]) == 0.0
    # Weights equal single-process training, except the passage tower's last LayerNorm bias: it adds
    # the same vector to every passage, shifting each query's scores by a constant the softmax ignores,
    # so its gradient is 0 up to rounding noise, which Adam divides by its own magnitude into steps of
    # up to lr. For it, assert only what Adam guarantees (|change| <= lr per step).
    trained, ref = ranks[0]["trained"], single.state_dict()
    invariant = "doc_model.encoder.layer.1.output.LayerNorm.bias"
    assert _max_diff({k: v for k, v in trained.items() if k != invariant},
                     {k: v for k, v in ref.items() if k != invariant}) < 1e-5
    assert (trained[invariant] - ref[invariant]).abs().max() <= ARGS["lr"] * ARGS["max_steps"]
    assert [r["loss"] for r in ranks[0]["log"]] == pytest.approx([r["loss"] for r in log1], abs=1e-5)
    assert [r["grad_norm"] for r in ranks[0]["log"]] == pytest.approx([r["grad_norm"] for r in log1], rel=1e-5)
    # only rank 0 wrote the checkpoint and the log
    assert (tmp / "work-dist" / "trainer_state.pt").exists()
    assert len((tmp / "work-dist" / "train_log.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_torchrun_runs_the_stage_on_two_ranks(tmp_path):
    """``torchrun --nproc_per_node 2 run.py ... stage=retriever1`` trains once and writes once (rank 0)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, make_tiny_beir
    from test_training import _stage_overrides

    make_tiny_beir(tmp_path / "data" / "tiny")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "run.py"),
        *_stage_overrides(tmp_path, "stage=retriever1", "pipeline.retriever1.max_steps=3", "runtime.device=cpu"),
        f"paths.output_dir={tmp_path / 'outputs'}", f"paths.data_dir={tmp_path / 'data'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (manifest,) = (tmp_path / "outputs" / "cache" / "retriever1").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["metrics"]["steps"] == 3
    stats = json.loads((manifest.parent / "train_stats.json").read_text())
    assert stats["world_size"] == 2
    assert proc.stdout.count("summary: ") == 1  # only rank 0 reports


def test_auto_device_falls_back_to_cpu_with_more_local_ranks_than_gpus(monkeypatch, caplog):
    """torchrun --nproc_per_node 2 on a 1-GPU machine: 'auto' must not hand rank 1 a GPU that does
    not exist (seen on a lent H100: 'invalid device ordinal'); it trains on the CPU, every rank alike."""
    from retrievers.encoder import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with caplog.at_level("WARNING", logger="drlab"):
        assert resolve_device("auto").type == "cpu"
    assert "2 local ranks but 1 GPU" in caplog.text
    assert resolve_device("cuda:0").type == "cuda"  # an explicit device is taken as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
