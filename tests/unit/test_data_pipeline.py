"""The training stream and the evaluation reader on local shards: bad data, batches, determinism, resume."""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests import fixtures_data
from tests.fixtures_data import (
    caption_for,
    corrupt_body_sample,
    good_sample,
    tiny_config,
    truncate_tar_inside_member,
    write_dataset,
    write_shard,
)
from volta.config import VoltaConfig
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

    def keys(name: str) -> list[str]:
        return [s["__key__"] for s in iter_shard_samples(str(tmp_path / name), counter)]

    assert keys("t.tar") == ["s00000", "s00001", "s00002"]  # the 3rd is whole (the cut is in the 4th): kept
    assert counter.take()["truncated_shard"] == 1
    # Complete samples are kept even when nothing before them has the same files: the shard's first sample, and
    # one without the optional JSON.
    no_json = {k: v for k, v in good_sample(1).items() if k != "json"}
    write_shard(tmp_path / "u.tar", [good_sample(0), no_json, good_sample(2)])
    truncate_tar_inside_member(tmp_path / "u.tar", 3 + 2)  # inside the first file of the 3rd sample
    assert keys("u.tar") == ["s00000", "s00001"]
    write_shard(tmp_path / "v.tar", [good_sample(0), good_sample(1)])
    truncate_tar_inside_member(tmp_path / "v.tar", 3)
    assert keys("v.tar") == ["s00000"]
    # A cut inside a sample's second file drops only that sample.
    write_shard(tmp_path / "w.tar", [good_sample(0), good_sample(1)])
    truncate_tar_inside_member(tmp_path / "w.tar", 3 + 1)
    assert keys("w.tar") == ["s00000"]
    assert counter.take()["truncated_shard"] == 3
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
    assert b.views[0].images.dtype == torch.uint8  # ImageNet-normalised on the device by the task
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
    assert [x.position for x in batches] == [
        {"epoch": 0, "next_batch": 1, "consumed": {0: 4}},
        {"epoch": 0, "next_batch": 2, "consumed": {0: 8}},
    ]
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


def _forked_batches(
    cfg: VoltaConfig, tokenizer: Any, *, start_batch: int = 0, consumed: dict[int, int] | None = None
) -> list[VoltaBatch]:
    # build_train_loader's stream under data.num_workers DataLoader workers, forked rather than spawned so that
    # a test can afford a loader per resume point.
    loader = build_train_loader(
        cfg, tokenizer, rank=0, world_size=1, epoch=0, start_batch=start_batch, consumed=consumed
    )
    forked = DataLoader(
        loader.dataset, batch_size=None, num_workers=cfg.data.num_workers, multiprocessing_context="fork"
    )
    return list(forked)


def _consumed_after(batches: list[VoltaBatch]) -> dict[int, int]:
    """What the training loop keeps: the batches' ``position["consumed"]`` maps merged in reading order."""
    merged: dict[int, int] = {}
    for b in batches:
        merged.update(b.position["consumed"])
    return merged


def _assert_same_batches(got: list[VoltaBatch], want: list[VoltaBatch]) -> None:
    assert [b.keys for b in got] == [b.keys for b in want]
    for a, b in zip(got, want, strict=True):
        assert a.position == b.position and torch.equal(a.image_ids, b.image_ids)
        for va, vb in zip(a.views, b.views, strict=True):
            for f in dataclasses.fields(va):  # images, captions' tokens, MLM inputs and labels
                x, y = getattr(va, f.name), getattr(vb, f.name)
                assert (x is None and y is None) if x is None or y is None else torch.equal(x, y), f.name


