"""A procedural grounding dataset: coloured shapes on textured backgrounds with relational captions.

Each image holds 2-4 objects (colour x shape x size), drawn in order so later ones may partly cover earlier
ones, on a random low-saturation texture (noise, stripes, gradient, checkers). No two objects of an image
share colour and shape, so a phrase such as "red circle" names exactly one box. The caption names 1-3 of the
objects through varied templates, with spatial relations computed from the drawn positions ("a red circle to
the left of a small blue star"); the JSON carries one box per named object, every object with its visible
fraction, ``label`` = the shape index of the largest object by box area (a target for the linear probe) and
``word_classes``, the class of each content word of the caption (:func:`word_class_map`).
Sample ``i`` of a split depends only on ``(seed, split, i)``, so generation is reproducible byte for byte,
resumable and parallel.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from volta.data.writers import ShardSample, ShardWriter

log = logging.getLogger(__name__)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "SHAPES",
    "SIZES",
    "SPLIT_IDS",
    "WORD_CLASSES",
    "SceneObject",
    "make_scene",
    "synth_sample",
    "word_class_map",
    "write_synth_dataset",
    "write_synth_split",
]

# Saturated, well separated hues; backgrounds are kept near grey so every object stands out from them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 60, 190),
    "orange": (250, 127, 14),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
# Object extent (longer side of its box) as a fraction of the image side, per size class.
_SIZE_RANGES = {"small": (0.15, 0.24), "large": (0.28, 0.40)}
BACKGROUNDS: dict[str, str] = {
    "noise": "noisy",
    "stripes": "striped",
    "gradient": "shaded",
    "checkers": "checkered",
}
SPLIT_IDS = {"train": 0, "val": 1}
# An object drawn later may hide at most this fraction of an earlier one.
_MAX_HIDDEN = 0.35
_PLACEMENT_TRIES = 25
_JPEG_QUALITY = 92


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: colour, shape, size class, tight box ``[x, y, w, h]``, area, visible fraction."""

    color: str
    shape: str
    size: str
    bbox: tuple[int, int, int, int]
    area: int
    visible: float

    @property
    def phrase(self) -> str:
        """The phrase that names this object uniquely in its image: colour and shape."""
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box in pixels."""
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


# ------------------------------------------------------------------------------------------------ drawing
def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    # Vertices in a [-1, 1] square around the object's centre, y pointing down.
    if shape == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == "diamond":
        return [(0, -1), (1, 0), (0, 1), (-1, 0)]
    if shape == "triangle":
        return [(0, -1), (1, 0.8), (-1, 0.8)]
    if shape == "star":
        return [
            (
                (1.0 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                -(1.0 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
    if shape == "cross":
        a = 0.34
        return [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _object_mask(shape: str, cx: float, cy: float, radius: float, angle: float, side: int) -> np.ndarray:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        rotated = [(x * cos - y * sin, x * sin + y * cos) for x, y in _unit_polygon(shape)]
        # Rescale after rotation so the longer side of the box is 2 * radius for every shape and angle.
        scale = radius / max(max(abs(x), abs(y)) for x, y in rotated)
        draw.polygon([(cx + scale * x, cy + scale * y) for x, y in rotated], fill=255)
    return np.asarray(mask) > 0


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def _boxes_touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    # Two same-coloured objects that touch would read as one blob: keep them apart.
    return (
        a[0] < b[0] + b[2] + gap
        and b[0] < a[0] + a[2] + gap
        and a[1] < b[1] + b[3] + gap
        and b[1] < a[1] + a[3] + gap
    )


def _background(rng: np.random.Generator, side: int) -> tuple[str, np.ndarray]:
    kind = str(rng.choice(list(BACKGROUNDS)))
    # Two near-grey tones with a slight tint: textured but never as saturated as the objects.
    levels = rng.uniform(60, 200, size=2)
    tint = rng.uniform(-14, 14, size=(2, 3))
    tones = levels[:, None] + tint  # (2, 3)
    if abs(levels[0] - levels[1]) < 30:
        tones[1] += 40 if levels[1] < 130 else -40
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    proj = xx * math.cos(theta) + yy * math.sin(theta)  # (S, S)
    if kind == "noise":
        coarse = rng.normal(0, 1, size=(max(2, side // 12),) * 2).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BICUBIC))
        t = np.clip(0.5 + 0.3 * smooth + rng.normal(0, 0.12, size=(side, side)), 0, 1)
    elif kind == "stripes":
        period = rng.uniform(side / 18, side / 6)
        t = (np.floor(proj / (period / 2)) % 2).astype(np.float32)
    elif kind == "gradient":
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    else:
        cell = max(2.0, rng.uniform(side / 16, side / 6))
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    image = tones[0] * (1 - t[..., None]) + tones[1] * t[..., None]  # (S, S, 3)
    image += rng.normal(0, 4, size=(side, side, 1))  # fine grain so no region is perfectly flat
    return kind, image


def make_scene(rng: np.random.Generator, side: int = 128) -> tuple[np.ndarray, str, list[SceneObject]]:
    """Draw one scene: returns the RGB image (``(side, side, 3)`` uint8), the background kind and its objects.

    Objects are placed at random so that every one stays inside the image, keeps at least 65% of its area
    visible and never touches an object of the same colour; at least two are always placed.
    """
    if side < 32:
        raise ValueError(f"image side must be >= 32 pixels, got {side}")
    kind, canvas = _background(rng, side)
    wanted = int(rng.integers(2, 5))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    placed: list[tuple[str, str, str]] = []
    # Walk a permutation of colour x shape pairs (unique per image); an object that does not fit is replaced
    # by the next pair a couple of times, and always until two objects are placed.
    for tried, pick in enumerate(rng.permutation(len(pairs))):
        if len(placed) == wanted or (tried >= wanted + 2 and len(placed) >= 2):
            break
        color, shape = pairs[int(pick)]
        size = str(rng.choice(SIZES))
        for attempt in range(_PLACEMENT_TRIES):
            if attempt == _PLACEMENT_TRIES // 2:
                size = "small"  # a crowded scene: a smaller object fits more easily
            low, high = _SIZE_RANGES[size]
            radius = rng.uniform(low, high) * side / 2
            cx, cy = rng.uniform(radius, side - radius, size=2)
            mask = _object_mask(shape, cx, cy, radius, rng.uniform(-0.2, 0.2), side)
            box = _mask_box(mask)
            if all(
                (v & ~mask).sum() >= (1 - _MAX_HIDDEN) * m.sum() for v, m in zip(visible, masks)
            ) and not any(
                c == color and _boxes_touch(box, _mask_box(m), max(2, side // 32))
                for (c, _, _), m in zip(placed, masks)
            ):
                break
        else:
            continue
        visible = [v & ~mask for v in visible]
        visible.append(mask.copy())
        masks.append(mask)
        placed.append((color, shape, size))
        jitter = rng.uniform(-12, 12, size=3)
        canvas[mask] = np.clip(np.asarray(COLORS[color], dtype=np.float64) + jitter, 0, 255)
    objects = []
    for (color, shape, size), mask, vis in zip(placed, masks, visible):
        bbox = _mask_box(mask)
        area = int(mask.sum())
        objects.append(SceneObject(color, shape, size, bbox, area, round(float(vis.sum()) / area, 3)))
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return image, kind, objects


# ----------------------------------------------------------------------------------------------- captions
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _mention(rng: np.random.Generator, obj: SceneObject) -> str:
    # The size word is true but optional, so phrases vary while colour + shape still identify the object.
    words = f"{obj.size} {obj.phrase}" if rng.random() < 0.4 else obj.phrase
    return _article(words)


def _relation(a: SceneObject, b: SceneObject, side: int, rng: np.random.Generator) -> str | None:
    (ax, ay), (bx, by) = a.center, b.center
    margin = 0.1 * side
    options = []
    if ax < bx - margin:
        options.append("to the left of")
    if ax > bx + margin:
        options.append("to the right of")
    if ay < by - margin:
        options.append("above")
    if ay > by + margin:
        options.append("below")
    return str(rng.choice(options)) if options else None


_REGION_ROWS = ("top", "middle", "bottom")
_REGION_COLS = ("left", "center", "right")


def _region(obj: SceneObject, side: int) -> str:
    cx, cy = obj.center
    row, col = _REGION_ROWS[min(2, int(3 * cy / side))], _REGION_COLS[min(2, int(3 * cx / side))]
    if row == "middle" and col == "center":
        return "the center"
    if row == "middle":
        return f"the {col}"
    if col == "center":
        return f"the {row}"
    return f"the {row} {col}"


_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

# The class of every content word the captions use (meta ``word_classes``); the other words ("a", "of", "there",
# "is", ...) are function words and have none. Background words describe the whole picture: class "scene".
WORD_CLASSES: dict[str, str] = {
    **dict.fromkeys(COLORS, "attribute"),
    **dict.fromkeys(SIZES, "attribute"),
    **dict.fromkeys((*SHAPES, "shapes"), "object"),
    **dict.fromkeys(("left", "right", "above", "below", *_REGION_ROWS, *_REGION_COLS), "relation"),
    **dict.fromkeys(_NUMBER_WORDS.values(), "count"),
    **dict.fromkeys((*BACKGROUNDS.values(), "background", "image", "picture"), "scene"),
}


def word_class_map(caption: str, vocabulary: Mapping[str, str]) -> dict[str, str]:
    """The meta's ``word_classes``: each word of ``caption`` (lower case, a ``\\w+`` run) that ``vocabulary``
    classes, mapped to its class ("attribute", "object", "relation", "count" or "scene").

    A word has one class per caption; the grounding evaluation reads the map to report pointing per class.
    """
    return {w: vocabulary[w] for w in re.findall(r"\w+", caption.lower()) if w in vocabulary}


def make_caption(
    rng: np.random.Generator, objects: Sequence[SceneObject], background: str, side: int
) -> tuple[str, list[SceneObject]]:
    """A caption naming 1-3 of ``objects`` from varied templates, and the objects it names."""
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    count = min(count, len(objects))
    named = [objects[int(i)] for i in rng.permutation(len(objects))[:count]]
    m = [_mention(rng, o) for o in named]
    bg = f"{BACKGROUNDS[background]} background"
    n_words = _NUMBER_WORDS[len(objects)]
    templates: list[str]
    if count == 1:
        templates = [
            m[0],
            f"there is {m[0]}",
            f"{m[0]} on a {bg}",
            f"a picture of {m[0]}",
            f"{m[0]} in {_region(named[0], side)} of the image",
            f"{n_words} shapes, one of them {m[0]}",
        ]
    elif count == 2:
        rel = _relation(named[0], named[1], side, rng)
        templates = [f"{m[0]} and {m[1]}", f"{m[0]} and {m[1]} on a {bg}", f"an image with {m[0]} and {m[1]}"]
        if rel is not None:
            templates += [
                f"{m[0]} {rel} {m[1]}",
                f"there is {m[0]} {rel} {m[1]}",
                f"{m[0]} {rel} {m[1]} on a {bg}",
            ]
    else:
        rel = _relation(named[0], named[1], side, rng)
        templates = [f"{m[0]}, {m[1]} and {m[2]}", f"{m[0]}, {m[1]} and {m[2]} on a {bg}"]
        if len(objects) == 3:
            templates.append(f"three shapes: {m[0]}, {m[1]} and {m[2]}")
        if rel is not None:
            templates.append(f"{m[0]} {rel} {m[1]}, and {m[2]}")
    return str(rng.choice(templates)), named


# ------------------------------------------------------------------------------------------------ samples
def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split, index]))


def synth_sample(index: int, *, seed: int = 0, split: int = 0, image_size: int = 128) -> ShardSample:
    """Sample ``index`` of a split: a JPEG scene, its caption and metadata (named objects' boxes, label).

    The result depends only on the arguments: the same call always returns identical bytes.
    """
    rng = _rng(seed, split, index)
    image, background, objects = make_scene(rng, image_size)
    caption, named = make_caption(rng, objects, background, image_size)
    largest = max(objects, key=lambda o: o.bbox[2] * o.bbox[3])
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    meta: dict[str, Any] = {
        "width": image_size,
        "height": image_size,
        "boxes": [{"phrase": o.phrase, "bbox": list(o.bbox), "type": "color_shape"} for o in named],
        "label": SHAPES.index(largest.shape),
        "objects": [
            {"color": o.color, "shape": o.shape, "size": o.size, "bbox": list(o.bbox), "visible": o.visible}
            for o in objects
        ],
        "background": background,
        "caption_source": "synth",
        "word_classes": word_class_map(caption, WORD_CLASSES),
    }
    return ShardSample(buf.getvalue(), "jpg", caption, meta)


def write_synth_split(
    out_dir: str | Path,
    num_samples: int,
    *,
    seed: int = 0,
    split: int = 0,
    image_size: int = 128,
    samples_per_shard: int = 1000,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    sample_fn: Callable[..., ShardSample] = synth_sample,
) -> dict[str, int]:
    """Write ``num_samples`` synthetic samples as shards + ``sizes.json`` into ``out_dir``; return it.

    Complete shards of an earlier run with the same arguments are kept as they are. ``workers > 1`` generates
    in a process pool; the output is identical for any worker count. ``progress`` is called with each sample
    count. ``sample_fn(index, seed=, split=, image_size=)`` makes one sample (another dataset's generator, e.g.
    :func:`volta.data.synth_scenes.scene_sample`; it must be picklable for ``workers > 1``).
    """
    make = partial(sample_fn, seed=seed, split=split, image_size=image_size)
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        with ShardWriter(out_dir, samples_per_shard) as writer:
            for start in range(0, num_samples, samples_per_shard):
                indices = range(start, min(num_samples, start + samples_per_shard))
                if writer.next_is_skipped:
                    for index in indices:
                        writer.write_lazy(index, make)
                else:
                    samples = pool.imap(make, indices, chunksize=16) if pool else map(make, indices)
                    for sample in samples:
                        writer.write(sample)
                if progress is not None:
                    progress(len(indices))
            return writer.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def write_synth_dataset(
    out_dir: str | Path,
    *,
    train_samples: int = 10_000,
    val_samples: int = 1_000,
    image_size: int = 128,
    seed: int = 0,
    samples_per_shard: int = 500,
    tokenizer_vocab_size: int | None = 1024,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    sample_fn: Callable[..., ShardSample] = synth_sample,
) -> dict[str, dict[str, int]]:
    """Write ``out_dir/train``, ``out_dir/val`` (one seed stream per split) and ``out_dir/tokenizer``.

    The tokenizer is a byte-level BPE trained on the train captions (skipped when ``tokenizer_vocab_size`` is
    None). Returns the ``sizes.json`` manifest of each split. ``sample_fn`` as in :func:`write_synth_split`.
    """
    out = Path(out_dir)
    sizes = {}
    for split, count in (("train", train_samples), ("val", val_samples)):
        sizes[split] = write_synth_split(
            out / split,
            count,
            seed=seed,
            split=SPLIT_IDS[split],
            image_size=image_size,
            samples_per_shard=samples_per_shard,
            workers=workers,
            progress=progress,
            sample_fn=sample_fn,
        )
    if tokenizer_vocab_size is not None:
        from volta.data.inspect import iter_captions
        from volta.data.tokenizer import train_bpe_tokenizer

        train_bpe_tokenizer(iter_captions(out / "train"), out / "tokenizer", vocab_size=tokenizer_vocab_size)
    return sizes
