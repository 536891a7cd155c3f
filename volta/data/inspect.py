"""Read shard sets raw (tarfile, local or S3) and report on them: counts, caption lengths, corrupt samples.

This is the checking side of ``volta data``: it trusts nothing, so every image is decoded, every caption must
be non-empty UTF-8 and every JSON an object whose boxes lie inside the image. It can also draw a grid of
samples with their captions and boxes, to see what a dataset holds before training on it.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
import tarfile
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from volta.data.s3 import S3Location
from volta.data.writers import IMAGE_EXTENSIONS, SIZES_FILE

log = logging.getLogger(__name__)

__all__ = [
    "CAPTION_BINS",
    "RawSample",
    "check_sample",
    "draw_grid",
    "format_report",
    "inspect_shards",
    "iter_captions",
    "iter_raw_samples",
    "list_shards",
    "read_manifest",
]

# Caption length bins in words: (label, lowest, highest) inclusive.
CAPTION_BINS: tuple[tuple[str, int, int], ...] = (
    ("0", 0, 0),
    ("1-5", 1, 5),
    ("6-10", 6, 10),
    ("11-15", 11, 15),
    ("16-20", 16, 20),
    ("21-30", 21, 30),
    ("31-50", 31, 50),
    ("51+", 51, 1 << 30),
)
_MAX_LISTED_PROBLEMS = 100


@dataclass
class RawSample:
    """The members of one sample as stored: shard name, key and ``{extension: bytes}``."""

    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- locations
def list_shards(path: str, *, s3: S3Location | None = None) -> list[str]:
    """The ``.tar`` shards of a location, sorted: a local folder, one local tar, or ``s3://bucket/prefix``.

    Raises ``FileNotFoundError`` when the location holds no shard.
    """
    if path.startswith("s3://"):
        from volta.data.s3 import make_s3_client, split_s3_url

        bucket, key = split_s3_url(path)
        if key.endswith(".tar"):
            return [path]
        prefix = key.rstrip("/") + "/" if key else ""
        client = make_s3_client(s3)
        names = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"
        ):
            names += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
        if not names:
            raise FileNotFoundError(f"no .tar shards under {path}")
        return [f"s3://{bucket}/{name}" for name in sorted(names)]
    local = Path(path)
    if local.is_file() and local.suffix == ".tar":
        return [str(local)]
    if not local.is_dir():
        raise FileNotFoundError(f"no such shard folder or tar file: {path}")
    shards = sorted(str(p) for p in local.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {path}")
    return shards


def read_manifest(path: str, *, s3: S3Location | None = None) -> dict[str, int] | None:
    """The ``sizes.json`` next to the shards of a location, or None when absent or unreadable."""
    try:
        if path.startswith("s3://"):
            from volta.data.s3 import make_s3_client, split_s3_url

            bucket, key = split_s3_url(path)
            key = key.rsplit("/", 1)[0] if key.endswith(".tar") else key.rstrip("/")
            body = make_s3_client(s3).get_object(Bucket=bucket, Key=f"{key}/{SIZES_FILE}".lstrip("/"))
            data = json.loads(body["Body"].read())
        else:
            folder = Path(path).parent if path.endswith(".tar") else Path(path)
            data = json.loads((folder / SIZES_FILE).read_text())
    except Exception:
        return None
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else None


def _open_shard(url: str, s3: S3Location | None) -> BinaryIO:
    if url.startswith("s3://"):
        from volta.data.s3 import make_s3_client, split_s3_url

        bucket, key = split_s3_url(url)
        body: BinaryIO = make_s3_client(s3).get_object(Bucket=bucket, Key=key)["Body"]
        return body
    return open(url, "rb")


def _split_name(name: str) -> tuple[str, str]:
    # webdataset's rule: the key is everything up to the first dot of the base name, the rest is the
    # extension.
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_raw_samples(
    path: str,
    *,
    s3: S3Location | None = None,
    on_shard_error: Callable[[str, Exception], None] | None = None,
) -> Iterator[RawSample]:
    """Yield every sample of a location's shards in order, grouping consecutive tar members by key.

    A shard that cannot be read to its end (truncated, not a tar) ends early; ``on_shard_error`` is told which
    and why (default: a warning in the log).
    """
    for url in list_shards(path, s3=s3):
        shard = url.rsplit("/", 1)[-1]
        current: RawSample | None = None
        try:
            with _open_shard(url, s3) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_name(member.name)
                    extracted = tar.extractfile(member)
                    data = extracted.read() if extracted is not None else b""
                    if current is None or current.key != key:
                        if current is not None:
                            yield current
                        current = RawSample(shard, key)
                    current.members[ext] = data
        except (OSError, tarfile.TarError, EOFError) as err:
            if on_shard_error is not None:
                on_shard_error(shard, err)
            else:
                log.warning("%s: unreadable after %s: %s", shard, current.key if current else "start", err)
        if current is not None:
            yield current


def iter_captions(path: str | Path, *, s3: S3Location | None = None) -> Iterator[str]:
    """Yield the UTF-8 captions (``.txt`` members) of a shard location in order, skipping undecodable ones."""
    for sample in iter_raw_samples(str(path), s3=s3):
        try:
            caption = sample.members.get("txt", b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if caption:
            yield caption


# ----------------------------------------------------------------------------------------------- checking
def _check_boxes(meta: dict[str, Any], size: tuple[int, int] | None) -> bool:
    boxes = meta.get("boxes", [])
    if not isinstance(boxes, list):
        return False
    width, height = size or (meta.get("width"), meta.get("height"))
    for box in boxes:
        if not isinstance(box, dict) or not isinstance(box.get("phrase"), str):
            return False
        bbox = box.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
            return False
        x, y, w, h = bbox
        if w <= 0 or h <= 0 or x < -1 or y < -1:
            return False
        if (
            isinstance(width, int | float)
            and isinstance(height, int | float)
            and (x + w > width + 1 or y + h > height + 1)
        ):
            return False
    return True


def check_sample(sample: RawSample) -> tuple[list[str], Any, str | None, dict[str, Any] | None]:
    """Check one sample; returns ``(problems, decoded PIL image or None, caption or None, metadata or None)``.

    Problems are names from: missing_image, undecodable_image, missing_caption, non_utf8_caption,
    empty_caption, missing_json, bad_json, bad_boxes.
    """
    from PIL import Image

    problems: list[str] = []
    image = None
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    if image_ext is None:
        problems.append("missing_image")
    else:
        try:
            image = Image.open(io.BytesIO(sample.members[image_ext]))
            image.load()
        except Exception:
            problems.append("undecodable_image")
            image = None
    caption = None
    if "txt" not in sample.members:
        problems.append("missing_caption")
    else:
        try:
            caption = sample.members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            problems.append("non_utf8_caption")
        else:
            if not caption.strip():
                problems.append("empty_caption")
    meta = None
    if "json" not in sample.members:
        problems.append("missing_json")
    else:
        try:
            parsed = json.loads(sample.members["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            parsed = None
        if not isinstance(parsed, dict):
            problems.append("bad_json")
        else:
            meta = parsed
            if not _check_boxes(meta, image.size if image is not None else None):
                problems.append("bad_boxes")
    return problems, image, caption, meta


def _caption_bin(words: int) -> str:
    return next(label for label, low, high in CAPTION_BINS if low <= words <= high)


def inspect_shards(
    path: str,
    *,
    limit: int | None = None,
    grid_path: str | Path | None = None,
    grid_samples: int = 16,
    s3: S3Location | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Read a shard location and return a JSON-ready summary; optionally draw a grid of good samples.

    The summary holds samples per shard (and the ``sizes.json`` count when there is one), the total, a
    caption-length histogram in words, box counts, counts of each problem (see :func:`check_sample`, plus
    ``unreadable_shard``) and up to 100 problem samples by shard and key. ``limit`` stops after that many
    samples.
    """
    manifest = read_manifest(path, s3=s3)
    per_shard: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    listed: list[dict[str, Any]] = []
    lengths: list[int] = []
    boxes = with_boxes = 0
    grid: list[tuple[Any, str, list[dict[str, Any]]]] = []
    shard_errors: dict[str, str] = {}

    def shard_error(shard: str, err: Exception) -> None:
        shard_errors[shard] = f"{type(err).__name__}: {err}"
        problems["unreadable_shard"] += 1

    total = 0
    for sample in iter_raw_samples(path, s3=s3, on_shard_error=shard_error):
        if limit is not None and total >= limit:
            break
        total += 1
        per_shard[sample.shard] += 1
        found, image, caption, meta = check_sample(sample)
        problems.update(found)
        if found and len(listed) < _MAX_LISTED_PROBLEMS:
            listed.append({"shard": sample.shard, "key": sample.key, "problems": found})
        if caption is not None:
            lengths.append(len(caption.split()))
        sample_boxes = (meta or {}).get("boxes", []) if "bad_boxes" not in found else []
        boxes += len(sample_boxes)
        with_boxes += bool(sample_boxes)
        if grid_path is not None and not found and len(grid) < grid_samples:
            grid.append((image, caption or "", sample_boxes))
        if progress is not None:
            progress(1)
    shard_names = [u.rsplit("/", 1)[-1] for u in list_shards(path, s3=s3)]
    shards = []
    for name in shard_names:
        entry: dict[str, Any] = {"name": name, "samples": per_shard.get(name, 0)}
        if manifest is not None:
            entry["manifest"] = manifest.get(name)
        if name in shard_errors:
            entry["error"] = shard_errors[name]
        shards.append(entry)
    histogram = Counter(_caption_bin(n) for n in lengths)
    summary: dict[str, Any] = {
        "path": path,
        "shards": shards,
        "total_samples": total,
        "manifest_total": sum(manifest.values()) if manifest is not None else None,
        "limited": limit is not None and total >= limit,
        "caption_words": {
            "min": min(lengths, default=0),
            "max": max(lengths, default=0),
            "mean": round(statistics.fmean(lengths), 2) if lengths else 0.0,
            "histogram": {label: histogram.get(label, 0) for label, _, _ in CAPTION_BINS},
        },
        "boxes": boxes,
        "samples_with_boxes": with_boxes,
        "problems": dict(sorted(problems.items())),
        "problem_samples": listed,
    }
    if grid_path is not None:
        draw_grid(grid, grid_path)
        summary["grid"] = str(grid_path)
    return summary


