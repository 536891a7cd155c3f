"""Inputs that ``volta data`` turns into shards: images with a captions table, COCO annotations, and the
paper's data (COCO with the Karpathy split file, Visual Genome region descriptions).

Each source yields lightweight records (a path, a caption, metadata) in a stable order; :func:`encode_record`
reads and encodes the image only when a writer needs it, so resuming a conversion skips the image work of
shards already on disk. Several captions for one image give one sample per caption with the same image bytes.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
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
    "karpathy_coco_ids",
    "karpathy_records",
    "read_caption_table",
    "visual_genome_records",
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
    return _image_size(path) is not None


def _image_size(path: Path) -> tuple[int, int] | None:
    # (width, height) from the header; None for a missing file, a non-image or an empty image.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def _read_json(path: str | Path, what: str) -> Any:
    source = Path(path)
    if not source.is_file():
        raise SourceError(f"{what} not found: {source}")
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SourceError(f"{source}: not valid JSON ({err})") from err


def _load_json(path: str | Path, what: str) -> dict[str, Any]:
    source = Path(path)
    data = _read_json(source, what)
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


# ------------------------------------------------------------------------------- the paper's data
KARPATHY_TRAIN_SPLITS = ("train", "restval")
KARPATHY_EVAL_SPLITS = ("val", "test")
_KARPATHY_FORMAT = (
    'expected {"images": [{"filepath", "filename", "split", "cocoid", "sentences": [{"raw"}, ...]}, ...]}'
)
_VG_REGIONS_FORMAT = (
    'expected a list of {"id", "regions": [{"region_id", "phrase", "x", "y", "width", "height"}, ...]}'
)
_VG_IMAGE_DATA_FORMAT = 'expected a list of {"image_id", "width", "height", "url", "coco_id"}'


def _field(entry: Any, *keys: str) -> Any:
    # The first of ``keys`` present (and not null) in a JSON object; ValueError naming them all otherwise.
    if isinstance(entry, dict):
        for key in keys:
            if entry.get(key) is not None:
                return entry[key]
    raise ValueError(f"no {' or '.join(repr(k) for k in keys)}")


@dataclass(frozen=True, slots=True)
class _KarpathyImage:
    image_id: int
    relpath: str  # "filepath/filename", relative to the images root
    split: str
    sentences: tuple[tuple[int, str], ...]  # (sentence id, caption)


def _read_karpathy(split_file: str | Path) -> list[_KarpathyImage]:
    source = Path(split_file)
    data = _read_json(source, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{source}: not a Karpathy split file ({_KARPATHY_FORMAT})")
    images = []
    for i, entry in enumerate(data["images"]):
        try:
            filepath = str(entry.get("filepath") or "") if isinstance(entry, dict) else ""
            sentences = _field(entry, "sentences")
            if not isinstance(sentences, list):
                raise ValueError("'sentences' is not a list")
            captions = tuple(
                (int(s.get("sentid", j)) if isinstance(s, dict) else j, str(_field(s, "raw")).strip())
                for j, s in enumerate(sentences)
            )
            images.append(
                _KarpathyImage(
                    int(_field(entry, "cocoid", "imgid")),  # Flickr30k's file has imgid and no filepath
                    str(PurePosixPath(filepath) / str(_field(entry, "filename"))),
                    str(_field(entry, "split")),
                    tuple(c for c in captions if c[1]),
                )
            )
        except (TypeError, ValueError) as err:
            raise SourceError(f"{source}: images[{i}]: {err} ({_KARPATHY_FORMAT})") from err
    return images


def _select_splits(
    images: list[_KarpathyImage], splits: Collection[str], source: Path
) -> list[_KarpathyImage]:
    present = {image.split for image in images}
    unknown = sorted(set(splits) - present)
    if not splits or unknown:
        raise SourceError(
            f"{source}: no image in split {', '.join(unknown) or '(none asked for)'} "
            f"(the file has {', '.join(sorted(present)) or 'no images'})"
        )
    return [image for image in images if image.split in splits]


def karpathy_records(
    split_file: str | Path, images_root: str | Path, splits: Collection[str] = KARPATHY_TRAIN_SPLITS
) -> Iterator[SourceRecord]:
    """Records of the images of ``splits`` in a Karpathy split file (``dataset_coco.json``), one per sentence.

    Images are ``images_root/filepath/filename`` (``val2014/COCO_val2014_...jpg`` under the COCO root), in file
    order; a missing or unreadable image is skipped with a warning and counted. ``image_id`` (the COCO id),
    ``caption_id`` (``sentid``), ``split`` and ``source`` are kept in the metadata. Raises
    :class:`SourceError` for an unusable file or a split the file does not have.
    """
    root = Path(images_root)
    if not root.is_dir():
        raise SourceError(f"images folder not found: {root}")
    images = _select_splits(_read_karpathy(split_file), splits, Path(split_file))
    return _karpathy_records(root, images)


def karpathy_coco_ids(
    split_file: str | Path, splits: Collection[str] = KARPATHY_EVAL_SPLITS
) -> frozenset[int]:
    """The COCO ids of the images in ``splits`` of a Karpathy split file (by default its val and test images)."""
    return frozenset(
        image.image_id for image in _select_splits(_read_karpathy(split_file), splits, Path(split_file))
    )


def _karpathy_records(root: Path, images: list[_KarpathyImage]) -> Iterator[SourceRecord]:
    missing = 0
    for image in images:
        path = root / image.relpath
        if not path.is_file() or not _readable(path):
            missing += 1
            log.warning("skipping image %d: %s missing or not an image", image.image_id, path)
            continue
        for sentence_id, caption in image.sentences:
            meta = {
                "image_id": image.image_id,
                "caption_id": sentence_id,
                "split": image.split,
                "source": image.relpath,
            }
            yield SourceRecord(path, caption, meta)
    if missing:
        log.warning("%d of %d images of the Karpathy split are missing or unreadable", missing, len(images))


@dataclass(frozen=True, slots=True)
class _VGRegion:
    region_id: int
    phrase: str  # whitespace collapsed
    box: tuple[float, float, float, float]  # x, y, w, h in pixels of the image_data size


@dataclass(frozen=True, slots=True)
class _VGImageInfo:
    coco_id: int | None
    size: tuple[float, float] | None  # (width, height) the region boxes refer to
    relpath: str | None  # "VG_100K_2/1.jpg", from the url


def _read_vg_regions(regions_file: str | Path) -> dict[int, list[_VGRegion]]:
    source = Path(regions_file)
    data = _read_json(source, "region descriptions file")
    if not isinstance(data, list):
        raise SourceError(f"{source}: not a Visual Genome region descriptions file ({_VG_REGIONS_FORMAT})")
    regions: dict[int, list[_VGRegion]] = defaultdict(list)
    for i, entry in enumerate(data):
        try:
            image_regions = _field(entry, "regions")
            if not isinstance(image_regions, list):
                raise ValueError("'regions' is not a list")
            if not image_regions:
                continue  # an image without regions gives no sample
            image_id = _vg_image_id(entry, image_regions[0])
            for region in image_regions:
                phrase = " ".join(str(_field(region, "phrase")).split())
                x, y, w, h = (float(_field(region, key)) for key in ("x", "y", "width", "height"))
                if phrase:
                    region_id = int(_field(region, "region_id", "id"))
                    regions[image_id].append(_VGRegion(region_id, phrase, (x, y, w, h)))
        except (TypeError, ValueError) as err:
            raise SourceError(f"{source}: entry {i}: {err} ({_VG_REGIONS_FORMAT})") from err
    return regions


def _vg_image_id(entry: dict[str, Any], first_region: Any) -> int:
    # The entry's own id ("id" in VG 1.2, "image_id" in some copies), else the image_id its regions carry.
    for key in ("id", "image_id"):
        if entry.get(key) is not None:
            return int(entry[key])
    return int(_field(first_region, "image_id"))


def _read_vg_image_data(image_data: str | Path) -> dict[int, _VGImageInfo]:
    source = Path(image_data)
    data = _read_json(source, "image data file")
    if not isinstance(data, list):
        raise SourceError(f"{source}: not a Visual Genome image data file ({_VG_IMAGE_DATA_FORMAT})")
    infos = {}
    for i, entry in enumerate(data):
        try:
            image_id = int(_field(entry, "image_id", "id"))
            coco_id = entry.get("coco_id")
            width, height = entry.get("width"), entry.get("height")
            url = entry.get("url")
            infos[image_id] = _VGImageInfo(
                None if coco_id is None else int(coco_id),
                None if width is None or height is None else (float(width), float(height)),
                "/".join(str(url).rstrip("/").split("/")[-2:]) if url else None,
            )
        except (TypeError, ValueError) as err:
            raise SourceError(f"{source}: entry {i}: {err} ({_VG_IMAGE_DATA_FORMAT})") from err
    return infos


def visual_genome_records(
    regions_file: str | Path,
    images_dir: str | Path,
    image_data: str | Path | None = None,
    *,
    exclude_coco_ids: Collection[int] = (),
    max_phrases_per_image: int | None = None,
) -> Iterator[SourceRecord]:
    """Records from Visual Genome region descriptions: one per distinct phrase of an image, with its boxes.

    The caption is the region phrase and ``boxes`` holds ``{"phrase": caption, "bbox": [x, y, w, h], "type":
    "vg_region"}`` for every region of the image with that phrase (case-insensitive), clipped to the image, so
    the pointing game grounds the whole caption. Images are found as ``images_dir/{id}.jpg``, under
    ``VG_100K/`` or ``VG_100K_2/``, or at the path in the ``image_data`` url; with ``image_data`` boxes are
    rescaled when the file's size differs from the recorded one, ``coco_id`` is kept, and images whose
    ``coco_id`` is in ``exclude_coco_ids`` (e.g. :func:`karpathy_coco_ids`: no test leakage) are left out.
    Images in id order, phrases in region-id order, at most ``max_phrases_per_image`` each. Missing images are
    skipped and counted. Raises :class:`SourceError` on unusable inputs.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise SourceError(f"images folder not found: {root}")
    if exclude_coco_ids and image_data is None:
        raise SourceError("excluding COCO images needs image_data.json: it holds each Visual Genome coco_id")
    if max_phrases_per_image is not None and max_phrases_per_image < 1:
        raise SourceError(f"max_phrases_per_image must be >= 1, got {max_phrases_per_image}")
    regions = _read_vg_regions(regions_file)
    infos = {} if image_data is None else _read_vg_image_data(image_data)
    return _vg_records(root, regions, infos, frozenset(exclude_coco_ids), max_phrases_per_image)


