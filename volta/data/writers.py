"""Write WebDataset shards in the img2dataset layout, resumably and atomically.

A dataset folder holds ``NNNNN.tar`` shards and a ``sizes.json`` manifest (``{"00000.tar": samples, ...}``).
Each sample is three tar members sharing a key: ``{key}.{jpg|png|webp}`` (image bytes), ``{key}.txt`` (UTF-8
caption) and ``{key}.json`` (metadata with at least ``key``, ``width`` and ``height``; boxes are ``[x, y, w,
h]`` in pixels of the stored image). Shard ``i`` always holds samples ``i*N .. (i+1)*N-1`` of the input order,
so a re-run of the same conversion skips shards that are already complete on disk and rewrites the rest.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SIZES_FILE",
    "EncodedImage",
    "ShardSample",
    "ShardWriter",
    "count_shard_samples",
    "encode_image",
    "read_sizes",
    "scale_boxes",
    "shard_name",
]

SIZES_FILE = "sizes.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Pillow format name -> the extension we store; only these are kept byte-for-byte.
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_TMP_SUFFIX = ".partial"
# A fixed member mtime makes shards byte-identical across runs with the same input (reproducible datasets).
_MEMBER_MTIME = 0

T = TypeVar("T")


def shard_name(index: int) -> str:
    """The file name of shard ``index``: five zero-padded digits, ``00042.tar``."""
    return f"{index:05d}.tar"


@dataclass(frozen=True)
class ShardSample:
    """One sample to write: encoded image bytes with their extension, the caption and extra JSON metadata.

    ``meta`` must hold ``width`` and ``height`` of the stored image (``encode_image`` gives both); the writer
    adds ``key``.
    """

    image: bytes
    image_ext: str
    caption: str
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes ready to store, their extension, stored size, and the scale applied to the original."""

    data: bytes
    ext: str
    width: int
    height: int
    scale: float


