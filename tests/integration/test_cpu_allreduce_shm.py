"""DeepSpeed's CPU shared-memory communication op: switched off, it is neither loaded nor given buffers; left on,
its buffers leave no file in /dev/shm and the shared-memory all-reduce still works.

Two real gloo ranks initialise DeepSpeed's communication backend as ``deepspeed.initialize`` does (the CPU
accelerator builds its shared-memory op and gives each rank a 67 MB buffer in /dev/shm) after
``skip_cpu_shm_comm`` (what the worker does) or without it; ``unlink_cpu_allreduce_buffer`` then runs on both
ranks, as the worker does after ``deepspeed.initialize``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from orchestration.deepspeed_engine import CPU_ALLREDUCE_SHM
from tests.fixtures_tracking import free_port

SHM = Path("/dev/shm")
WORLD = 2


def _names(port: int) -> list[Path]:
    return [
        SHM / CPU_ALLREDUCE_SHM.format(uid=os.getuid(), addr="127.0.0.1", port=port, rank=r)
        for r in range(WORLD)
    ]


def _worker(rank: int, port: int, unlink: bool, out: dict, skip: bool = False) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_SIZE=str(WORLD), DS_ACCELERATOR="cpu",
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
    )  # fmt: skip
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    from orchestration.deepspeed_engine import skip_cpu_shm_comm, unlink_cpu_allreduce_buffer

    if skip:
        skip_cpu_shm_comm()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ds_comm.init_distributed(dist_backend="gloo", dist_init_required=False)
        loaded = ds_comm.comm.cdb.shm_comm_op is not None  # the backend made by init_distributed
        existed = [p.exists() for p in _names(port)]
        removed = unlink_cpu_allreduce_buffer(rank, WORLD) if unlink else None
        dist.barrier()
        left = [p.exists() for p in _names(port)]
        x = torch.arange(1000, dtype=torch.float32) * (rank + 1)
        ds_comm.inference_all_reduce(x)  # through the shared-memory buffers, names gone or not
        out[rank] = (loaded, existed, removed, left, x)
    finally:
        dist.destroy_process_group()


def _run(port: int, *, unlink: bool, skip: bool = False) -> dict:
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, unlink, out, skip), nprocs=WORLD, join=True)
    return dict(out)


@pytest.mark.timeout(240)
def test_skipped_op_is_not_loaded_makes_no_buffers_and_all_reduce_works() -> None:
    """What the worker does on CPU: the op is switched off before the backend starts."""
    port = free_port()
    out = _run(port, unlink=True, skip=True)
    expected = torch.arange(1000, dtype=torch.float32) * 3
    for rank in range(WORLD):
        loaded, existed, removed, _, x = out[rank]
        assert loaded is False
        assert existed == [False, False]
        assert removed is False  # nothing to remove
        torch.testing.assert_close(x, expected)  # through the process group


@pytest.mark.timeout(240)
def test_buffers_unlinked_and_all_reduce_still_works() -> None:
    port = free_port()
    out = _run(port, unlink=True)
    expected = torch.arange(1000, dtype=torch.float32) * 3  # ranks hold x and 2x
    for rank in range(WORLD):
        _, existed, removed, left, x = out[rank]
        assert existed == [True, True], "DeepSpeed's CPU op made no shared-memory buffers: nothing was tested"
        assert removed is True
        assert left == [False, False]
        torch.testing.assert_close(x, expected)
    assert not any(p.exists() for p in _names(port))  # the ranks have exited: nothing left behind


@pytest.mark.timeout(240)
def test_deepspeed_alone_leaves_the_buffers() -> None:
    """The leak the worker's call prevents: after DeepSpeed's own exit both names are still there."""
    port = free_port()
    try:
        _run(port, unlink=False)
        assert all(p.exists() for p in _names(port))
    finally:
        for p in _names(port):
            p.unlink(missing_ok=True)
