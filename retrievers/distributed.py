"""torch.distributed helpers for in-batch negatives across ranks (see :mod:`retrievers.contrastive`)."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("drlab")


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` [n, ...] from every rank; this rank's slice keeps its autograd graph."""
    rank, world = dist_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, 0)


def all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum gradients over ranks in one flat all-reduce (every rank holds its part of d loss)."""
    rank, world = dist_info()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i : i + n].view_as(p.grad))
        i += n


def broadcast_params(module: nn.Module) -> None:
    """Make every rank start from rank 0's weights (e.g. a randomly initialised head)."""
    if dist_info()[1] > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
