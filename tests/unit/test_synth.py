"""The synthetic grounding dataset: reproducible, boxes matching the drawn objects, truthful captions."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from volta.data.inspect import iter_raw_samples
from volta.data.synth import BACKGROUNDS, COLORS, SHAPES, synth_sample, write_synth_split


def _samples(n: int, *, seed: int = 0, split: int = 0, size: int = 128) -> list:
    return [synth_sample(i, seed=seed, split=split, image_size=size) for i in range(n)]


@pytest.fixture(scope="module")
def samples() -> list:
    return _samples(300)


def test_same_seed_gives_byte_identical_shards_and_other_seeds_differ(tmp_path: Path) -> None:
    for name, seed, split in (("a", 3, 0), ("b", 3, 0), ("c", 4, 0), ("val", 3, 1)):
        write_synth_split(tmp_path / name, 20, seed=seed, split=split, image_size=64, samples_per_shard=8)
    names = ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "00000.tar").read_bytes() != (tmp_path / "c" / "00000.tar").read_bytes()
    assert (tmp_path / "a" / "00000.tar").read_bytes() != (tmp_path / "val" / "00000.tar").read_bytes()
    # Sample i depends only on (seed, split, i): the shard layout does not change the samples.
    again = [s.members["jpg"] for s in iter_raw_samples(str(tmp_path / "a"))]
    assert again == [s.image for s in _samples(20, seed=3, size=64)]


def test_every_phrase_is_unique_named_in_the_caption_and_boxed_inside_the_image(samples: list) -> None:
    for s in samples:
        meta = s.meta
        objects = meta["objects"]
        assert 2 <= len(objects) <= 4
        assert 1 <= len(meta["boxes"]) <= 3
        pairs = [(o["color"], o["shape"]) for o in objects]
        assert len(set(pairs)) == len(pairs)  # colour + shape identifies one object
        phrases = [b["phrase"] for b in meta["boxes"]]
        assert len(set(phrases)) == len(phrases)
        for box in meta["boxes"]:
            assert box["phrase"] in s.caption and box["type"] == "color_shape"
            x, y, w, h = box["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
            assert box["bbox"] in [
                o["bbox"] for o in objects if f"{o['color']} {o['shape']}" == box["phrase"]
            ]
        # The caption names no object that has no box: every colour+shape pair it mentions is boxed.
        mentioned = {f"{c} {sh}" for c in COLORS for sh in SHAPES if f"{c} {sh}" in s.caption}
        assert mentioned == set(phrases)
        largest = max(objects, key=lambda o: o["bbox"][2] * o["bbox"][3])
        assert meta["label"] == SHAPES.index(largest["shape"])
        assert all(o["visible"] >= 0.64 for o in objects)  # occlusion is partial only


def _overlaps(a: list[int], b: list[int], margin: int = 5) -> bool:
    return (
        a[0] < b[0] + b[2] + margin
        and b[0] < a[0] + a[2] + margin
        and a[1] < b[1] + b[3] + margin
        and b[1] < a[1] + a[3] + margin
    )


def test_boxes_match_the_drawn_objects(samples: list) -> None:
    checked = 0
    for s in samples[:150]:
        image = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")).astype(np.int32)
        objects = s.meta["objects"]
        for i, obj in enumerate(objects):
            others = [o for j, o in enumerate(objects) if j != i and _overlaps(o["bbox"], obj["bbox"])]
            if others:
                continue  # an unambiguous region is needed: skip objects whose box comes near another one
            x, y, w, h = obj["bbox"]
            # Pixels close to the object's colour (after jitter and JPEG), in a margin around the box.
            close = np.abs(image - np.array(COLORS[obj["color"]])).max(axis=-1) < 45  # (H, W)
            x0, y0 = max(0, x - 4), max(0, y - 4)
            region = close[y0 : y + h + 4, x0 : x + w + 4]
            ys, xs = np.nonzero(region)
            assert close[y : y + h, x : x + w].mean() > 0.25, (obj, s.caption)
            found = [x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1 - x, y0 + ys.max() + 1 - y]
            assert abs(found[0] - x) <= 2 and abs(found[1] - y) <= 2, (obj, found)
            assert abs(found[2] - w) <= 2 + abs(found[0] - x) and abs(found[3] - h) <= 2 + abs(found[1] - y)
            checked += 1
    assert checked > 150


def test_vocabulary_sizes_backgrounds_and_relations_are_all_covered(samples: list) -> None:
    objects = [o for s in samples for o in s.meta["objects"]]
    assert len(COLORS) >= 6 and len(SHAPES) >= 5
    assert {o["color"] for o in objects} == set(COLORS)
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["size"] for o in objects} == {"small", "large"}
    assert {s.meta["background"] for s in samples} == set(BACKGROUNDS)
    captions = " | ".join(s.caption for s in samples)
    for words in (
        "to the left of",
        "to the right of",
        "above",
        "below",
        "small",
        "large",
        "striped",
        "there is",
    ):
        assert words in captions
    assert len({s.caption.split(" a ")[0] for s in samples}) > 5  # the captions do not all start alike
    assert Counter(len(s.meta["objects"]) for s in samples).keys() == {2, 3, 4}
    # At 128 px an object's longer side spans roughly 15-40% of the image.
    extents = [max(o["bbox"][2], o["bbox"][3]) / 128 for o in objects]
    assert min(extents) >= 0.12 and max(extents) <= 0.42
    assert (
        np.median([max(o["bbox"][2:]) for o in objects if o["size"] == "large"])
        > np.median([max(o["bbox"][2:]) for o in objects if o["size"] == "small"]) * 1.4
    )


def test_spatial_relations_in_captions_are_true(samples: list) -> None:
    checked = 0
    for s in samples:
        boxes = {b["phrase"]: b["bbox"] for b in s.meta["boxes"]}
        for relation, axis, sign in (
            ("to the left of", 0, 1),
            ("to the right of", 0, -1),
            ("above", 1, 1),
            ("below", 1, -1),
        ):
            if relation not in s.caption:
                continue
            before, after = s.caption.split(relation)
            first = next(p for p in boxes if p in before.split(",")[-1])
            second = next(p for p in boxes if p in after.split(",")[0])
            a, b = boxes[first], boxes[second]
            centre_a, centre_b = a[axis] + a[axis + 2] / 2, b[axis] + b[axis + 2] / 2
            assert sign * (centre_b - centre_a) > 0, (s.caption, a, b)
            checked += 1
    assert checked > 30


@pytest.mark.parametrize("size", [48, 256])
def test_objects_scale_with_the_image_size(size: int) -> None:
    for s in _samples(10, size=size):
        assert Image.open(io.BytesIO(s.image)).size == (size, size)
        assert (s.meta["width"], s.meta["height"]) == (size, size)
        for o in s.meta["objects"]:
            assert 0.12 * size <= max(o["bbox"][2:]) <= 0.42 * size + 1


def test_rerun_keeps_complete_synth_shards(tmp_path: Path) -> None:
    write_synth_split(tmp_path, 10, image_size=48, samples_per_shard=4)
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "00000.tar": 4,
        "00001.tar": 4,
        "00002.tar": 2,
    }
    write_synth_split(tmp_path, 10, image_size=48, samples_per_shard=4)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == first


@pytest.mark.timeout(120)
def test_worker_processes_give_the_same_shards(tmp_path: Path) -> None:
    write_synth_split(tmp_path / "one", 12, image_size=48, samples_per_shard=5)
    write_synth_split(tmp_path / "two", 12, image_size=48, samples_per_shard=5, workers=2)
    for name in ("00000.tar", "00001.tar", "00002.tar", "sizes.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
