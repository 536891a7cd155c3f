"""The second synthetic grounding dataset (scenes): reproducible, boxes on the drawn objects, truthful captions
whose named phrases single out their objects, word classes for every content word, the statistics it promises."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from volta.cli import main
from volta.data.inspect import iter_raw_samples
from volta.data.synth import synth_sample
from volta.data.synth_scenes import (
    BACKGROUNDS,
    COLORS,
    OBJECTS,
    PATTERNS,
    SIZES,
    make_scene,
    scene_sample,
    write_scenes_split,
)
from volta.eval.grounding import find_phrase_spans, phrase_targets, unboxed_word_targets

pytestmark = pytest.mark.timeout(60)

# Words that carry no class in either dataset's captions.
FUNCTION_WORDS = {"a", "an", "the", "and", "of", "on", "in", "to", "by", "with", "against", "among", "them"}
FUNCTION_WORDS |= {"there", "is", "are", "one"}
CLASSES = {"attribute", "object", "relation", "count", "scene"}
RELATIONS = {"above": (1, 1), "under": (1, -1), "left": (0, 1), "right": (0, -1)}  # word -> (axis, sign)


@pytest.fixture(scope="module")
def samples() -> list:
    return [scene_sample(i) for i in range(200)]


def test_same_seed_gives_byte_identical_shards_and_other_seeds_differ(tmp_path: Path) -> None:
    for name, seed, split in (("a", 3, 0), ("b", 3, 0), ("c", 4, 0), ("val", 3, 1)):
        write_scenes_split(tmp_path / name, 12, seed=seed, split=split, image_size=64, samples_per_shard=5)
    names = ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for other in ("c", "val"):
        assert (tmp_path / "a" / "00000.tar").read_bytes() != (tmp_path / other / "00000.tar").read_bytes()
    # Sample i depends only on (seed, split, i): the shard layout does not change it.
    stored = [(s.members["jpg"], s.members["txt"].decode()) for s in iter_raw_samples(str(tmp_path / "a"))]
    direct = [scene_sample(i, seed=3, image_size=64) for i in range(12)]
    assert stored == [(s.image, s.caption) for s in direct]
    # ... and the two datasets do not share a random stream for one seed.
    assert scene_sample(0, seed=3).caption != synth_sample(0, seed=3).caption


def test_boxes_lie_in_the_image_and_cover_exactly_the_drawn_pixels() -> None:
    checked = 0
    for i in range(60):
        scene = make_scene(np.random.default_rng(i), 128)
        changed = np.abs(scene.image.astype(int) - scene.empty.astype(int)).max(axis=-1) > 0  # (S, S)
        covered = np.zeros_like(changed)
        for obj in scene.objects:
            x, y, w, h = obj.bbox
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
            covered[y : y + h, x : x + w] = True
        assert not (changed & ~covered).any()  # objects are drawn only inside their boxes
        for k, obj in enumerate(scene.objects):
            x, y, w, h = obj.bbox
            inside = changed[y : y + h, x : x + w]
            # the visible part of the object differs from the background under it
            assert inside.mean() >= 0.2 * obj.visible, obj
            others = [o.bbox for j, o in enumerate(scene.objects) if j != k]
            if any(
                x < a + c + 2 and a < x + w + 2 and y < b + d + 2 and b < y + h + 2 for a, b, c, d in others
            ):
                continue
            # an object alone in its neighbourhood: its changed pixels span its box exactly
            ys, xs = np.nonzero(changed[max(0, y - 2) : y + h + 2, max(0, x - 2) : x + w + 2])
            found = (xs.min() + max(0, x - 2), ys.min() + max(0, y - 2), np.ptp(xs) + 1, np.ptp(ys) + 1)
            assert np.abs(np.array(found) - np.array(obj.bbox)).max() <= 1, (obj, found)
            checked += 1
    assert checked > 60


def test_stored_jpegs_show_the_objects() -> None:
    sample = scene_sample(5)
    image = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")).astype(int)
    assert image.shape == (128, 128, 3) and (sample.meta["width"], sample.meta["height"]) == (128, 128)
    scene = make_scene(np.random.default_rng(0), 128)  # any scene: JPEG keeps objects apart from the backdrop
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="JPEG", quality=92, subsampling=0)
    decoded = np.asarray(Image.open(buf).convert("RGB")).astype(int)
    for obj in scene.objects:
        x, y, w, h = obj.bbox
        diff = np.abs(decoded - scene.empty.astype(int))[y : y + h, x : x + w].max(axis=-1)
        assert (diff > 30).mean() > 0.15 * obj.visible


def _attributes(obj: dict) -> set[str]:
    return {obj["size"], obj["pattern"], obj["color"]}


def test_every_named_phrase_is_in_the_caption_and_singles_out_its_boxes(samples: list) -> None:
    groups = 0
    for s in samples:
        objects, boxes = s.meta["objects"], s.meta["boxes"]
        by_phrase: dict[str, list[list[int]]] = {}
        for box in boxes:
            by_phrase.setdefault(box["phrase"], []).append(box["bbox"])
        assert 1 <= len(by_phrase) <= 3
        for phrase, bboxes in by_phrase.items():
            assert len(find_phrase_spans(s.caption, phrase)) == 1, (phrase, s.caption)
            words = phrase.split()
            if words[0] in ("two", "three"):  # every object of a kind, counted right
                kind = next(k for k in OBJECTS if words[1] in (k, k + "s"))
                members = [o["bbox"] for o in objects if o["kind"] == kind]
                assert sorted(members) == sorted(bboxes) and len(members) == {"two": 2, "three": 3}[words[0]]
                assert {b["type"] for b in boxes if b["phrase"] == phrase} == {"group"}
                groups += 1
                continue
            # one object: its kind and the attributes named are its own, and no other object has them all
            matching = [o for o in objects if o["kind"] == words[-1] and set(words[:-1]) <= _attributes(o)]
            assert [o["bbox"] for o in matching] == bboxes, (phrase, objects)
        assert {b["type"] for b in boxes} <= {"object", "group"}
        assert len(phrase_targets(s.caption, s.meta)) == len(by_phrase)
        largest = max(objects, key=lambda o: o["bbox"][2] * o["bbox"][3])
        assert s.meta["label"] == OBJECTS.index(largest["kind"])
    assert groups > 10


@pytest.mark.parametrize("make", [scene_sample, synth_sample], ids=["scenes", "shapes"])
def test_the_word_class_map_covers_every_content_word(make: object) -> None:
    for i in range(100):
        s = make(i)  # type: ignore[operator]
        classes = s.meta["word_classes"]
        words = re.findall(r"\w+", s.caption.lower())
        assert set(classes) == {w for w in words if w not in FUNCTION_WORDS}, s.caption
        assert set(classes.values()) <= CLASSES
        for box in s.meta["boxes"]:  # the words the pointing game scores are all classed
            assert {classes[w] for w in box["phrase"].split()} <= {"attribute", "object", "count"}


def test_relations_are_true_and_point_at_the_phrases_they_relate(samples: list) -> None:
    checked = 0
    for s in samples:
        targets = phrase_targets(s.caption, s.meta)
        boxes = {t.phrase: t.boxes[0] for t in targets}
        for word in unboxed_word_targets(s.caption, targets, s.meta["word_classes"]):
            assert word.word_class == "relation"  # every attribute sits inside its phrase in this dataset
            first, second = (p.phrase for p in word.phrases)  # the grammar puts both arguments around it
            assert s.caption.index(first) < word.span[0] < s.caption.index(second)
            if word.word in RELATIONS:
                axis, sign = RELATIONS[word.word]
                a, b = boxes[first], boxes[second]
                assert sign * ((b[axis] + b[axis + 2] / 2) - (a[axis] + a[axis + 2] / 2)) > 0, s.caption
            elif word.word in ("front", "behind"):  # occlusion: the two boxes overlap
                (ax, ay, aw, ah), (bx, by, bw, bh) = boxes[first], boxes[second]
                assert ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
            checked += 1
    assert checked > 40


def test_statistics_over_200_samples(samples: list) -> None:
    objects = [o for s in samples for o in s.meta["objects"]]
    assert Counter(len(s.meta["objects"]) for s in samples).keys() == {2, 3, 4, 5, 6}
    assert {o["kind"] for o in objects} == set(OBJECTS) and len(OBJECTS) >= 10
    assert {o["color"] for o in objects} == set(COLORS)
    assert {o["pattern"] for o in objects} == set(PATTERNS)
    assert {o["size"] for o in objects} == set(SIZES)
    assert {s.meta["background"] for s in samples} == set(BACKGROUNDS)
    assert min(s.meta["clutter"] for s in samples) >= 3
    assert (
        all(o["visible"] >= 0.55 for o in objects) and np.mean([o["visible"] < 0.95 for o in objects]) > 0.1
    )
    # every attribute and kind word is said somewhere, and the relations of the grammar are used
    said = Counter(w for s in samples for w in s.meta["word_classes"])
    for word in (*COLORS, *PATTERNS, *SIZES, *OBJECTS, "above", "under", "left", "right", "front", "behind"):
        assert said[word] > 0, word
    # the three sizes span 10-50% of the side (outlines and masts may stick out of the drawn box) and are ordered
    extents = {size: [max(o["bbox"][2:]) / 128 for o in objects if o["size"] == size] for size in SIZES}
    assert min(extents["tiny"]) >= 0.09 and max(extents["big"]) <= 0.5
    assert np.median(extents["tiny"]) < np.median(extents["small"]) < np.median(extents["big"])
    assert len({s.caption for s in samples}) > 190


def test_cli_writes_the_scenes_dataset(tmp_path: Path) -> None:
    args = ["data", "synth", "--kind", "scenes", "--out", str(tmp_path), "--train-samples", "4"]
    assert main([*args, "--val-samples", "2", "--image-size", "48", "--no-tokenizer"]) == 0
    assert json.loads((tmp_path / "val" / "sizes.json").read_text()) == {"00000.tar": 2}
    stored = list(iter_raw_samples(str(tmp_path / "train")))
    assert [json.loads(s.members["json"])["caption_source"] for s in stored] == ["synth_scenes"] * 4
    assert stored[1].members["txt"].decode() == scene_sample(1, image_size=48).caption
