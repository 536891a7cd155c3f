"""S3 access shared by the shard reader, the uploader and storage checks: one boto3 client per process.

Endpoint and region come from the config (``storage.endpoint_url`` / ``storage.region``) or the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``); credentials only from the standard AWS
chain (environment, shared files, instance roles), never from the config, and they are never logged.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import urlparse

_lock = threading.Lock()
_clients: dict[tuple[int, str | None, str | None], Any] = {}


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key/parts`` into ``(bucket, "key/parts")``; raises ValueError on anything else."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r}: expected s3://bucket/key")
    return parsed.netloc, parsed.path.lstrip("/")


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: the explicit one, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_s3_client(
    endpoint_url: str | None = None, region: str | None = None, *, max_attempts: int = 10
) -> Any:
    """Return this process's boto3 S3 client for an endpoint/region, created on first use.

    Clients are cached per process id: a client created before a fork is never reused in the child (boto3
    clients are not fork-safe). Retries use botocore's adaptive mode, which backs off on throttling (503
    SlowDown), connection resets and 5xx answers.
    """
    import boto3
    from botocore.config import Config

    endpoint = resolve_endpoint(endpoint_url)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    key = (os.getpid(), endpoint, region)
    with _lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                retries={"max_attempts": max_attempts, "mode": "adaptive"},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=16,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
            _clients[key] = client
    return client