def test_resume_with_a_shuffle_buffer_is_exact_at_every_batch(tmp_path: Path, tiny_tokenizer: Any) -> None:
    keys = write_dataset(tmp_path, 4, 10)  # 40 samples, 10 batches of 4, 5 per DataLoader worker
    cfg = tiny_config(str(tmp_path), data={"shuffle_buffer": 16, "num_workers": 2})
    full = _forked_batches(cfg, tiny_tokenizer)
    assert len(full) == 10 and sorted(k for b in full for k in b.keys) == keys
    for k in range(1, len(full)):
        resumed = _forked_batches(cfg, tiny_tokenizer, start_batch=k, consumed=_consumed_after(full[:k]))
        _assert_same_batches(resumed, full[k:])
        assert sorted(key for b in full[:k] + resumed for key in b.keys) == keys  # each sample exactly once
    # A position without "consumed" (an older checkpoint) resumes as before: exact while no image body was corrupt.
    _assert_same_batches(_forked_batches(cfg, tiny_tokenizer, start_batch=5), full[5:])


def test_resume_is_exact_after_corrupt_image_bodies(tmp_path: Path, tiny_tokenizer: Any) -> None:
    # 4 shards of 10 good samples, two of them with one extra sample whose JPEG body is cut: found only when the
    # image is decoded, after the shuffle buffer.
    keys = write_dataset(tmp_path, 4, 10)
    for shard, at in ((0, 0), (3, 1)):
        samples = [good_sample(shard * 10 + i) for i in range(10)]
        samples.insert(at, corrupt_body_sample(100 + shard))
        write_shard(tmp_path / f"{shard:05d}.tar", samples)
    cfg = tiny_config(
        str(tmp_path), data={"shuffle_buffer": 16, "num_workers": 2, "samples_per_epoch": len(keys)}
    )
    full = _forked_batches(cfg, tiny_tokenizer)
    assert sorted(k for b in full for k in b.keys) == keys
    assert _sum_stats(full) == {"corrupt_image": 2}
    shifted = 0
    for k in range(1, len(full)):
        consumed = _consumed_after(full[:k])
        resumed = _forked_batches(cfg, tiny_tokenizer, start_batch=k, consumed=consumed)
        _assert_same_batches(resumed, full[k:])
        assert sorted(key for b in full[:k] + resumed for key in b.keys) == keys  # each sample exactly once
        assert _sum_stats(full[:k] + resumed) == {"corrupt_image": 2}  # reported once: none lost or repeated
        # Roles still to make a batch whose stream has a corrupt body before this resume point: skipping whole
        # batches' worth of samples (a position without "consumed") would shift them.
        if any(consumed.get(role, 0) != len(full[role:k:2]) * 4 for role in {i % 2 for i in range(k, 10)}):
            shifted += 1
            if shifted == 1:
                old_style = _forked_batches(cfg, tiny_tokenizer, start_batch=k)
                assert [b.keys for b in old_style] != [b.keys for b in full[k:]]
    assert shifted >= 5


def test_a_truncated_shard_loses_only_its_unreadable_part(tmp_path: Path, tiny_tokenizer: Any) -> None:
    clean_dir, cut_dir = tmp_path / "clean", tmp_path / "cut"
    write_dataset(clean_dir, 4, 10)
    keys = write_dataset(cut_dir, 4, 10)
    shards = resolve_shards(str(cut_dir))
    cut_shard = next(shard_stream(shards, seed=7, epoch=0, stream=0, num_streams=2))  # worker role 0's first
    cut_index = shards.index(cut_shard)
    truncate_tar_inside_member(Path(cut_shard), 6 * 3)  # inside the first file of its 7th sample
    lost = {f"s{cut_index * 10 + i:05d}" for i in range(6, 10)}
    data = {"shuffle_buffer": 16, "num_workers": 2}
    clean = _forked_batches(tiny_config(str(clean_dir), data=data), tiny_tokenizer)
    cfg = tiny_config(str(cut_dir), data=data)
    cut = _forked_batches(cfg, tiny_tokenizer)
    assert set(_sum_stats(cut)) == {"truncated_shard"}
    _assert_same_batches(cut[1::2], clean[1::2])  # the other worker role's stream is untouched
    role0 = [k for b in cut[0::2] for k in b.keys]
    readable = set(keys) - lost
    assert readable <= {k for b in cut for k in b.keys}  # every sample before the cut is read this epoch
    assert len(role0) == 20 and not lost & set(role0)  # role 0 tops up from the next epoch's shard order
    for k in (3, 8):
        resumed = _forked_batches(cfg, tiny_tokenizer, start_batch=k, consumed=_consumed_after(cut[:k]))
        _assert_same_batches(resumed, cut[k:])


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


