"""The run's storage folder: manifests, complete/incomplete checkpoints, failure records (local storage; the S3
path runs in tests/integration/test_faults.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from volta.config import ConfigError
from volta.errors import CheckpointRejected, DataError
from volta.run_storage import RunStorage, checkpoint_step, verify_checkpoint_dir, write_manifest
from volta.training.failures import (
    deterministic_kind,
    failure_line,
    read_failure,
    read_retried_failures,
    record_failure,
    record_retried_failure,
)
from volta.training.loop import NonFiniteLossError

pytestmark = pytest.mark.unit


def _rank_part(root: Path, name: str, rank: int, world: int, step: int) -> Path:
    part = root / f"part-{name}-{rank}"
    (part / "state").mkdir(parents=True)
    (part / "state" / f"shard-{rank}.pt").write_bytes(bytes([rank]) * (100 + rank))
    write_manifest(part, rank=rank, world_size=world, step=step)
    return part


def test_a_checkpoint_is_complete_only_with_every_rank_and_every_file(tmp_path: Path) -> None:
    storage = RunStorage.for_run(str(tmp_path / "store"), "run")
    for step, ranks in ((3, (0, 1)), (6, (0, 1)), (9, (0,))):  # 9: rank 1 died before its upload
        name = f"checkpoint-{step:08d}"
        for rank in ranks:
            storage.put_dir(name, _rank_part(tmp_path, name, rank, 2, step))
    assert storage.checkpoint_names() == ["checkpoint-00000003", "checkpoint-00000006", "checkpoint-00000009"]
    assert storage.checkpoint_problem("checkpoint-00000009") == "manifests of ranks [0] of 2"
    assert storage.newest_complete_checkpoint() == ("checkpoint-00000006", ["checkpoint-00000009"])
    assert storage.newest_complete_checkpoint(after=6) == (None, ["checkpoint-00000009"])
    # A file of the manifest missing or cut short: incomplete too.
    (Path(storage.url("checkpoint-00000006")) / "state" / "shard-1.pt").write_bytes(b"short")
    assert "shard-1.pt: missing or wrong size" in (storage.checkpoint_problem("checkpoint-00000006") or "")
    storage.delete("checkpoint-00000009")
    assert checkpoint_step(storage.checkpoint_names()[-1]) == 6


def test_downloaded_files_are_checked_against_their_digests(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    for rank in (0, 1):
        part = _rank_part(tmp_path, "x", rank, 2, 3)
        for p in part.rglob("*"):
            if p.is_file():
                target = folder / p.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(p.read_bytes())
    assert verify_checkpoint_dir(folder) is None
    shard = folder / "state" / "shard-0.pt"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    assert verify_checkpoint_dir(folder) == "state/shard-0.pt: sha256 differs from manifest-rank-0.json"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (NonFiniteLossError("diverged", step=5), "non-finite"),
        (torch.OutOfMemoryError("CUDA out of memory"), "out of memory"),
        (DataError("4 shards in a row gave no usable sample"), "invalid data or config"),
        (ConfigError("model.fusion_depth: too deep"), "invalid data or config"),
        (CheckpointRejected("checkpoint x: refused"), "checkpoint refused"),
        (ConnectionResetError("peer reset"), None),  # infrastructure: retried
        (RuntimeError("NCCL watchdog timeout"), None),
    ],
)
def test_which_failures_are_deterministic(error: BaseException, kind: str | None) -> None:
    assert deterministic_kind(error) == kind


def test_failure_record_round_trip_and_one_line(tmp_path: Path) -> None:
    storage = RunStorage.for_run(str(tmp_path), "run")
    assert read_failure(storage) is None
    record_failure(
        storage,
        NonFiniteLossError("non-finite loss or gradients in 2 consecutive steps\nmore detail", step=5),
        kind="non-finite",
        rank=1,
        step=5,
        last_checkpoint=storage.url("checkpoint-00000003"),
    )
    record = read_failure(storage)
    assert record is not None and record["rank"] == 1 and "\n" not in record["cause"]
    line = failure_line(record)
    assert "\n" not in line and "not retried" in line and line.endswith("checkpoint-00000003")
    assert json.loads((tmp_path / "run" / "FAILED.json").read_text())["kind"] == "non-finite"


def test_retried_failures_are_kept_one_per_rank_and_read_oldest_first(tmp_path: Path) -> None:
    storage = RunStorage.for_run(str(tmp_path), "run")
    assert read_retried_failures(storage) == []
    # Two ranks of one attempt fail together (the same second, the same pid on one machine in this test):
    # neither record may replace the other.
    record_retried_failure(
        storage, ConnectionResetError("gloo read error\nstack"), rank=0, step=4, last_checkpoint=None
    )
    record_retried_failure(storage, RuntimeError("worker lost"), rank=1, step=4, last_checkpoint="ckpt-3")
    records = read_retried_failures(storage)
    assert [r["rank"] for r in records] == [0, 1]
    assert records[0]["cause"] == "ConnectionResetError: gloo read error" and records[1]["kind"] == "retried"
    assert read_failure(storage) is None  # a retried failure never stops the run
