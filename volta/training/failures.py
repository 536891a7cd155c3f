"""Which failures retrying can fix, and the record a run leaves when it stops on one that it cannot.

Infrastructure failures (a worker or node lost, a preemption, a transient storage or network error) are retried
by the launcher from the last complete checkpoint. Deterministic ones would replay identically on every retry, so
the run stops at once: the worker that hit one writes ``FAILED.json`` into the run's storage folder and raises;
a restarted worker group that finds the record returns without training, and the driver prints the cause and
the last good checkpoint in one line and exits non-zero. Resubmitting the run clears the record.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import torch

from volta.config import ConfigError
from volta.errors import CheckpointRejected, DataError
from volta.run_storage import RunStorage
from volta.training.loop import NonFiniteLossError

__all__ = [
    "FAILED",
    "RETRIED",
    "deterministic_kind",
    "failure_line",
    "read_failure",
    "read_retried_failures",
    "record_failure",
    "record_retried_failure",
]

FAILED = "FAILED.json"
RETRIED = "failures"  # one record per rank that saw a failure the launcher retries: why each restart happened


def deterministic_kind(exc: BaseException) -> str | None:
    """A short name for failures that a retry would repeat (None for everything else, which is retried)."""
    if isinstance(exc, NonFiniteLossError):
        return "non-finite"
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    if isinstance(exc, (DataError, ConfigError)):
        return "invalid data or config"
    if isinstance(exc, CheckpointRejected):  # the restricted checkpoint loader refused a file
        return "checkpoint refused"
    return None


def _record(
    exc: BaseException, *, kind: str, rank: int, step: int, last_checkpoint: str | None
) -> dict[str, Any]:
    return {
        "kind": kind,
        "cause": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
        "rank": rank,
        "step": step,
        "last_checkpoint": last_checkpoint,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def record_failure(
    storage: RunStorage, exc: BaseException, *, kind: str, rank: int, step: int, last_checkpoint: str | None
) -> dict[str, Any]:
    """Write ``FAILED.json`` (best effort: a storage error here must not hide the original failure)."""
    record = _record(exc, kind=kind, rank=rank, step=step, last_checkpoint=last_checkpoint)
    # Best effort: a storage error here must not hide the original failure, which the worker re-raises next.
    with contextlib.suppress(Exception):
        storage.put_bytes(FAILED, json.dumps(record, indent=1).encode())
    return record


def record_retried_failure(
    storage: RunStorage, exc: BaseException, *, rank: int, step: int, last_checkpoint: str | None
) -> dict[str, Any]:
    """Add ``failures/<time>-rank<r>-<pid>.json`` for a failure the launcher retries (best effort, like
    :func:`record_failure`). One object per rank and attempt, so ranks failing together never overwrite each
    other. A rank killed outright (SIGKILL, the OOM killer) writes nothing; its peers record the broken
    collective that its death caused."""
    record = _record(exc, kind="retried", rank=rank, step=step, last_checkpoint=last_checkpoint)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    with contextlib.suppress(Exception):
        storage.put_bytes(f"{RETRIED}/{stamp}-rank{rank}-{os.getpid()}.json", json.dumps(record).encode())
    return record


def read_retried_failures(storage: RunStorage) -> list[dict[str, Any]]:
    """Every retried failure recorded for the run, oldest first."""
    out = []
    for rel in sorted(storage.list_files(RETRIED)):
        data = storage.get_bytes(f"{RETRIED}/{rel}")
        if data:
            out.append(json.loads(data))
    return out


def read_failure(storage: RunStorage) -> dict[str, Any] | None:
    """The run's failure record, or None."""
    data = storage.get_bytes(FAILED)
    return json.loads(data) if data else None


def failure_line(record: dict[str, Any]) -> str:
    """One line for people: the cause, where, and the checkpoint a fixed resubmission resumes from."""
    last = record.get("last_checkpoint") or "none (a resubmission starts from step 0)"
    return (
        f"run stopped ({record['kind']}, not retried) at step {record['step']} on rank {record['rank']}: "
        f"{record['cause']}; last good checkpoint: {last}"
    )