def encode_image(
    source: bytes | Any, *, max_size: int | None = None, jpeg_quality: int = 95, fmt: str | None = None
) -> EncodedImage:
    """Prepare an image (encoded bytes or a PIL image) for a shard, resizing its longer side to ``max_size``.

    Bytes already in JPEG, PNG or WEBP that need no resize are stored unchanged (no recompression). Anything
    else is decoded, resized with Lanczos if its longer side exceeds ``max_size``, and encoded as ``fmt``
    ("jpg" or "png"; default: PNG for images with transparency or PNG input, JPEG otherwise). Raises
    ``ValueError`` for undecodable input.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else source
        width, height = image.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"not a readable image: {err}") from err
    needs_resize = max_size is not None and max(width, height) > max_size
    keep_ext = _KEEP_FORMATS.get(image.format or "")
    if isinstance(source, bytes) and keep_ext and not needs_resize and fmt in (None, keep_ext):
        return EncodedImage(source, keep_ext, width, height, 1.0)
    try:
        image.load()
    except OSError as err:
        raise ValueError(f"image does not decode: {err}") from err
    scale = 1.0
    if needs_resize:
        assert max_size is not None
        scale = max_size / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    out_ext = fmt or ("png" if has_alpha or image.format == "PNG" or keep_ext == "png" else "jpg")
    buf = io.BytesIO()
    if out_ext == "png":
        image.save(buf, format="PNG", optimize=False)
    elif out_ext in ("jpg", "jpeg"):
        out_ext = "jpg"
        image.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        raise ValueError(f"unsupported output format {fmt!r} (jpg or png)")
    return EncodedImage(buf.getvalue(), out_ext, image.size[0], image.size[1], scale)


def scale_boxes(boxes: Iterable[Mapping[str, Any]], scale: float) -> list[dict[str, Any]]:
    """Boxes with their ``bbox`` ([x, y, w, h] pixels) multiplied by ``scale`` (after an image resize)."""
    out = []
    for box in boxes:
        scaled = dict(box)
        scaled["bbox"] = [round(float(v) * scale, 2) for v in box["bbox"]]
        out.append(scaled)
    return out


def read_sizes(folder: str | Path) -> dict[str, int]:
    """The ``sizes.json`` manifest of a local shard folder; an empty dict when missing or unreadable."""
    path = Path(folder) / SIZES_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}


def count_shard_samples(path: str | Path) -> int | None:
    """Number of distinct sample keys in a tar shard; None when it is missing, truncated or not a tar."""
    keys: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(member.name.split("/")[-1].split(".", 1)[0])
    except (OSError, tarfile.TarError, EOFError):
        return None
    return len(keys)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class ShardWriter:
    """Context manager writing samples into ``NNNNN.tar`` shards of ``samples_per_shard`` plus ``sizes.json``.

    Samples stream into ``NNNNN.tar.partial`` and the file is renamed to its final name only once the shard is
    complete, so a crash never leaves a partial shard under a final name. ``sizes.json`` is rewritten after
    every shard and on close. On a re-run over the same input, a shard whose tar exists, whose ``sizes.json``
    entry equals the expected count and whose member keys match that count is left untouched; its samples are
    counted but not encoded (see :meth:`write_lazy`). Keys are the global sample index, nine zero-padded
    digits.
    """

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.samples_per_shard = samples_per_shard
        self.count = 0  # samples seen so far (written or skipped)
        self.shards_written = 0
        self.shards_skipped = 0
        self._previous: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._file: BinaryIO | None = None
        self._tar_index = -1
        self._in_shard = 0
        self._complete_cache: dict[int, bool] = {}
        self._skipped_items: list[tuple[Any, Callable[[Any], ShardSample]]] = []
        self._open = False

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob("*" + _TMP_SUFFIX):
            log.info("removing %s left by an interrupted run", stale)
            stale.unlink()
        self._previous = read_sizes(self.out_dir)
        self._open = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def close(self) -> dict[str, int]:
        """Finish the last shard, drop shards this run did not produce, write ``sizes.json``; return it."""
        if not self._open:
            return dict(self._sizes)
        if self._skipped_items:
            pending, self._skipped_items = self._skipped_items, []
            self.count -= len(pending)
            index = self.count // self.samples_per_shard
            self._complete_cache[index] = False
            for item, encode in pending:
                self._append(encode(item), index)
        if self._tar is not None:
            self._finish_shard()
        last = (self.count - 1) // self.samples_per_shard if self.count else -1
        for name in sorted(set(self._previous) - set(self._sizes)):
            stale = _shard_index(name)
            if stale is not None and stale > last:
                # A shard of an earlier, longer run over different input: it is not part of this dataset.
                log.warning("removing %s: not produced by this run", name)
                (self.out_dir / name).unlink(missing_ok=True)
        _write_json_atomic(self.out_dir / SIZES_FILE, self._sizes)
        self._open = False
        log.info(
            "%s: %d samples in %d shards (%d written, %d already complete)",
            self.out_dir,
            self.count,
            len(self._sizes),
            self.shards_written,
            self.shards_skipped,
        )
        return dict(self._sizes)

    def _abort(self) -> None:
        # Keep what is complete, lose the shard in progress: it is rewritten on the next run.
        if self._tar is not None and self._file is not None:
            with contextlib.suppress(OSError, tarfile.TarError):  # the error being handled may be this file's
                self._tar.close()
            self._file.close()
            self._tar = self._file = None
            self._tmp_path(self._tar_index).unlink(missing_ok=True)
        if self._open:
            _write_json_atomic(self.out_dir / SIZES_FILE, {**self._previous, **self._sizes})
        self._open = False

    # -------------------------------------------------------------------------------------------- writing
    @property
    def next_is_skipped(self) -> bool:
        """Whether the next sample falls in a shard already complete on disk (its encoding can be skipped)."""
        return self._is_complete_on_disk(self.count // self.samples_per_shard, self.samples_per_shard)

    def write(self, sample: ShardSample) -> None:
        """Append one sample (or only count it, when its shard is already complete on disk)."""
        self.write_lazy(sample, lambda s: s)

    def write_lazy(self, item: T, encode: Callable[[T], ShardSample]) -> None:
        """Append ``encode(item)``; ``encode`` is not called when the sample's shard is complete on disk."""
        if not self._open:
            raise RuntimeError("ShardWriter is not open (use it as a context manager)")
        index, position = divmod(self.count, self.samples_per_shard)
        if self._tar is None and self.next_is_skipped:
            # Keep the (cheap) items until the shard is known to be complete: if the input ends inside it, the
            # shard on disk holds more samples than this run's input and is rewritten from them at close.
            self._skipped_items.append((item, encode))
            self.count += 1
            if position == self.samples_per_shard - 1:
                self._sizes[shard_name(index)] = self.samples_per_shard
                self.shards_skipped += 1
                self._skipped_items = []
            return
        self._append(encode(item), index)

    def _append(self, sample: ShardSample, index: int) -> None:
        if self._tar is None:
            self._start_shard(index)
        self._add_sample(sample, f"{self.count:09d}")
        self.count += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def write_all(self, items: Iterable[T], encode: Callable[[T], ShardSample]) -> int:
        """Write ``encode(item)`` for every item (lazily, see :meth:`write_lazy`); return the count."""
        for item in items:
            self.write_lazy(item, encode)
        return self.count

    # ------------------------------------------------------------------------------------------ internals
    def _tmp_path(self, index: int) -> Path:
        return self.out_dir / (shard_name(index) + _TMP_SUFFIX)

    def _is_complete_on_disk(self, index: int, expected: int) -> bool:
        name = shard_name(index)
        if self._previous.get(name) != expected:
            return False
        if index not in self._complete_cache:
            found = count_shard_samples(self.out_dir / name)
            self._complete_cache[index] = found == expected
            if found != expected:
                log.info("%s: %s samples on disk, %d expected; rewriting it", name, found, expected)
        return self._complete_cache[index]

    def _start_shard(self, index: int) -> None:
        self._tar_index = index
        self._in_shard = 0
        # Both stay open across write() calls; _finish_shard/_abort close them.
        self._file = open(self._tmp_path(index), "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def _add_member(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = _MEMBER_MTIME
        info.mode = 0o644
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def _add_sample(self, sample: ShardSample, key: str) -> None:
        ext = sample.image_ext.lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image extension {sample.image_ext!r} is not one of {IMAGE_EXTENSIONS}")
        meta = {**sample.meta, "key": key}
        self._add_member(f"{key}.{ext}", sample.image)
        self._add_member(f"{key}.txt", sample.caption.encode("utf-8"))
        self._add_member(f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename below must never expose a shard the disk has not got yet
        self._file.close()
        self._tar = self._file = None
        index, count = self._tar_index, self._in_shard
        name = shard_name(index)
        tmp = self._tmp_path(index)
        if count < self.samples_per_shard and self._is_complete_on_disk(index, count):
            tmp.unlink()  # the short last shard of an earlier identical run: keep the file as it is
            self.shards_skipped += 1
        else:
            os.replace(tmp, self.out_dir / name)
            self.shards_written += 1
            self._complete_cache[index] = True
        self._sizes[name] = count
        # A manifest that always lists the finished shards lets an interrupted conversion resume from them.
        _write_json_atomic(self.out_dir / SIZES_FILE, {**self._previous, **self._sizes})


def _shard_index(name: str) -> int | None:
    stem = name.removesuffix(".tar")
    return int(stem) if stem.isdigit() and name.endswith(".tar") else None
