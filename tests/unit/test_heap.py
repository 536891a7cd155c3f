"""volta.training.heap: free heap pages go back to the OS; the run's step hook trims every heap_trim_every steps."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import volta.training.run as run_module
from tests.fixtures_data import tiny_config
from volta.dist import Collectives
from volta.training.heap import release_free_heap
from volta.training.loop import LoopSettings, LoopState
from volta.training.run import Run

pytestmark = pytest.mark.unit


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_free_heap_pages_are_returned() -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 96 << 10, 3000  # 96 KiB blocks (under glibc's mmap threshold: heap), ~280 MiB in all
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        ctypes.memset(b, 1, size)  # touch every page: resident
    for b in blocks[:-1]:
        libc.free(b)  # the last one stays: the freed space is inside the heap, not at its top
    before = _resident_bytes()
    assert release_free_heap() is True
    after = _resident_bytes()
    libc.free(blocks[-1])
    assert before - after > 0.7 * size * (count - 1), (before, after)


def test_the_step_hook_trims_every_heap_trim_every_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(run_module, "release_free_heap", counting)

    def hooks(every: int | None) -> Any:
        config = tiny_config(str(tmp_path), train={"heap_trim_every": every})
        run = Run(config, 1, 2, torch.device("cpu"), None, None, None, None,  # type: ignore[arg-type]
                  LoopSettings(total_steps=20, micro_per_epoch=5, grad_accum=1, global_batch_size=4),
                  Collectives.for_world(1), tmp_path)  # fmt: skip
        return run.hooks(checkpoint=lambda s, m: None, report=lambda s, m: None)

    h = hooks(8)
    for step in range(1, 21):
        h.on_step(LoopState(step=step), {})
    assert len(calls) == 2  # steps 8 and 16
    calls.clear()
    h = hooks(None)
    for step in range(1, 21):
        h.on_step(LoopState(step=step), {})
    assert calls == []
