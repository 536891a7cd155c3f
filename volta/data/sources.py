"""Inputs that ``volta data`` turns into shards: images with a captions table, and COCO annotations.

Each source yields lightweight records (a path, a caption, metadata) in a stable order; :func:`encode_record`
reads and encodes the image only when a writer needs it, so resuming a conversion skips the image work of
shards already on disk. Several captions for one image give one sample per caption with the same image bytes.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volta.data.writers import ShardSample, encode_image, scale_boxes

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_COLUMNS",
    "SourceError",
    "SourceRecord",
    "coco_records",
    "encode_record",
    "folder_records",
    "read_caption_table",
]

IMAGE_COLUMNS = ("image", "file", "filename", "file_name", "path")
CAPTION_COLUMNS = ("caption", "text")


class SourceError(ValueError):
    """An input the user must fix (missing file, unknown columns, malformed annotations): one-line message."""


@dataclass(frozen=True)
class SourceRecord:
    """One future sample: the image file, its caption and metadata (boxes in pixels of the original image)."""

    image_path: Path
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def _pick_column(names: list[str], choices: tuple[str, ...], what: str, source: Path) -> str:
    lowered = {n.strip().lower(): n for n in names}
    for choice in choices:
        if choice in lowered:
            return lowered[choice]
    raise SourceError(
        f"{source}: no {what} column (expected one of {', '.join(choices)}; found {', '.join(names)})"
    )


def read_caption_table(path: str | Path) -> list[tuple[str, str]]:
    """Read ``(image, caption)`` pairs from a CSV (header row) or JSONL file; several rows may share an image.

    The image column/key is one of ``image, file, filename, file_name, path``, the caption one of ``caption,
    text``. A JSONL ``caption`` may also be a list of captions. Raises :class:`SourceError` on a missing file,
    unknown columns or malformed lines.
    """
    source = Path(path)
    if not source.is_file():
        raise SourceError(f"captions file not found: {source}")
    pairs: list[tuple[str, str]] = []
    if source.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        with source.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise SourceError(f"{source}:{lineno}: not valid JSON ({err})") from err
                if not isinstance(row, dict):
                    raise SourceError(f"{source}:{lineno}: expected a JSON object per line")
                image_key = _pick_column(list(row), IMAGE_COLUMNS, "image", source)
                caption_key = _pick_column(list(row), CAPTION_COLUMNS, "caption", source)
                captions = row[caption_key]
                for caption in captions if isinstance(captions, list) else [captions]:
                    pairs.append((str(row[image_key]), str(caption)))
    else:
        with source.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise SourceError(
                    f"{source}: empty CSV (expected a header row with image and caption columns)"
                )
            image_key = _pick_column(list(reader.fieldnames), IMAGE_COLUMNS, "image", source)
            caption_key = _pick_column(list(reader.fieldnames), CAPTION_COLUMNS, "caption", source)
            for row in reader:
                pairs.append((str(row[image_key]), str(row[caption_key] or "")))
    return pairs


def folder_records(images_dir: str | Path, captions_path: str | Path) -> Iterator[SourceRecord]:
    """Records for a folder of images described by a captions CSV/JSONL (image paths relative to the folder).

    Rows whose image file is missing or not an image are skipped with a warning; the file name is kept as
    ``source`` in the metadata. Raises :class:`SourceError` when the folder or the table is unusable.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise SourceError(f"images folder not found: {root}")
    return _folder_records(root, read_caption_table(captions_path))


def _folder_records(root: Path, pairs: list[tuple[str, str]]) -> Iterator[SourceRecord]:
    missing = 0
    for image, caption in pairs:
        path = root / image
        if not path.is_file() or not _readable(path):
            missing += 1
            log.warning("skipping %s: missing or not an image", path)
            continue
        yield SourceRecord(path, caption.strip(), {"source": image})
    if missing:
        log.warning("%d of %d captions name a missing or unreadable image", missing, len(pairs))


def _readable(path: Path) -> bool:
    # Header check only (cheap): a file that is not an image at all is dropped at listing time, so the sample
    # order, and with it the shard layout used to resume a conversion, never depends on a later failure.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size[0] > 0 and image.size[1] > 0
    except (UnidentifiedImageError, OSError):
        return False


