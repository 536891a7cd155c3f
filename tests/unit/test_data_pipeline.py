"""The training stream and the evaluation reader on local shards: bad data, batches, determinism, resume."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tests import fixtures_data
from tests.fixtures_data import (
    caption_for,
    good_sample,
    tiny_config,
    truncate_tar_inside_member,
    write_dataset,
    write_shard,
)
from volta.data.batch import VoltaBatch
from volta.data.factory import build_eval_loader, build_train_loader
from volta.data.masking import IGNORE_INDEX
from volta.data.pipeline import SkipCounter, iter_shard_samples, shard_stream
from volta.data.shards import resolve_shards

tiny_tokenizer = fixtures_data.tiny_tokenizer  # a session fixture


def _jpeg(index: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (index * 20 % 256, 90, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def _bad_dataset(root: Path) -> tuple[list[str], dict[str, int]]:
    """Three shards: one with every kind of bad sample, one truncated, one clean; returns good keys, counts."""
    root.mkdir(parents=True, exist_ok=True)
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000), (1, 2, 3)).save(big, format="PNG")  # 1.2 Mpx, above the 1 Mpx limit
    bad = [
        good_sample(0),
        {"__key__": "corrupt_body", "jpg": _jpeg(1)[:300], "txt": b"a cut jpeg"},  # header fine, body cut
        {"__key__": "garbage", "jpg": b"this is not an image", "txt": b"garbage bytes"},
        {"__key__": "no_caption", "png": good_sample(1)["png"], "json": b"{}"},
        {"__key__": "empty_caption", "png": good_sample(2)["png"], "txt": b"   \n"},
        {"__key__": "bad_utf8", "png": good_sample(3)["png"], "txt": b"caf\xe9 \xff\xfe"},
        {"__key__": "huge", "png": big.getvalue(), "txt": b"a huge image"},
        {"__key__": "bad_json", "png": good_sample(4)["png"], "txt": b"fine", "json": b"{not json"},
        {"__key__": "no_image", "txt": b"a caption without picture", "json": b"{}"},
        good_sample(1),
        good_sample(2),
    ]
    write_shard(root / "00000.tar", bad)
    write_shard(root / "00001.tar", [good_sample(i) for i in range(3, 9)])
    # Cut inside the second file of the 5th sample (s00007): s00003..s00006 survive.
    truncate_tar_inside_member(root / "00001.tar", 4 * 3 + 1)
    write_shard(root / "00002.tar", [good_sample(i) for i in range(9, 14)])
    good = [f"s{i:05d}" for i in [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13]]
    expected = {
        "corrupt_image": 2,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_utf8": 1,
        "oversized_image": 1,
        "bad_json": 1,
        "missing_image": 1,
        "truncated_shard": 1,
    }
    return good, expected


def _sum_stats(batches: list[VoltaBatch]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for b in batches:
        total.update(b.stats)
    return {k: v for k, v in total.items() if v}


def test_bad_samples_are_skipped_counted_and_the_rest_delivered(tmp_path: Path, tiny_tokenizer: Any) -> None:
    good, expected = _bad_dataset(tmp_path)
    shards = resolve_shards(str(tmp_path))
    # Pick a seed whose epoch order reads the clean shard last, so every bad sample is met before the epoch ends.
    seed = next(
        s
        for s in range(100)
        if next(shard_stream(shards, seed=s, epoch=0, stream=2, num_streams=3)) == shards[2]
    )
    cfg = tiny_config(
        str(tmp_path),
        data={"samples_per_epoch": len(good), "max_image_pixels": 1_000_000},
        train={"seed": seed},
    )
    batches = list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=1, epoch=0))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == good  # each good sample exactly once, none of the bad ones
    assert _sum_stats(batches) == expected


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path: Path) -> None:
    write_shard(tmp_path / "t.tar", [good_sample(i) for i in range(6)])
    truncate_tar_inside_member(tmp_path / "t.tar", 3 * 3)  # inside the first file of the 4th sample
    counter = SkipCounter()
    keys = [s["__key__"] for s in iter_shard_samples(str(tmp_path / "t.tar"), counter)]
    assert keys == ["s00000", "s00001", "s00002"]  # the 3rd is complete (same files as the 2nd): kept
    assert counter.take()["truncated_shard"] == 1
    missing = SkipCounter()
    assert list(iter_shard_samples(str(tmp_path / "absent.tar"), missing)) == []
    assert missing.take()["unreadable_shard"] == 1


def test_batch_contents(tmp_path: Path, tiny_tokenizer: Any) -> None:
    write_dataset(tmp_path, 2, 4)
    # Two samples with identical image bytes must share an image id.
    twin = good_sample(100)
    write_shard(tmp_path / "00002.tar", [twin, {**twin, "__key__": "twin", "txt": b"the same picture again"}])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}))
    cfg = tiny_config(str(tmp_path), data={"samples_per_epoch": 8}, loss={"mlm": {"probability": 0.3}})
    batches = list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=1, epoch=0))
    assert len(batches) == 2
    b = batches[0]
    assert b.batch_size == 4 and b.views[0].images.shape == b.views[1].images.shape == (4, 3, 32, 32)
    assert b.views[0].images.dtype == torch.float32
    for view in b.views:
        ids, att, special = view.input_ids, view.attention_mask, view.special_tokens_mask
        mlm_ids, labels = view.mlm_input_ids, view.mlm_labels
        assert ids.shape == att.shape == special.shape == mlm_ids.shape == labels.shape == (4, 16)
        assert special.dtype == torch.bool
        assert bool(special[att == 0].all())  # padding counts as special
        assert bool((ids[:, 0] == tiny_tokenizer.bos_token_id).all()) and bool(special[:, 0].all())
        selected = labels != IGNORE_INDEX
        assert bool(selected.any(dim=1).all()) and not bool(selected[special].any())
        assert torch.equal(labels[selected], ids[selected])
        assert bool((mlm_ids[selected] == tiny_tokenizer.mask_token_id).any())
        assert torch.equal(mlm_ids[~selected], ids[~selected])
    assert b.image_ids.dtype == torch.int64 and len(set(b.image_ids.tolist())) == 4
    assert [x.position for x in batches] == [{"epoch": 0, "next_batch": 1}, {"epoch": 0, "next_batch": 2}]
    assert all(v == 0 for v in b.stats.values())
    moved = b.to("cpu")
    assert isinstance(moved, VoltaBatch) and moved.keys == b.keys
    assert all(torch.equal(v.mlm_labels, w.mlm_labels) for v, w in zip(moved.views, b.views, strict=True))
    # The twin shard: decode it through a reader over just that shard.
    cfg2 = tiny_config(
        str(tmp_path / "00002.tar"),
        data={"samples_per_epoch": 4},
        train={"micro_batch_size": 2, "global_batch_size": 2},
    )
    twins = next(iter(build_train_loader(cfg2, tiny_tokenizer, rank=0, world_size=1, epoch=0)))
    assert twins.image_ids[0] == twins.image_ids[1]


def _fingerprint(batches: list[VoltaBatch]) -> list[tuple[Any, ...]]:
    return [
        (
            b.keys,
            b.views[0].images.sum().item(),
            b.views[1].images.sum().item(),
            b.views[0].mlm_input_ids.tolist(),
            b.views[1].mlm_input_ids.tolist(),
        )
        for b in batches
    ]


def test_same_seed_same_batches_and_epochs_differ(tmp_path: Path, tiny_tokenizer: Any) -> None:
    write_dataset(tmp_path, 4, 6)
    cfg = tiny_config(str(tmp_path), data={"shuffle_buffer": 5})
    run = [list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=1, epoch=e)) for e in (0, 0, 1)]
    assert _fingerprint(run[0]) == _fingerprint(run[1])
    assert [b.keys for b in run[0]] != [b.keys for b in run[2]]
    assert sorted(k for b in run[0] for k in b.keys) == sorted(k for b in run[2] for k in b.keys)
    other_seed = tiny_config(str(tmp_path), data={"shuffle_buffer": 5}, train={"seed": 8})
    assert [
        b.keys for b in build_train_loader(other_seed, tiny_tokenizer, rank=0, world_size=1, epoch=0)
    ] != [b.keys for b in run[0]]


def test_resume_continues_exactly_without_a_buffer(tmp_path: Path, tiny_tokenizer: Any) -> None:
    # In-process here; tests/integration/test_data_s3.py resumes with 2 DataLoader workers (worker rotation).
    write_dataset(tmp_path, 3, 8)  # 24 samples, 6 batches of 4
    cfg = tiny_config(str(tmp_path))
    full = list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=1, epoch=2))
    assert len(full) == 6 and sorted(k for b in full for k in b.keys) == sorted(
        f"s{i:05d}" for i in range(24)
    )
    k = full[2].position["next_batch"]
    resumed = list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=1, epoch=2, start_batch=k))
    assert _fingerprint(resumed) == _fingerprint(full[k:])
    assert [b.position for b in resumed] == [b.position for b in full[k:]]


def test_resume_with_a_shuffle_buffer_stays_within_one_window(tmp_path: Path, tiny_tokenizer: Any) -> None:
    write_dataset(tmp_path, 2, 20)  # 40 samples, 10 batches, in-process
    buffer = 6
    cfg = tiny_config(str(tmp_path), data={"shuffle_buffer": buffer})
    full = list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=1, epoch=0))
    k = 4
    resumed = list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=1, epoch=0, start_batch=k))
    assert len(resumed) == len(full) - k
    rest = {key for b in full[k:] for key in b.keys}
    again = {key for b in resumed for key in b.keys}
    assert len(again) == len(rest)
    assert len(rest ^ again) <= 2 * buffer  # differs at most by one buffer window each way
    assert rest != again or buffer == 0


def test_eval_loader_reads_every_sample_once_in_order(tmp_path: Path, tiny_tokenizer: Any) -> None:
    keys = write_dataset(tmp_path, 3, 5)
    write_shard(
        tmp_path / "00003.tar",
        [good_sample(15, size=(80, 30)), {"__key__": "bad", "png": b"junk", "txt": b"broken"}],
    )
    loader = build_eval_loader(str(tmp_path), tiny_tokenizer, image_size=32, max_length=16, batch_size=4)
    batches = list(loader)
    assert [k for b in batches for k in b.keys] == [*keys, "s00015"]
    assert [b.batch_size for b in batches] == [4, 4, 4, 4]
    assert [k for b in list(loader) for k in b.keys] == [*keys, "s00015"]  # re-iterable, same order
    last = batches[-1]
    assert last.images.shape == (4, 3, 32, 32)
    assert last.orig_sizes[-1].tolist() == [80, 30]
    assert last.metas[-1]["boxes"][0]["bbox"] == [2, 2, 40, 15]
    assert last.captions[-1] == caption_for(15)
    # Offsets map tokens back to caption characters.
    caption, offsets, att = last.captions[-1], last.offsets[-1], last.attention_mask[-1]
    pieces = "".join(caption[s:e] for (s, e), a in zip(offsets.tolist(), att.tolist()) if a and e > s)
    assert pieces.replace(" ", "") == caption.replace(" ", "")[: len(pieces.replace(" ", ""))]
    assert loader.skipped["corrupt_image"] == 1  # type: ignore[attr-defined]
    capped = list(
        build_eval_loader(
            str(tmp_path), tiny_tokenizer, image_size=32, max_length=16, batch_size=4, max_samples=6
        )
    )
    assert [k for b in capped for k in b.keys] == keys[:6]
