"""Training utilities shared by every trainer: seeds and RNG states, atomic checkpoints,
brute-force dev evaluation, loss plots."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_states(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)



# =========================================================================== dev evaluation & plots


def brute_force_eval(
    encoder,
    doc_ids: list[str],
    doc_texts: list[str],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    *,
    metrics: Sequence[str] = ("ndcg@10", "recall@100"),
    depth: int = 100,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    doc_emb: np.ndarray | None = None,
) -> dict[str, float]:
    """Exact (brute-force) dense retrieval of ``queries`` over the documents, scored with ranx."""
    from retrievers.evaluation import evaluate

    if doc_emb is None:
        doc_emb = encoder.encode(doc_texts, "doc", batch_size=batch_size, device=device, progress=False)
    qids = list(queries)
    q_emb = encoder.encode([queries[q] for q in qids], "query", batch_size=batch_size, device=device, progress=False)
    with torch.inference_mode():
        s = encoder.score(torch.from_numpy(q_emb), torch.from_numpy(doc_emb))
        top = torch.topk(s, k=min(depth, s.shape[1]), dim=1)
    run = {
        q: {doc_ids[j]: float(v) for j, v in zip(top.indices[i].tolist(), top.values[i].tolist())}
        for i, q in enumerate(qids)
    }
    means, _ = evaluate({q: qrels[q] for q in qids if q in qrels}, run, list(metrics))
    return means


def plot_loss(history: list[dict[str, Any]], path: Path, title: str = "training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#4c72b0", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if evals:
        key = next(iter(evals[0]["eval"]))
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], "o-", color="#dd8452", label=f"dev {key}")
        ax2.set_ylabel(f"dev {key}")
        fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def adamw_linear(params, *, lr: float, weight_decay: float, warmup_ratio: float, total: int):
    """AdamW with linear warm-up (``warmup_ratio`` of ``total`` steps) then linear decay to 0."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(list(params), lr=float(lr), weight_decay=float(weight_decay))
    return opt, get_linear_schedule_with_warmup(opt, round(float(warmup_ratio) * total), max(1, total))