def _load_json(path: str | Path, what: str) -> dict[str, Any]:
    source = Path(path)
    if not source.is_file():
        raise SourceError(f"{what} not found: {source}")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SourceError(f"{source}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or "annotations" not in data:
        raise SourceError(f"{source}: not a COCO annotation file (no 'annotations')")
    return data


def _phrase_in(phrase: str, caption: str) -> bool:
    # Whole-word match so "cat" does not match "catalogue"; plural "s"/"es" also counts ("dogs").
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    target = phrase.lower().split()
    n = len(target)
    for i in range(len(words) - n + 1):
        window = words[i : i + n]
        if window[:-1] == target[:-1] and window[-1] in (target[-1], target[-1] + "s", target[-1] + "es"):
            return True
    return False


def coco_records(
    captions_path: str | Path, images_dir: str | Path, instances_path: str | Path | None = None
) -> Iterator[SourceRecord]:
    """Records from COCO caption annotations, one per caption, in image-id then annotation-id order.

    With an instances file, each caption carries the boxes of the image's objects whose category name occurs
    in the caption (``{"phrase": name, "bbox": [x, y, w, h], "type": "coco_category"}``). ``image_id`` and
    ``caption_id`` are kept in the metadata. Raises :class:`SourceError` on unusable inputs.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise SourceError(f"images folder not found: {root}")
    captions = _load_json(captions_path, "captions file")
    instances = None if instances_path is None else _load_json(instances_path, "instances file")
    try:
        files, by_image, objects = _index_coco(captions, instances)
    except (KeyError, TypeError, ValueError) as err:
        raise SourceError(f"malformed COCO annotations: missing or bad field {err}") from err
    return _coco_records(root, files, by_image, objects if instances is not None else None)


_CocoIndex = tuple[dict[int, str], dict[int, list[tuple[int, str]]], dict[int, list[tuple[str, list[float]]]]]


def _index_coco(captions: dict[str, Any], instances: dict[str, Any] | None) -> _CocoIndex:
    files = {int(img["id"]): str(img["file_name"]) for img in captions.get("images", [])}
    by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ann in captions["annotations"]:
        by_image[int(ann["image_id"])].append((int(ann.get("id", 0)), str(ann["caption"]).strip()))
    objects: dict[int, list[tuple[str, list[float]]]] = defaultdict(list)
    if instances is not None:
        names = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}
        for ann in sorted(instances["annotations"], key=lambda a: int(a.get("id", 0))):
            name = names.get(int(ann["category_id"]))
            if name is not None and not ann.get("iscrowd", 0):
                bbox = [float(v) for v in ann["bbox"]]
                if len(bbox) != 4:
                    raise ValueError(f"bbox {bbox}")
                objects[int(ann["image_id"])].append((name, bbox))
    return files, by_image, objects


def _coco_records(
    root: Path,
    files: dict[int, str],
    by_image: dict[int, list[tuple[int, str]]],
    objects: dict[int, list[tuple[str, list[float]]]] | None,
) -> Iterator[SourceRecord]:
    missing = 0
    for image_id in sorted(by_image):
        file_name = files.get(image_id, f"{image_id:012d}.jpg")
        path = root / file_name
        if not path.is_file() or not _readable(path):
            missing += 1
            log.warning("skipping image %d: %s missing or not an image", image_id, path)
            continue
        for caption_id, caption in sorted(by_image[image_id]):
            meta: dict[str, Any] = {"image_id": image_id, "caption_id": caption_id, "source": file_name}
            if objects is not None:
                meta["boxes"] = [
                    {"phrase": name, "bbox": bbox, "type": "coco_category"}
                    for name, bbox in objects.get(image_id, [])
                    if _phrase_in(name, caption)
                ]
            yield SourceRecord(path, caption, meta)
    if missing:
        log.warning("%d images named in the captions file are missing or unreadable", missing)


def encode_record(record: SourceRecord, max_size: int | None = None) -> ShardSample:
    """Read and encode a record's image (original bytes unless resized) into a :class:`ShardSample`.

    Boxes are rescaled with the image. An unreadable image raises ``ValueError`` naming the file.
    """
    try:
        encoded = encode_image(record.image_path.read_bytes(), max_size=max_size)
    except ValueError as err:
        raise ValueError(f"{record.image_path}: {err}") from err
    meta = dict(record.meta)
    meta["width"], meta["height"] = encoded.width, encoded.height
    if "boxes" in meta and encoded.scale != 1.0:
        meta["boxes"] = scale_boxes(meta["boxes"], encoded.scale)
    return ShardSample(encoded.data, encoded.ext, record.caption, meta)
