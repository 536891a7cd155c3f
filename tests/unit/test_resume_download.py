"""Resuming ranks read their own copy of a remote checkpoint (orchestration.worker.private_copy).

Ray's shared per-node download let a second rank re-download over, then delete, the files the first was loading.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs
from ray.train import Checkpoint

from orchestration.worker import private_copy


def _remote_checkpoint(root: Path) -> Checkpoint:
    """A checkpoint on a file system that is not pyarrow's LocalFileSystem, so it must be downloaded."""
    src = root / "checkpoint-00000003" / "state"
    src.mkdir(parents=True)
    (src / "mp_rank_00_model_states.pt").write_bytes(b"PK" + bytes(range(256)) * 64)
    (root / "checkpoint-00000003" / "loop.json").write_text('{"step": 3}')
    fs = pyarrow.fs.SubTreeFileSystem(str(root), pyarrow.fs.LocalFileSystem())
    return Checkpoint(path="checkpoint-00000003", filesystem=fs)


def test_each_rank_reads_a_copy_no_other_rank_touches(tmp_path: Path) -> None:
    checkpoint = _remote_checkpoint(tmp_path / "bucket")
    want = (tmp_path / "bucket" / "checkpoint-00000003" / "state" / "mp_rank_00_model_states.pt").read_bytes()
    with private_copy(checkpoint, rank=0) as first:
        model = Path(first) / "state" / "mp_rank_00_model_states.pt"
        inode = model.stat().st_ino
        with private_copy(checkpoint, rank=1) as second:  # a rank of the same node resuming meanwhile
            assert Path(second) != Path(first)
            assert (Path(second) / "state" / "mp_rank_00_model_states.pt").read_bytes() == want
        # The other rank finished and cleaned up: this rank's files are still there, unchanged, not rewritten.
        assert model.stat().st_ino == inode and model.read_bytes() == want
        assert (Path(first) / "loop.json").read_text() == '{"step": 3}'
        assert not Path(second).exists()
    assert not Path(first).exists()  # deleted when this rank is done with it
    assert (tmp_path / "bucket" / "checkpoint-00000003" / "loop.json").exists()  # the source is never touched


def test_a_local_checkpoint_is_read_in_place(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-00000003").mkdir()
    (tmp_path / "checkpoint-00000003" / "loop.json").write_text("{}")
    checkpoint = Checkpoint.from_directory(str(tmp_path / "checkpoint-00000003"))
    with private_copy(checkpoint, rank=0) as path:
        assert Path(path) == tmp_path / "checkpoint-00000003"
    assert (tmp_path / "checkpoint-00000003" / "loop.json").exists()