def test_views_rendered_on_the_device_match_the_cpu_views(tmp_path: Path, tiny_tokenizer: Any) -> None:
    # render_on: device ships decoded images and the sampled parameters; rendering them where the batch is
    # gives the CPU path's views (up to interpolation rounding), and captions, masks and order are identical.
    write_dataset(tmp_path, 2, 4)
    batches = {
        where: list(
            build_train_loader(
                tiny_config(str(tmp_path), data={"views": {"render_on": where}}),
                tiny_tokenizer,
                rank=0,
                world_size=1,
                epoch=0,
            )
        )
        for where in ("cpu", "device")
    }
    for cpu, dev in zip(batches["cpu"], batches["device"], strict=True):
        assert dev.pending is not None and dev.views[0].images.shape == (4, 3, 0, 0)
        assert dev.keys == cpu.keys
        rendered = dev.rendered()
        assert rendered.pending is None
        for a, b in zip(cpu.views, rendered.views, strict=True):
            for name in ("input_ids", "attention_mask", "special_tokens_mask", "mlm_input_ids", "mlm_labels"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            assert a.images.shape == b.images.shape and b.images.dtype == torch.uint8
            assert (a.images.float() - b.images.float()).abs().mean() < 3.0


def test_swap_negatives_add_swapped_captions_and_change_nothing_else(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    write_dataset(tmp_path, 2, 4)
    # captions untruncated, so that the decoded swap holds every word of the caption
    model = {"image": {"img_size": 32, "pretrained": False}, "text": {"max_length": 64, "pretrained": False}}
    plain = tiny_config(
        str(tmp_path),
        model=model,
        data={"samples_per_epoch": 8},
        loss={"got": {"contrastive": {"weight": 0.1}}},
    )
    swap = tiny_config(
        str(tmp_path),
        model=model,
        data={"samples_per_epoch": 8},
        loss={"got": {"contrastive": {"weight": 0.1, "swap_negatives": True}}},
    )
    a = list(build_train_loader(plain, tiny_tokenizer, rank=0, world_size=1, epoch=0))
    b = list(build_train_loader(swap, tiny_tokenizer, rank=0, world_size=1, epoch=0))
    assert _fingerprint(a) == _fingerprint(b)  # the same samples, views and MLM corruption
    for x, y in zip(a, b, strict=True):
        for v, w in zip(x.views, y.views, strict=True):
            assert v.swap_input_ids is None and v.swap_valid is None
            assert torch.equal(v.input_ids, w.input_ids)
            assert (
                w.swap_input_ids is not None
                and w.swap_attention_mask is not None
                and w.swap_valid is not None
            )
            assert w.swap_input_ids.shape == w.input_ids.shape and w.swap_valid.dtype == torch.bool
            for row in range(w.input_ids.shape[0]):
                caption = tiny_tokenizer.decode(w.input_ids[row], skip_special_tokens=True).split()
                swapped = tiny_tokenizer.decode(w.swap_input_ids[row], skip_special_tokens=True).split()
                if not w.swap_valid[row]:
                    assert len(set(caption)) < 2
                    continue
                assert sorted(swapped) == sorted(caption)  # the same words, two of them exchanged
                assert sum(u != s for u, s in zip(caption, swapped, strict=True)) == 2
    assert any(bool(w.swap_valid.any()) for y in b for w in y.views)  # type: ignore[union-attr]
