"""Shard lists and dataset sizes: local folders, brace patterns, lists, and ``s3://`` prefixes or patterns.

A dataset location is resolved once, in the driver or trainer, into an explicit list of shard URLs (local paths
or ``s3://bucket/key.tar``); workers only ever see that list. Sizes come from the ``sizes.json`` manifest next to
the shards (``{"00000.tar": 1000, ...}``), which ``volta data`` writes.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import braceexpand

from volta.data import s3_opener
from volta.data.s3 import S3Location, make_s3_client, split_s3_url

__all__ = ["SIZES_FILE", "DatasetSizeError", "count_samples", "open_shard", "read_sizes", "resolve_shards"]

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"


class DatasetSizeError(ValueError):
    """The number of samples could not be determined (no ``sizes.json``, or a shard missing from it)."""


def _is_s3(url: str) -> bool:
    return url.startswith("s3://")


def _list_s3_tars(prefix_url: str, s3: S3Location | None) -> list[str]:
    bucket, prefix = split_s3_url(prefix_url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = make_s3_client(s3)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        keys.extend(obj["Key"] for obj in page.get("Contents", []) if obj["Key"].endswith(".tar"))
    return [f"s3://{bucket}/{key}" for key in sorted(keys)]


def _expand_one(spec: str, s3: S3Location | None) -> list[str]:
    if "{" in spec:
        return list(braceexpand.braceexpand(spec))
    if spec.endswith(".tar"):
        return [spec]
    if _is_s3(spec):
        return _list_s3_tars(spec, s3)
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"{spec}: not a folder of .tar shards, a .tar file or a brace pattern")
    return [str(p) for p in sorted(folder.glob("*.tar"))]


def resolve_shards(spec: str | Sequence[str], *, s3: S3Location | None = None) -> list[str]:
    """Turn a shard location (or a list of them) into the explicit, ordered list of shard URLs.

    Each item may be a local folder (its ``*.tar`` files, sorted), a brace pattern (``dir/{00000..00009}.tar``,
    local or ``s3://``), a single ``.tar`` path or URL, or an ``s3://bucket/prefix`` (the ``*.tar`` objects
    directly under the prefix, sorted). Items are concatenated in the given order; an empty result is an error.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        found = _expand_one(str(item), s3)
        if not found:
            raise FileNotFoundError(f"{item}: no .tar shards found")
        urls.extend(found)
    if not urls:
        raise FileNotFoundError("no shard locations given")
    log.debug("resolved %d shard(s) from %s", len(urls), spec)
    return urls


def open_shard(url: str, *, s3: S3Location | None = None) -> IO[bytes]:
    """Open one shard for streaming reads: a local file, or ``s3://`` through the resumable boto3 reader."""
    if _is_s3(url):
        return s3_opener.open_s3(url, s3=s3)
    return open(url, "rb", buffering=1 << 20)


def _parent(url: str) -> str:
    return posixpath.dirname(url) if _is_s3(url) else str(Path(url).parent)


def _read_manifest(parent: str, s3: S3Location | None) -> dict[str, int] | None:
    if _is_s3(parent):
        from botocore.exceptions import ClientError

        bucket, prefix = split_s3_url(parent)
        key = posixpath.join(prefix, SIZES_FILE) if prefix else SIZES_FILE
        try:
            body = make_s3_client(s3).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
    else:
        path = Path(parent) / SIZES_FILE
        if not path.is_file():
            return None
        body = path.read_bytes()
    try:
        sizes = json.loads(body)
    except ValueError as err:
        raise DatasetSizeError(f"{parent}/{SIZES_FILE}: not valid JSON ({err})") from None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        raise DatasetSizeError(f"{parent}/{SIZES_FILE}: expected {{shard file name: sample count}}")
    return {str(k): int(v) for k, v in sizes.items()}


def read_sizes(urls: Sequence[str], *, s3: S3Location | None = None) -> dict[str, int]:
    """Sample count of every shard URL, from the ``sizes.json`` in each shard's folder (or S3 prefix).

    Raises :class:`DatasetSizeError` naming ``data.samples_per_epoch`` when a manifest or an entry is missing,
    since that field is the way to run on shards without a manifest.
    """
    manifests: dict[str, dict[str, int] | None] = {}
    sizes: dict[str, int] = {}
    for url in urls:
        parent = _parent(url)
        if parent not in manifests:
            manifests[parent] = _read_manifest(parent, s3)
        manifest = manifests[parent]
        name = posixpath.basename(url)
        if manifest is None or name not in manifest:
            where = f"{parent}/{SIZES_FILE}"
            reason = "does not exist" if manifest is None else f"has no entry for {name}"
            raise DatasetSizeError(
                f"{where} {reason}: cannot count the samples; set data.samples_per_epoch "
                "(or write the manifest with `volta data`)"
            )
        sizes[url] = manifest[name]
    return sizes


def count_samples(urls: Sequence[str], *, s3: S3Location | None = None) -> int:
    """Total samples in the given shards according to their ``sizes.json`` manifests (see :func:`read_sizes`)."""
    return sum(read_sizes(urls, s3=s3).values())
