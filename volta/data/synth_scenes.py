"""A second procedural grounding dataset, built apart from :mod:`volta.data.synth` so that what is tuned on one
can be checked on the other: drawn everyday objects in cluttered, photo-like scenes with attribute-rich captions.

Each image holds 2-6 objects of 10 kinds (house, tree, car, cup, key, lamp, fish, boat, flower, umbrella), each a
composite silhouette of PIL primitives with dark details (windows, wheels, an eye) and a dark outline, possibly
mirrored, in one of 7 colours, 3 surface patterns (plain, striped, dotted) and 3 sizes (tiny, small, big: about
10-50% of the image side). Scenes are a sky over grass, sand, snow or water, or a stone wall, with grain, a random
illumination gradient and vignetting, and 3-12 unnamed clutter marks (lines, dots, rings, small triangles) behind
the objects. A third of the objects are placed against an earlier one, and objects drawn later may hide up to 45%
of earlier ones; two objects of a kind never touch.

Captions name 1-3 things with their own grammar: an object by the fewest attributes that single it out among its
kind plus optional extra ones ("a tiny striped crimson cup"), or all objects of a kind at once ("two boats"), with
relations computed from the drawing: above, under, on the left / right of, next to, and, from occlusion, in front
of and behind ("there is a dotted lamp in front of a big teal house by the water"). The JSON has, in the format
of :mod:`volta.data.synth` (the one the grounding evaluation reads), one ``boxes`` entry per named object with
the phrase that names it (``"type": "object"``; ``"group"`` for "two boats", one entry per member), every object
with its visible fraction, ``label`` = the kind of the largest object by box area, and ``word_classes`` (see
:func:`~volta.data.synth.word_class_map`). Sample ``i`` of a split depends only on ``(seed, split, i)``, on a
random stream apart from the shapes dataset's.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from volta.data.synth import word_class_map, write_synth_dataset, write_synth_split
from volta.data.writers import ShardSample

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "OBJECTS",
    "PATTERNS",
    "SIZES",
    "WORD_CLASSES",
    "Scene",
    "SceneObject",
    "make_scene",
    "scene_sample",
    "write_scenes_dataset",
    "write_scenes_split",
]

# ------------------------------------------------------------------------------------------ vocabulary
OBJECTS: tuple[str, ...] = (
    "house",
    "tree",
    "car",
    "cup",
    "key",
    "lamp",
    "fish",
    "boat",
    "flower",
    "umbrella",
)
_PLURALS = {kind: "fish" if kind == "fish" else kind + "s" for kind in OBJECTS}
# A palette whose names the shapes dataset never uses.
COLORS: dict[str, tuple[int, int, int]] = {
    "crimson": (196, 22, 58),
    "teal": (0, 134, 139),
    "navy": (28, 40, 120),
    "lime": (140, 210, 40),
    "pink": (240, 120, 185),
    "brown": (125, 78, 38),
    "gold": (225, 175, 20),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
SIZES: tuple[str, ...] = ("tiny", "small", "big")
# Longer side of an object's box as a fraction of the image side, per size class.
_SIZE_RANGES = {"tiny": (0.10, 0.15), "small": (0.19, 0.27), "big": (0.33, 0.48)}
# Background kind -> the words a caption places objects with.
BACKGROUNDS: dict[str, str] = {
    "grass": "on the grass",
    "sand": "on the sand",
    "snow": "in the snow",
    "water": "by the water",
    "wall": "against a wall",
}
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
WORD_CLASSES: dict[str, str] = {
    **dict.fromkeys((*COLORS, *PATTERNS, *SIZES), "attribute"),
    **dict.fromkeys((*OBJECTS, *_PLURALS.values(), "objects"), "object"),
    **dict.fromkeys(("above", "under", "left", "right", "next", "front", "behind"), "relation"),
    **dict.fromkeys(_NUMBERS.values(), "count"),
    **dict.fromkeys((*BACKGROUNDS, "photo", "scene"), "scene"),
}
_MAX_HIDDEN = 0.45  # an object drawn later may hide at most this fraction of an earlier one
_IN_FRONT = 0.06  # ... and is "in front of" it once it hides at least this fraction
_PLACEMENT_TRIES = 20
_MARGIN = 4  # pixels around an object's nominal box that its lines may reach
_JPEG_QUALITY = 92
_STREAM = 0x5CE7E5  # keeps this dataset's random stream apart from the shapes dataset's for the same seed

# ------------------------------------------------------------------------------------------ drawing
# Each kind is a list of parts in a unit box (x right, y down) stretched over the object's box, plus the box's
# aspect (width / height). "body" parts take the colour and pattern, "cut" parts punch holes in the body,
# "detail" parts are drawn dark on top. Geometry: ("rect" | "ellipse", (x0, y0, x1, y1)), ("poly", points) or
# ("line", points, width as a fraction of the box's shorter side).
_Part = tuple[Any, ...]


def _flower_petals() -> list[_Part]:
    return [
        (
            "body",
            "ellipse",
            (
                0.5 + 0.28 * math.sin(a) - 0.2,
                0.34 - 0.2 * math.cos(a) - 0.14,
                0.5 + 0.28 * math.sin(a) + 0.2,
                0.34 - 0.2 * math.cos(a) + 0.14,
            ),
        )
        for a in (2 * math.pi * k / 5 for k in range(5))
    ]


_CANOPY = [(0.5 - 0.5 * math.cos(t), 0.46 - 0.44 * math.sin(t)) for t in np.linspace(0, math.pi, 13)]
_KINDS: dict[str, tuple[float, list[_Part]]] = {
    "house": (
        0.95,
        [
            ("body", "rect", (0.12, 0.45, 0.88, 1.0)),
            ("body", "poly", [(0.0, 0.5), (0.5, 0.03), (1.0, 0.5)]),
            ("body", "rect", (0.68, 0.12, 0.8, 0.4)),
            ("detail", "rect", (0.43, 0.7, 0.57, 1.0)),
            ("detail", "rect", (0.2, 0.58, 0.34, 0.72)),
            ("detail", "rect", (0.66, 0.58, 0.8, 0.72)),
        ],
    ),
    "tree": (
        0.8,
        [
            ("body", "ellipse", (0.1, 0.0, 0.9, 0.55)),
            ("body", "ellipse", (0.0, 0.22, 0.6, 0.72)),
            ("body", "ellipse", (0.4, 0.22, 1.0, 0.72)),
            ("detail", "rect", (0.42, 0.64, 0.58, 1.0)),
        ],
    ),
    "car": (
        1.9,
        [
            ("body", "rect", (0.0, 0.42, 1.0, 0.82)),
            ("body", "poly", [(0.18, 0.43), (0.32, 0.06), (0.7, 0.06), (0.84, 0.43)]),
            ("detail", "poly", [(0.3, 0.4), (0.38, 0.15), (0.49, 0.15), (0.49, 0.4)]),
            ("detail", "poly", [(0.53, 0.4), (0.53, 0.15), (0.65, 0.15), (0.74, 0.4)]),
            ("detail", "ellipse", (0.1, 0.62, 0.34, 1.0)),
            ("detail", "ellipse", (0.66, 0.62, 0.9, 1.0)),
        ],
    ),
    "cup": (
        1.0,
        [
            ("body", "poly", [(0.06, 0.12), (0.68, 0.12), (0.62, 1.0), (0.12, 1.0)]),
            ("body", "ellipse", (0.5, 0.28, 0.98, 0.76)),
            ("cut", "ellipse", (0.67, 0.42, 0.84, 0.62)),
            ("detail", "line", [(0.06, 0.12), (0.68, 0.12)], 0.08),
        ],
    ),
    "key": (
        2.2,
        [
            ("body", "ellipse", (0.0, 0.05, 0.38, 0.95)),
            ("cut", "ellipse", (0.1, 0.33, 0.24, 0.67)),
            ("body", "rect", (0.34, 0.38, 1.0, 0.62)),
            ("body", "rect", (0.74, 0.6, 0.82, 0.92)),
            ("body", "rect", (0.88, 0.6, 0.96, 0.84)),
        ],
    ),
    "lamp": (
        0.7,
        [
            ("body", "poly", [(0.2, 0.0), (0.8, 0.0), (1.0, 0.4), (0.0, 0.4)]),
            ("detail", "rect", (0.44, 0.4, 0.56, 0.88)),
            ("body", "rect", (0.15, 0.86, 0.85, 1.0)),
        ],
    ),
    "fish": (
        1.8,
        [
            ("body", "ellipse", (0.22, 0.1, 1.0, 0.9)),
            ("body", "poly", [(0.0, 0.08), (0.34, 0.5), (0.0, 0.92)]),
            ("detail", "ellipse", (0.76, 0.3, 0.86, 0.46)),
            ("detail", "line", [(0.5, 0.25), (0.56, 0.5), (0.5, 0.75)], 0.06),
        ],
    ),
    "boat": (
        1.2,
        [
            ("body", "poly", [(0.0, 0.66), (1.0, 0.66), (0.82, 1.0), (0.18, 1.0)]),
            ("body", "poly", [(0.54, 0.04), (0.54, 0.6), (0.94, 0.6)]),
            ("body", "poly", [(0.46, 0.16), (0.46, 0.6), (0.14, 0.6)]),
            ("detail", "line", [(0.5, 0.0), (0.5, 0.68)], 0.05),
        ],
    ),
    "flower": (
        0.7,
        [
            *_flower_petals(),
            ("detail", "ellipse", (0.38, 0.26, 0.62, 0.42)),
            ("detail", "line", [(0.5, 0.5), (0.5, 1.0)], 0.07),
            ("detail", "ellipse", (0.5, 0.68, 0.84, 0.8)),
        ],
    ),
    "umbrella": (
        1.1,
        [
            ("body", "poly", _CANOPY),
            ("detail", "line", [(0.5, 0.44), (0.5, 0.9)], 0.06),
            ("detail", "line", [(0.5, 0.9), (0.45, 0.98), (0.37, 0.98), (0.33, 0.9)], 0.06),
        ],
    ),
}


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: kind, colour, pattern, size class, tight box ``[x, y, w, h]``, area, visible fraction."""

    kind: str
    color: str
    pattern: str
    size: str
    bbox: tuple[int, int, int, int]
    area: int
    visible: float

    def attribute(self, name: str) -> str:
        """The object's ``size``, ``pattern`` or ``color`` word."""
        return str(getattr(self, name))

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box in pixels."""
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


@dataclass(frozen=True)
class Scene:
    """A drawn scene: the RGB image, the same scene without its objects (both ``(S, S, 3)`` uint8, identical
    outside the objects), the background kind, the clutter count, the objects in drawing order, and the pairs
    ``(a, b)`` of object indices where ``a`` hides part of ``b``."""

    image: np.ndarray
    empty: np.ndarray
    background: str
    clutter: int
    objects: tuple[SceneObject, ...]
    in_front: frozenset[tuple[int, int]]


def _smooth_noise(rng: np.random.Generator, side: int, cells: tuple[int, int]) -> np.ndarray:
    # Gaussian noise on a (rows, cols) grid, upsampled bicubically to (S, S): blobs, or streaks for unequal cells.
    coarse = rng.standard_normal(cells, dtype=np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BICUBIC))


def _vertical_ramp(side: int, top: np.ndarray, bottom: np.ndarray, y0: float, y1: float) -> np.ndarray:
    # Colour rows (3, S, 1) going from top (rows <= y0) to bottom (rows >= y1).
    t = np.clip((np.arange(side, dtype=np.float32) - y0) / max(y1 - y0, 1.0), 0, 1)[
        None, :, None
    ]  # (1, S, 1)
    return (top[:, None, None] * (1 - t) + bottom[:, None, None] * t).astype(np.float32)


def _background(rng: np.random.Generator, side: int) -> tuple[str, np.ndarray]:
    # A float32 (S, S, 3) photo-like backdrop: a stone wall, or a sky over grass, sand, snow or water. Built
    # channels first, (3, S, S), where numpy's broadcasting is fast.
    kind = str(rng.choice(list(BACKGROUNDS)))
    ys = np.arange(side, dtype=np.float32)[:, None]  # (S, 1)
    xs = np.arange(side, dtype=np.float32)[None, :]  # (1, S)
    tint = rng.uniform(-12, 12, size=3)
    if kind == "wall":
        # Stone blocks in running bond, each its own tone, with lighter mortar joints.
        height = side / rng.uniform(6, 11)
        width = height * rng.uniform(1.8, 2.6)
        row = np.floor(ys / height).astype(int)  # (S, 1)
        shifted = xs + (row % 2) * width / 2  # (S, S)
        col = np.floor(shifted / width).astype(int)
        tones = rng.normal(0, 9, size=(int(row.max()) + 1, int(col.max()) + 2)).astype(np.float32)
        base = (np.array([140, 134, 126]) + tint).astype(np.float32)
        image = base[:, None, None] + tones[row, col]  # (3, S, S)
        joint = max(1.0, side / 110)
        image[:, ((ys % height) < joint) | ((shifted % width) < joint)] = base[:, None] + 40  # mortar
        image += 6 * _smooth_noise(rng, side, (side // 6, side // 6))
    else:
        # A sky over ground: the horizon at 15-45% of the height, ground lighter towards it (haze).
        horizon = rng.uniform(0.15, 0.45) * side + np.tan(rng.uniform(-0.08, 0.08)) * (
            xs - side / 2
        )  # (1, S)
        sky = _vertical_ramp(side, np.array([95, 140, 205]) + tint, np.array([200, 215, 235]), 0, side * 0.45)
        sky = sky + 10 * _smooth_noise(rng, side, (3, 5))  # soft clouds, (3, S, S)
        grounds = {
            "grass": (84, 130, 58),
            "sand": (205, 182, 140),
            "snow": (226, 230, 238),
            "water": (55, 105, 145),
        }
        near = np.array(grounds[kind], dtype=np.float64) + tint
        ground = _vertical_ramp(side, near * 0.8 + 50, near * 0.85, side * 0.15, side)  # (3, S, 1)
        if kind == "grass":  # vertical blades
            texture = 16 * _smooth_noise(rng, side, (max(2, side // 10), max(2, side // 2)))
        elif kind == "sand":  # ripples
            texture = 7 * np.sin(
                2 * math.pi * (ys + 4 * _smooth_noise(rng, side, (4, 4))) / rng.uniform(5, 10)
            )
        elif kind == "water":  # horizontal glints
            texture = 22 * np.maximum(0, _smooth_noise(rng, side, (max(2, side // 2), max(2, side // 12))))
        else:  # snow drifts with a bluish shade
            shade = np.array([0.9, 0.95, 1.1], np.float32)[:, None, None]
            texture = 9 * _smooth_noise(rng, side, (4, 6)) * shade
        image = np.where(ys < horizon, sky, ground + texture)  # (3, S, S)
    image += 4 * rng.standard_normal((side, side), dtype=np.float32)
    return kind, np.ascontiguousarray(image.transpose(1, 2, 0))  # (S, S, 3)


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray) -> int:
    # Unnamed marks much smaller than a tiny object: lines, dots, rings, triangles, in any colour.
    side = canvas.shape[0]
    count = int(rng.integers(3, 13))
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))  # alpha 255 where a mark is drawn
    draw = ImageDraw.Draw(layer)
    width = max(1, round(side / 128))
    for _ in range(count):
        fill = (*(int(v) for v in rng.integers(20, 236, size=3)), 255)
        shape = int(rng.integers(4))
        x, y = rng.uniform(0, side, size=2)
        r = rng.uniform(0.01, 0.035) * side
        a, length = rng.uniform(0, math.pi), rng.uniform(0.03, 0.08) * side
        if shape == 0:
            draw.line([(x, y), (x + length * math.cos(a), y + length * math.sin(a))], fill=fill, width=width)
        elif shape == 1:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape == 2:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=fill, width=width)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    pixels = np.asarray(layer)  # (S, S, 4)
    chosen = pixels[..., 3] > 0
    canvas[chosen] = pixels[..., :3][chosen]
    return count


def _draw_object(
    kind: str, box: tuple[float, float, float, float], mirror: bool, side: int
) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
    # One object drawn in the pixel box (x, y, w, h): its tight integer box [x, y, w, h] in the image and its
    # (body, detail) boolean masks (h, w) over that box. Drawn on a small canvas around the box (lines may
    # stick out a little), clipped to the image.
    x0, y0, w, h = box
    left, top = max(0, math.floor(x0) - _MARGIN), max(0, math.floor(y0) - _MARGIN)
    right, bottom = min(side, math.ceil(x0 + w) + _MARGIN), min(side, math.ceil(y0 + h) + _MARGIN)
    canvas = Image.new("L", (right - left, bottom - top), 0)  # 1: body, 2: detail
    draw = ImageDraw.Draw(canvas)
    fills = {"body": 1, "cut": 0, "detail": 2}

    def point(u: float, v: float) -> tuple[float, float]:
        return x0 - left + (1 - u if mirror else u) * w, y0 - top + v * h

    for role, shape, geometry, *extra in _KINDS[kind][1]:  # cuts come before details in every kind
        fill = fills[role]
        if shape in ("rect", "ellipse"):
            (ax, ay), (bx, by) = point(geometry[0], geometry[1]), point(geometry[2], geometry[3])
            corners = (min(ax, bx), ay, max(ax, bx), by)
            (draw.rectangle if shape == "rect" else draw.ellipse)(corners, fill=fill)
        elif shape == "poly":
            draw.polygon([point(u, v) for u, v in geometry], fill=fill)
        else:
            width = max(1, round(extra[0] * min(w, h)))
            draw.line([point(u, v) for u, v in geometry], fill=fill, width=width)
    labels = np.asarray(canvas)
    if not labels.any():
        return (0, 0, 0, 0), labels > 0, labels > 0
    x, y, bw, bh = _mask_box(labels > 0)
    labels = labels[y : y + bh, x : x + bw]
    return (left + x, top + y, bw, bh), labels == 1, labels == 2


def _outline(mask: np.ndarray) -> np.ndarray:
    # Mask pixels with a 4-neighbour outside the mask.
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _paint(
    rng: np.random.Generator,
    region: np.ndarray,
    body: np.ndarray,
    detail: np.ndarray,
    color: str,
    pattern: str,
) -> None:
    # Paint an object into the image region (h, w, 3) of its box: the body (h, w) in its colour and pattern,
    # details and outline dark.
    h, w = body.shape
    extent = max(w, h)
    base = np.asarray(COLORS[color], dtype=np.float64) + rng.uniform(-10, 10, size=3)
    # The pattern is the colour lightened (dark colours) or darkened (light ones): visible on every colour.
    light = base @ np.array([0.299, 0.587, 0.114]) > 140
    tint = base * 0.5 if light else base + 0.55 * (255 - base)
    dark = base * 0.3
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    if pattern == "striped":
        period = max(3.0, extent / 5)
        marks = ((xx * cos + yy * sin) / period) % 1 < 0.5  # (h, w)
    elif pattern == "dotted":
        spacing = max(4.0, extent / 4.5)
        dx, dy = (xx % spacing) - spacing / 2, (yy % spacing) - spacing / 2
        marks = dx * dx + dy * dy <= max(1.0, 0.3 * spacing) ** 2  # (h, w)
    else:
        marks = np.zeros((h, w), dtype=bool)
    # Light from one side across the object: a gentle shade, as on a rounded surface.
    shade = 1.0 + 0.12 * ((xx - w / 2) * sin - (yy - h / 2) * cos) / extent  # (h, w)
    fill = np.where(marks[..., None], tint, base) * shade[..., None]  # (h, w, 3)
    region[body] = fill[body]
    region[detail] = dark
    region[_outline(body | detail)] = dark


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _boxes_touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return (
        a[0] < b[0] + b[2] + gap
        and b[0] < a[0] + a[2] + gap
        and a[1] < b[1] + b[3] + gap
        and b[1] < a[1] + a[3] + gap
    )


def _pick_attributes(
    rng: np.random.Generator, placed: Sequence[tuple[str, str, str, str]]
) -> tuple[str, str, str, str]:
    # Mostly a kind not in the image yet; sometimes a second or third of a kind already there (so that captions
    # must tell them apart by attributes, or count them). No two objects share all four values.
    kinds = [p[0] for p in placed]
    repeatable = [k for k in dict.fromkeys(kinds) if kinds.count(k) < 3]
    fresh = [k for k in OBJECTS if k not in kinds]
    pool = repeatable if repeatable and (rng.random() < 0.25 or not fresh) else fresh
    kind = pool[int(rng.integers(len(pool)))]
    colors = list(COLORS)
    while True:
        c, p, z = rng.integers((len(colors), len(PATTERNS), len(SIZES)))
        choice = (kind, colors[c], PATTERNS[p], SIZES[z])
        if choice not in placed:
            return choice


def _lighting(rng: np.random.Generator, side: int) -> np.ndarray:
    # Illumination falling off across the frame and a vignette: (S, S, 1) factors around 1.
    t = (np.arange(side, dtype=np.float32) + 0.5) / side - 0.5
    ys, xs = t[:, None], t[None, :]  # (S, 1), (1, S)
    a = rng.uniform(0, 2 * math.pi)
    ramp = 1 + rng.uniform(0.05, 0.15) * 2 * (xs * math.cos(a) + ys * math.sin(a))  # (S, S)
    vignette = 1 - rng.uniform(0.05, 0.2) * 2 * (xs * xs + ys * ys)  # (S, S)
    return (ramp * vignette)[..., None]


def make_scene(rng: np.random.Generator, side: int = 128) -> Scene:
    """Draw one scene of 2-6 objects on a photo-like background with clutter (see the module docstring).

    Every object lies inside the image and keeps at least 55% of its pixels visible; two objects of a kind never
    touch; at least two objects are always placed.
    """
    if side < 32:
        raise ValueError(f"image side must be >= 32 pixels, got {side}")
    background, canvas = _background(rng, side)
    clutter = _draw_clutter(rng, canvas)
    empty = canvas.copy()
    wanted = int(rng.integers(2, 7))
    placed: list[tuple[str, str, str, str]] = []
    boxes: list[tuple[int, int, int, int]] = []
    areas: list[int] = []
    visible: list[np.ndarray] = []  # (S, S) each: the pixels of each object not hidden by later ones
    in_front: set[tuple[int, int]] = set()
    gap = max(2, side // 32)
    for slot in range(wanted + 3):
        if len(placed) == wanted or (slot >= wanted and len(placed) >= 2):
            break
        kind, color, pattern, size = _pick_attributes(rng, placed)
        aspect = _KINDS[kind][0]
        mirror = bool(rng.random() < 0.5)
        # A third of the objects are put close to one already placed, so that they overlap (occlusion).
        anchor = boxes[int(rng.integers(len(boxes)))] if boxes and rng.random() < 0.35 else None
        for attempt in range(_PLACEMENT_TRIES):
            smaller = SIZES[max(0, SIZES.index(size) - 1)]
            if attempt == _PLACEMENT_TRIES // 2 and (kind, color, pattern, smaller) not in placed:
                size = smaller  # a crowded scene: one size smaller fits more easily
            extent = rng.uniform(*_SIZE_RANGES[size]) * side
            w, h = (extent, extent / aspect) if aspect >= 1 else (extent * aspect, extent)
            if anchor is None:
                x, y = rng.uniform(0, side - w), rng.uniform(0, side - h)
            else:
                ax, ay, aw, ah = anchor
                x = np.clip(ax + aw / 2 + rng.uniform(-0.8, 0.8) * (aw + w) / 2 - w / 2, 0, side - w)
                y = np.clip(ay + ah / 2 + rng.uniform(-0.8, 0.8) * (ah + h) / 2 - h / 2, 0, side - h)
            box, body, detail = _draw_object(kind, (x, y, w, h), mirror, side)
            mask = body | detail  # (h, w) over the box
            if not mask.any():
                continue
            window = np.s_[box[1] : box[1] + box[3], box[0] : box[0] + box[2]]
            hidden = [int((v[window] & mask).sum()) for v in visible]
            if all(
                v.sum() - k >= (1 - _MAX_HIDDEN) * a for v, k, a in zip(visible, hidden, areas)
            ) and not any(p[0] == kind and _boxes_touch(box, b, gap) for p, b in zip(placed, boxes)):
                break
        else:
            continue
        in_front.update((len(placed), j) for j, (k, a) in enumerate(zip(hidden, areas)) if k >= _IN_FRONT * a)
        for v in visible:
            v[window] &= ~mask
        visible.append(np.zeros((side, side), dtype=bool))
        visible[-1][window] = mask
        placed.append((kind, color, pattern, size))
        boxes.append(box)
        areas.append(int(mask.sum()))
        _paint(rng, canvas[window], body, detail, color, pattern)
    light = _lighting(rng, side)
    grain = 3 * rng.standard_normal((side, side, 1), dtype=np.float32)  # luminance grain
    objects = tuple(
        SceneObject(*p, b, a, round(float(v.sum()) / a, 3))
        for p, b, a, v in zip(placed, boxes, areas, visible)
    )
    return Scene(
        np.clip(canvas * light + grain, 0, 255).astype(np.uint8),
        np.clip(empty * light + grain, 0, 255).astype(np.uint8),
        background,
        clutter,
        objects,
        frozenset(in_front),
    )


# ------------------------------------------------------------------------------------------ captions
@dataclass(frozen=True)
class _Named:
    # What a caption names: one object or all objects of a kind (their indices), its phrase and its mention.
    phrase: str
    members: tuple[int, ...]
    mention: str

    @property
    def plural(self) -> bool:
        return len(self.members) > 1


def _single(rng: np.random.Generator, objects: Sequence[SceneObject], index: int) -> _Named:
    # The fewest attributes that single the object out among its kind, then each other one with chance 0.45.
    obj = objects[index]
    rivals = [o for j, o in enumerate(objects) if j != index and o.kind == obj.kind]
    chosen: set[str] = set()
    for name in (str(n) for n in rng.permutation(["size", "pattern", "color"])):
        confused = [r for r in rivals if all(r.attribute(a) == obj.attribute(a) for a in chosen)]
        if confused:
            if any(r.attribute(name) != obj.attribute(name) for r in confused):
                chosen.add(name)
        elif rng.random() < 0.45:
            chosen.add(name)
    words = [obj.attribute(a) for a in ("size", "pattern", "color") if a in chosen]
    phrase = " ".join([*words, obj.kind])
    return _Named(phrase, (index,), ("an " if phrase[0] in "aeiou" else "a ") + phrase)


def _group(objects: Sequence[SceneObject], kind: str) -> _Named:
    members = tuple(j for j, o in enumerate(objects) if o.kind == kind)
    phrase = f"{_NUMBERS[len(members)]} {_PLURALS[kind]}"
    return _Named(phrase, members, phrase)


def _relations(a: int, b: int, scene: Scene, side: int) -> list[str]:
    # The relations that hold from object a to object b, by box centres, gaps and occlusion.
    oa, ob = scene.objects[a], scene.objects[b]
    (ax, ay), (bx, by) = oa.center, ob.center
    margin = 0.1 * side
    found = []
    if ay < by - margin:
        found.append("above")
    if ay > by + margin:
        found.append("under")
    if ax < bx - margin:
        found.append("on the left of")
    if ax > bx + margin:
        found.append("on the right of")
    (x0, y0, w0, h0), (x1, y1, w1, h1) = oa.bbox, ob.bbox
    gap = max(x0, x1) - min(x0 + w0, x1 + w1)
    overlap = min(y0 + h0, y1 + h1) - max(y0, y1)
    if 0 <= gap <= 0.1 * side and overlap >= 0.5 * min(h0, h1):
        found.append("next to")
    if (a, b) in scene.in_front:
        found.append("in front of")
    if (b, a) in scene.in_front:
        found.append("behind")
    return found


def make_caption(rng: np.random.Generator, scene: Scene, side: int) -> tuple[str, list[_Named]]:
    """A caption naming 1-3 things of ``scene`` (objects, or every object of a kind), and what it names."""
    objects = scene.objects
    kinds = [o.kind for o in objects]
    units: list[_Named] = []
    for kind in dict.fromkeys(kinds):
        members = [j for j, k in enumerate(kinds) if k == kind]
        if len(members) > 1 and rng.random() < 0.5:
            units.append(_group(objects, kind))
        else:
            units.extend(_single(rng, objects, j) for j in members)
    count = min(int(rng.choice([1, 2, 3], p=[0.25, 0.45, 0.3])), len(units))
    named = [units[int(j)] for j in rng.permutation(len(units))[:count]]
    singles = {n.members[0]: n for n in units if not n.plural}
    overlapping = sorted((a, b) for a, b in scene.in_front if a in singles and b in singles)
    if count >= 2 and overlapping and rng.random() < 0.5:
        # Half the time an overlapping pair leads, so that "in front of" and "behind" are often said.
        pair = [singles[j] for j in overlapping[int(rng.integers(len(overlapping)))]]
        if rng.random() < 0.5:
            pair.reverse()
        named = pair + [n for n in named if n not in pair][: count - 2]
    m = [n.mention for n in named]
    be = "are" if named[0].plural else "is"
    where = BACKGROUNDS[scene.background]
    templates: list[str]
    relations: list[str] = []
    if count >= 2 and not named[0].plural and not named[1].plural:
        relations = _relations(named[0].members[0], named[1].members[0], scene, side)
    if count == 1:
        templates = [
            f"there {be} {m[0]}",
            f"a photo of {m[0]} {where}",
            f"{m[0]} {where}",
            f"{m[0]} in the scene",
            f"{_NUMBERS[len(objects)]} objects {where}, among them {m[0]}",
        ]
    elif relations and rng.random() < 0.65:
        # the relations read off depth and adjacency are rarer in scenes: prefer them when they hold
        weights = np.array([3.0 if r in ("next to", "in front of", "behind") else 1.0 for r in relations])
        rel = relations[int(rng.choice(len(relations), p=weights / weights.sum()))]
        templates = (
            [f"{m[0]} {rel} {m[1]}", f"there {be} {m[0]} {rel} {m[1]}", f"{m[0]} {rel} {m[1]} {where}"]
            if count == 2
            else [f"{m[0]} {rel} {m[1]}, and {m[2]}", f"{m[0]} {rel} {m[1]}, with {m[2]} {where}"]
        )
    elif count == 2:
        templates = [
            f"{m[0]} and {m[1]}",
            f"a photo of {m[0]} and {m[1]} {where}",
            f"a scene with {m[0]} and {m[1]}",
        ]
    else:
        templates = [
            f"{m[0]}, {m[1]} and {m[2]}",
            f"{m[0]}, {m[1]} and {m[2]} {where}",
            f"there {be} {m[0]}, {m[1]} and {m[2]}",
        ]
    return str(rng.choice(templates)), named


# ------------------------------------------------------------------------------------------ samples
def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_STREAM, seed, split, index]))


def scene_sample(index: int, *, seed: int = 0, split: int = 0, image_size: int = 128) -> ShardSample:
    """Sample ``index`` of a split: a JPEG scene, its caption and metadata (named phrases' boxes, label, word
    classes). The result depends only on the arguments: the same call always returns identical bytes."""
    rng = _rng(seed, split, index)
    scene = make_scene(rng, image_size)
    caption, named = make_caption(rng, scene, image_size)
    objects = scene.objects
    largest = max(objects, key=lambda o: o.bbox[2] * o.bbox[3])
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    meta: dict[str, Any] = {
        "width": image_size,
        "height": image_size,
        "boxes": [
            {"phrase": n.phrase, "bbox": list(objects[j].bbox), "type": "group" if n.plural else "object"}
            for n in named
            for j in n.members
        ],
        "label": OBJECTS.index(largest.kind),
        "objects": [
            {
                "kind": o.kind,
                "color": o.color,
                "pattern": o.pattern,
                "size": o.size,
                "bbox": list(o.bbox),
                "visible": o.visible,
            }
            for o in objects
        ],
        "background": scene.background,
        "clutter": scene.clutter,
        "caption_source": "synth_scenes",
        "word_classes": word_class_map(caption, WORD_CLASSES),
    }
    return ShardSample(buf.getvalue(), "jpg", caption, meta)


def write_scenes_split(out_dir: str | Path, num_samples: int, **kwargs: Any) -> dict[str, int]:
    """Write ``num_samples`` scene samples as shards + ``sizes.json`` into ``out_dir``; the options and the
    resumable, worker-count-independent output of :func:`~volta.data.synth.write_synth_split`."""
    return write_synth_split(out_dir, num_samples, sample_fn=scene_sample, **kwargs)


def write_scenes_dataset(out_dir: str | Path, **kwargs: Any) -> dict[str, dict[str, int]]:
    """Write ``out_dir/train``, ``out_dir/val`` and ``out_dir/tokenizer`` of the scenes dataset, as
    :func:`~volta.data.synth.write_synth_dataset` does for the shapes dataset (same options)."""
    return write_synth_dataset(out_dir, sample_fn=scene_sample, **kwargs)