# ---------------------------------------------------------------------------------------------- reporting
def format_report(summary: dict[str, Any]) -> str:
    """A readable text table of an :func:`inspect_shards` summary (shards, histogram, problems)."""
    lines = [f"{summary['path']}: {summary['total_samples']} samples in {len(summary['shards'])} shards"]
    if summary.get("limited"):
        lines[0] += " (stopped at --limit)"
    lines.append(f"  {'shard':<14}{'samples':>9}{'sizes.json':>12}")
    for shard in summary["shards"]:
        manifest = shard.get("manifest")
        mark = "" if manifest in (None, shard["samples"]) or summary.get("limited") else "  MISMATCH"
        if "error" in shard:
            mark += f"  UNREADABLE ({shard['error']})"
        shown = "-" if manifest is None else str(manifest)
        lines.append(f"  {shard['name']:<14}{shard['samples']:>9}{shown:>12}{mark}")
    words = summary["caption_words"]
    lines.append(f"caption words: min {words['min']}, mean {words['mean']}, max {words['max']}")
    peak = max(words["histogram"].values(), default=0) or 1
    for label, count in words["histogram"].items():
        lines.append(f"  {label:>6} {count:>8} {'#' * round(40 * count / peak)}")
    lines.append(f"boxes: {summary['boxes']} in {summary['samples_with_boxes']} samples")
    if summary["problems"]:
        lines.append("problems:")
        lines += [f"  {name:<20}{count:>8}" for name, count in summary["problems"].items()]
        for item in summary["problem_samples"][:10]:
            lines.append(f"  e.g. {item['shard']} {item['key']}: {', '.join(item['problems'])}")
    else:
        lines.append("problems: none")
    if "grid" in summary:
        lines.append(f"grid: {summary['grid']}")
    return "\n".join(lines) + "\n"


