"""Shard lists, dataset sizes and epoch lengths from local folders and patterns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_data import tiny_config, write_dataset
from volta.data.factory import batches_per_epoch, dataset_size, samples_per_epoch
from volta.data.pipeline import shard_stream
from volta.data.shards import DatasetSizeError, count_samples, resolve_shards


def test_folder_pattern_and_list_resolve_to_sorted_tar_paths(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", 3, 2)
    (tmp_path / "a" / "notes.txt").write_text("not a shard")
    write_dataset(tmp_path / "b", 2, 2)
    a = resolve_shards(str(tmp_path / "a"))
    assert [Path(u).name for u in a] == ["00000.tar", "00001.tar", "00002.tar"]
    assert resolve_shards(str(tmp_path / "a" / "{00001..00002}.tar")) == a[1:]
    both = resolve_shards([str(tmp_path / "a"), str(tmp_path / "b" / "00001.tar")])
    assert both == [*a, str(tmp_path / "b" / "00001.tar")]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        resolve_shards(str(tmp_path / "empty"))


def test_sizes_come_from_the_manifest_of_the_selected_shards(tmp_path: Path) -> None:
    write_dataset(tmp_path, 4, 3)
    (tmp_path / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 10 + i for i in range(4)}))
    assert count_samples(resolve_shards(str(tmp_path))) == 10 + 11 + 12 + 13
    assert count_samples(resolve_shards(str(tmp_path / "{00002..00003}.tar"))) == 12 + 13
    cfg = tiny_config(str(tmp_path))
    assert dataset_size(cfg.data.train_shards, cfg.storage) == 46


def test_missing_manifest_names_the_config_field(tmp_path: Path) -> None:
    write_dataset(tmp_path, 2, 3)
    (tmp_path / "sizes.json").unlink()
    cfg = tiny_config(str(tmp_path))
    with pytest.raises(DatasetSizeError, match="data.samples_per_epoch"):
        batches_per_epoch(cfg, 1)
    cfg = tiny_config(str(tmp_path), data={"samples_per_epoch": 40})
    assert samples_per_epoch(cfg) == 40
    assert batches_per_epoch(cfg, 1) == 10


def test_batches_per_epoch_is_steps_times_accumulation(tmp_path: Path) -> None:
    write_dataset(tmp_path, 4, 25)  # 100 samples
    cfg = tiny_config(
        str(tmp_path), train={"global_batch_size": 16, "micro_batch_size": 2}, ray={"num_workers": 2}
    )
    # 100 // 16 = 6 optimizer steps, 16 / (2 ranks x 2) = 4 micro-batches each.
    assert batches_per_epoch(cfg, 2) == 24
    assert batches_per_epoch(cfg, 1) == 48
    with pytest.raises(ValueError, match="divisible"):
        batches_per_epoch(cfg, 3)


def test_shard_streams_cover_each_shard_once_per_epoch() -> None:
    shards = [f"{i:05d}.tar" for i in range(10)]
    per_stream = []
    for g in range(4):
        it = shard_stream(shards, seed=1, epoch=3, stream=g, num_streams=4)
        per_stream.append([next(it) for _ in range(len(range(g, 10, 4)))])
    assert sorted(s for stream in per_stream for s in stream) == shards
    # Deterministic, and epochs differ in order.
    again = shard_stream(shards, seed=1, epoch=3, stream=0, num_streams=1)
    epoch3 = [next(again) for _ in range(10)]
    assert epoch3 == [
        next(shard_stream(shards, seed=1, epoch=3, stream=i, num_streams=10)) for i in range(10)
    ]
    nxt = shard_stream(shards, seed=1, epoch=4, stream=0, num_streams=1)
    assert [next(nxt) for _ in range(10)] != epoch3
    # A stream that runs past its epoch continues with the next epoch's order (resampling).
    assert [next(again) for _ in range(10)] == [
        next(shard_stream(shards, seed=1, epoch=4, stream=i, num_streams=10)) for i in range(10)
    ]
