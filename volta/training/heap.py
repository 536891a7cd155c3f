"""Give the C heap's free pages back to the operating system between training steps (glibc ``malloc_trim``).

A CPU training step allocates and frees gigabytes of tensors whose sizes change from step to step (caption
lengths). With glibc's malloc serving them from the heap, the freed space fragments and a worker's resident
memory grows step after step; serving every allocation over 1 MiB by ``mmap`` instead keeps it flat but pays a
page fault per page of every large tensor on every use (measured: 37-41 % of the CPU time in the kernel). Heap
allocation plus a ``malloc_trim(0)`` every few steps keeps both: the heap's pages are reused within a step and
the free ones are returned at the trim (docs/benchmarks.md, "Demo time").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim  # glibc only (musl, macOS: absent)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


def release_free_heap() -> bool:
    """Return the free pages of every malloc arena to the OS; False where the C library has no ``malloc_trim``."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