_BOX_COLOURS = ((255, 255, 255), (0, 0, 0), (255, 0, 255), (0, 255, 255))


def draw_grid(
    samples: list[tuple[Any, str, list[dict[str, Any]]]],
    out_path: str | Path,
    *,
    cell: int = 192,
    columns: int = 4,
) -> None:
    """Save a PNG grid of ``(PIL image, caption, boxes)``: images fitted in cells, boxes drawn, captions."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    text_height = 48
    rows = max(1, -(-len(samples) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption, boxes) in enumerate(samples):
        x0, y0 = (i % columns) * cell, (i // columns) * (cell + text_height)
        rgb = image.convert("RGB")
        scale = cell / max(rgb.size)
        thumb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))))
        sheet.paste(thumb, (x0, y0))
        for j, box in enumerate(boxes):
            x, y, w, h = (float(v) * scale for v in box["bbox"])
            colour = _BOX_COLOURS[j % len(_BOX_COLOURS)]
            draw.rectangle((x0 + x, y0 + y, x0 + x + w, y0 + y + h), outline=colour, width=2)
            draw.text((x0 + x + 2, y0 + y + 1), str(box.get("phrase", "")), fill=colour, font=font)
        text = "\n".join(textwrap.wrap(caption, width=cell // 6)[:4])
        draw.multiline_text((x0 + 2, y0 + cell + 1), text, fill=(0, 0, 0), font=font, spacing=1)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, format="PNG")