def _vg_image_path(root: Path, image_id: int, info: _VGImageInfo | None) -> Path | None:
    names = [f"{image_id}.jpg", f"VG_100K/{image_id}.jpg", f"VG_100K_2/{image_id}.jpg"]
    if info is not None and info.relpath:
        names = [info.relpath, info.relpath.rsplit("/", 1)[-1], *names]
    return next((root / name for name in names if (root / name).is_file()), None)


def _clip_box(
    box: tuple[float, float, float, float], scale: tuple[float, float], size: tuple[int, int]
) -> list[float] | None:
    # VG boxes may reach past the image; the part inside it, in the file's pixels, or None when nothing is.
    x, y, w, h = box
    x0, y0 = max(0.0, x * scale[0]), max(0.0, y * scale[1])
    x1, y1 = min(float(size[0]), (x + w) * scale[0]), min(float(size[1]), (y + h) * scale[1])
    if x1 <= x0 or y1 <= y0:
        return None
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _vg_records(
    root: Path,
    regions: dict[int, list[_VGRegion]],
    infos: dict[int, _VGImageInfo],
    exclude: frozenset[int],
    max_phrases: int | None,
) -> Iterator[SourceRecord]:
    missing = excluded = empty = 0
    for image_id in sorted(regions):
        info = infos.get(image_id)
        if info is not None and info.coco_id is not None and info.coco_id in exclude:
            excluded += 1
            continue
        path = _vg_image_path(root, image_id, info)
        size = None if path is None else _image_size(path)
        if path is None or size is None:
            missing += 1
            where = path or root / f"{image_id}.jpg"
            log.warning("skipping Visual Genome image %d: %s missing or not an image", image_id, where)
            continue
        # The boxes are in pixels of the recorded size; a downscaled copy of the image scales them.
        scale = (
            (1.0, 1.0)
            if info is None or info.size is None
            else (size[0] / info.size[0], size[1] / info.size[1])
        )
        by_phrase: dict[str, list[_VGRegion]] = {}
        for region in sorted(regions[image_id], key=lambda r: r.region_id):
            by_phrase.setdefault(region.phrase.lower(), []).append(region)
        written = 0
        for group in by_phrase.values():
            caption = group[0].phrase
            kept = [(r.region_id, b) for r in group if (b := _clip_box(r.box, scale, size)) is not None]
            if not kept:
                empty += 1
                continue
            meta: dict[str, Any] = {
                "image_id": image_id,
                "region_ids": [region_id for region_id, _ in kept],
                "source": path.relative_to(root).as_posix(),
                "boxes": [{"phrase": caption, "bbox": bbox, "type": "vg_region"} for _, bbox in kept],
            }
            if info is not None and info.coco_id is not None:
                meta["coco_id"] = info.coco_id
            yield SourceRecord(path, caption, meta)
            written += 1
            if max_phrases is not None and written >= max_phrases:
                break
    if excluded:
        log.info("left out %d Visual Genome images whose coco_id is excluded", excluded)
    if empty:
        log.warning("dropped %d phrases whose boxes lie outside their image", empty)
    if missing:
        log.warning("%d of %d Visual Genome images are missing or unreadable", missing, len(regions))


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
