"""Upload a local shard folder to S3 with end-to-end checksums, skipping what is already there intact.

Every object carries its SHA-256 as user metadata (``x-amz-meta-sha256``) and is verified after the upload by
its ETag, which S3 computes from the bytes it stored (the MD5 for a single-part upload, the MD5 of the part
MD5s for a multipart one; we compute the same locally with the same part size). An object is skipped on a
later run only when both its SHA-256 metadata and its ETag match the local file, so a remote object that was
overwritten or corrupted is uploaded again. ``sizes.json`` goes last, so a reader never sees a manifest naming
missing shards.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volta.data.s3 import S3Location, make_s3_client, split_s3_url
from volta.data.writers import SIZES_FILE

log = logging.getLogger(__name__)

__all__ = ["FileChecksums", "UploadError", "UploadReport", "file_checksums", "upload_dataset"]

_BLOCK = 1 << 20
DEFAULT_MULTIPART_THRESHOLD = 1 << 30
DEFAULT_PART_SIZE = 64 << 20


class UploadError(RuntimeError):
    """An object whose stored checksum does not match the local file after upload."""


@dataclass(frozen=True)
class FileChecksums:
    """A file's size, SHA-256 (hex) and the ETag S3 reports for it when uploaded with a given part size."""

    size: int
    sha256: str
    etag: str


@dataclass
class UploadReport:
    """Object keys uploaded fresh, replaced (the remote differed) and skipped (already intact)."""

    uploaded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0


def file_checksums(path: str | Path, *, multipart_threshold: int, part_size: int) -> FileChecksums:
    """SHA-256 of a file and its expected S3 ETag, single-part below the threshold, multipart above."""
    from s3transfer.utils import ChunksizeAdjuster

    size = Path(path).stat().st_size
    multipart = size >= multipart_threshold
    # s3transfer grows the part size when a file would need more than 10,000 parts; follow it exactly.
    part = ChunksizeAdjuster().adjust_chunksize(part_size, size) if multipart else max(size, 1)
    sha = hashlib.sha256()
    whole = hashlib.md5(usedforsecurity=False)
    part_digests: list[bytes] = []
    with open(path, "rb") as fh:
        while True:
            part_md5 = hashlib.md5(usedforsecurity=False)
            remaining, read = part, 0
            while remaining:
                block = fh.read(min(_BLOCK, remaining))
                if not block:
                    break
                sha.update(block)
                whole.update(block)
                part_md5.update(block)
                remaining -= len(block)
                read += len(block)
            if read:
                part_digests.append(part_md5.digest())
            if read < part:
                break
    if multipart:
        combined = hashlib.md5(b"".join(part_digests), usedforsecurity=False).hexdigest()
        etag = f"{combined}-{len(part_digests)}"
    else:
        etag = whole.hexdigest()
    return FileChecksums(size, sha.hexdigest(), etag)


def _remote_state(client: Any, bucket: str, key: str) -> dict[str, object] | None:
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return {
        "etag": str(head.get("ETag", "")).strip('"'),
        "sha256": head.get("Metadata", {}).get("sha256"),
        "size": head.get("ContentLength"),
    }


def upload_dataset(
    local_dir: str | Path,
    s3_url: str,
    *,
    s3: S3Location | None = None,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    part_size: int = DEFAULT_PART_SIZE,
    progress: Callable[[int], None] | None = None,
) -> UploadReport:
    """Upload the ``.tar`` shards and ``sizes.json`` of ``local_dir`` under ``s3_url`` (s3://bucket/prefix).

    Objects already present with the same SHA-256 metadata, ETag and size are skipped; others are uploaded and
    then verified by ETag (raising :class:`UploadError` on a mismatch). ``progress`` receives byte counts as
    they are sent. Raises ``FileNotFoundError`` when the folder holds no shard.
    """
    from boto3.s3.transfer import TransferConfig

    folder = Path(local_dir)
    shards = sorted(folder.glob("*.tar")) if folder.is_dir() else []
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {local_dir}")
    files = shards + ([folder / SIZES_FILE] if (folder / SIZES_FILE).is_file() else [])
    if files[-1].name != SIZES_FILE:
        log.warning("%s has no %s: readers will need data.samples_per_epoch", folder, SIZES_FILE)
    bucket, prefix = split_s3_url(s3_url.rstrip("/"))
    client = make_s3_client(s3)
    transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=part_size)
    report = UploadReport()
    for path in files:
        key = f"{prefix}/{path.name}" if prefix else path.name
        local = file_checksums(path, multipart_threshold=multipart_threshold, part_size=part_size)
        remote = _remote_state(client, bucket, key)
        if remote is not None and (remote["sha256"], remote["etag"], remote["size"]) == (
            local.sha256,
            local.etag,
            local.size,
        ):
            report.skipped.append(key)
            if progress is not None:
                progress(local.size)
            continue
        if remote is not None:
            log.warning(
                "s3://%s/%s differs from %s (stale or corrupt): uploading it again", bucket, key, path
            )
        content_type = "application/json" if path.suffix == ".json" else "application/x-tar"
        client.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs={"Metadata": {"sha256": local.sha256}, "ContentType": content_type},
            Config=transfer,
            Callback=progress,
        )
        stored = _remote_state(client, bucket, key)
        if stored is None or stored["etag"] != local.etag:
            found = stored["etag"] if stored is not None else "nothing"
            raise UploadError(
                f"s3://{bucket}/{key}: after upload S3 holds ETag {found}, expected {local.etag}"
            )
        (report.replaced if remote is not None else report.uploaded).append(key)
        report.bytes_sent += local.size
    log.info(
        "%s -> %s: %d uploaded, %d replaced, %d already present",
        folder,
        s3_url,
        len(report.uploaded),
        len(report.replaced),
        len(report.skipped),
    )
    return report
