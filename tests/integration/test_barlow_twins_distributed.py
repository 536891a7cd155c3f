"""Barlow Twins on 2 gloo processes with B/2 rows each equals 1 process with B rows (values and gradients)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from volta.dist import differentiable_all_reduce_sum
from volta.losses.barlow_twins import barlow_twins_loss

BATCH, DIM_IN, DIM = 8, 5, 6


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(BATCH, DIM_IN, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(BATCH, DIM_IN, generator=gen, dtype=torch.float64)
    weight = torch.randn(DIM_IN, DIM, generator=gen, dtype=torch.float64)
    return x1, x2, weight


def _loss(x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, all_reduce=None) -> torch.Tensor:
    return barlow_twins_loss(
        torch.tanh(x1 @ weight), torch.tanh(x2 @ weight), lambd=0.05, all_reduce=all_reduce
    )


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x1, x2, weight = _inputs()
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        x1, x2 = x1[rows].clone().requires_grad_(True), x2[rows].clone().requires_grad_(True)
        weight = weight.clone().requires_grad_(True)
        loss = _loss(x1, x2, weight, differentiable_all_reduce_sum)
        loss.backward()
        assert weight.grad is not None
        grad_w = weight.grad.clone()
        dist.all_reduce(grad_w)  # data-parallel gradient averaging, as DDP / DeepSpeed do
        out[rank] = (float(loss), (grad_w / world), x1.grad, x2.grad)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process() -> None:
    x1, x2, weight = _inputs()
    x1, x2, weight = (t.clone().requires_grad_(True) for t in (x1, x2, weight))
    loss = _loss(x1, x2, weight)
    loss.backward()

    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        results = dict(out)
    assert x1.grad is not None and x2.grad is not None
    for rank in range(world):
        rank_loss, grad_w, g1, g2 = results[rank]
        assert abs(rank_loss - float(loss.detach())) < 1e-12  # every rank reports the global loss
        torch.testing.assert_close(grad_w, weight.grad, rtol=1e-10, atol=1e-12)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        # a rank's input gradient is world x the single-process one; averaging over ranks divides it again
        torch.testing.assert_close(g1 / world, x1.grad[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g2 / world, x2.grad[rows], rtol=1e-10, atol=1e-12)
