"""S3 access shared by the shard reader, the uploader and storage checks: one boto3 client per process.

Endpoint, region and the retry policy come from the config (``storage.endpoint_url`` / ``storage.region`` /
``storage.s3_*``, as one :class:`S3Location`) or the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``
/ ``AWS_DEFAULT_REGION``); credentials only from the standard AWS
chain (environment, shared files, instance roles), never from the config, and they are never logged.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

if TYPE_CHECKING:
    from volta.config import StorageConfig

_lock = threading.Lock()
_clients: dict[tuple[int, S3Location], Any] = {}


@dataclass(frozen=True)
class S3Location:
    """How S3 is reached: endpoint and region (None: the standard AWS variables, then AWS itself) and the one
    retry policy every client follows, for shards and checkpoints alike. Credentials are never part of it.

    Built from the config with :meth:`from_storage`; the default reads everything from the environment.
    """

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 10
    retry_mode: Literal["standard", "adaptive"] = "adaptive"

    @classmethod
    def from_storage(cls, storage: StorageConfig) -> S3Location:
        """The location and retry policy of ``storage`` (``storage.endpoint_url``, ``region``, ``s3_*``)."""
        return cls(storage.endpoint_url, storage.region, storage.s3_max_attempts, storage.s3_retry_mode)

    def endpoint(self) -> str | None:
        """The endpoint to use: the explicit one, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS."""
        return resolve_endpoint(self.endpoint_url)

    def region_name(self, default: str | None = "us-east-1") -> str | None:
        """The region to use: the explicit one, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``default``."""
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or default


def split_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key/parts`` into ``(bucket, "key/parts")``; raises ValueError on anything else."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url!r}: expected s3://bucket/key")
    return parsed.netloc, parsed.path.lstrip("/")


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: the explicit one, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_s3_client(location: S3Location | None = None) -> Any:
    """Return this process's boto3 S3 client for ``location`` (default: from the environment), made on first use.

    Clients are cached per process id: a client created before a fork is never reused in the child (boto3
    clients are not fork-safe). Retries follow the location's policy; botocore's adaptive mode (the default)
    backs off on throttling (503 SlowDown), connection resets and 5xx answers.
    """
    import boto3
    from botocore.config import Config

    location = location or S3Location()
    key = (os.getpid(), location)
    with _lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                retries={"max_attempts": location.max_attempts, "mode": location.retry_mode},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=16,
            )
            session = boto3.session.Session()
            client = session.client(
                "s3", endpoint_url=location.endpoint(), region_name=location.region_name(), config=config
            )
            _clients[key] = client
    return client
