"""The durable record of a run: ``storage.path/<run_name>/`` on local disk or S3.

Ray Train writes the checkpoints there (``checkpoint-00000012/``); volta adds everything else a run produces,
so nothing a user needs lives only on a pod's disk: ``config.yaml`` (the resolved recipe), ``metrics.jsonl``,
``heatmaps/``, ``final/`` (the final model, safetensors + config), ``export/`` (the encoders), and
``FAILED.json`` when the run stopped on a deterministic failure. ``train.output_dir`` is a local cache.

Checkpoint completeness: every rank writes ``manifest-rank-<r>.json`` (files, sizes, sha256 of what it wrote)
into its part of a checkpoint; a checkpoint is *complete* when the manifests of all ranks are present and every
file they list exists with its size (and, once downloaded, its digest: :func:`verify_checkpoint_dir`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volta.data.s3 import S3Location, make_s3_client, split_s3_url

__all__ = [
    "CHECKPOINT_RE",
    "RunStorage",
    "checkpoint_step",
    "verify_checkpoint_dir",
    "write_manifest",
]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})$")
MANIFEST_RE = re.compile(r"^manifest-rank-(\d+)\.json$")


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name (``checkpoint-00000012`` -> 12), else None."""
    m = CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, *, rank: int, world_size: int, step: int) -> Path:
    """List every file under ``directory`` (this rank's part of a checkpoint) with size and sha256."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not MANIFEST_RE.match(p.name)
    }
    path = directory / f"manifest-rank-{rank}.json"
    path.write_text(
        json.dumps({"step": step, "rank": rank, "world_size": world_size, "files": files}, indent=1)
    )
    return path


def verify_checkpoint_dir(directory: Path) -> str | None:
    """None when the downloaded checkpoint ``directory`` matches all its ranks' manifests, else what is wrong."""
    manifests = sorted(directory.glob("manifest-rank-*.json"))
    if not manifests:
        return "no manifest"
    first = json.loads(manifests[0].read_text())
    if len(manifests) != int(first["world_size"]):
        return f"{len(manifests)} of {first['world_size']} rank manifests"
    for m in manifests:
        for rel, info in json.loads(m.read_text())["files"].items():
            p = directory / rel
            if not p.is_file() or p.stat().st_size != info["size"]:
                return f"{rel}: missing or wrong size"
            if _sha256(p) != info["sha256"]:
                return f"{rel}: sha256 differs from {m.name}"
    return None


@dataclass(frozen=True)
class RunStorage:
    """``root`` = ``storage.path/<run_name>`` (a local folder or ``s3://bucket/prefix``)."""

    root: str
    s3: S3Location | None = None

    @classmethod
    def for_run(cls, storage_path: str, run_name: str, s3: S3Location | None = None) -> RunStorage:
        """The run folder of ``run_name`` under ``storage_path``."""
        base = storage_path.rstrip("/")
        if not base.startswith("s3://"):
            base = str(Path(base).expanduser().resolve())
        return cls(f"{base}/{run_name}", s3)

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def url(self, rel: str = "") -> str:
        """The full location of ``rel`` inside the run folder."""
        return f"{self.root}/{rel}" if rel else self.root

    def _key(self, rel: str) -> tuple[str, str]:
        bucket, prefix = split_s3_url(self.root)
        return bucket, f"{prefix.rstrip('/')}/{rel}" if rel else prefix.rstrip("/")

    def _client(self) -> Any:
        return make_s3_client(self.s3)

    # ----------------------------------------------------------------------------------------- single files
    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` (replacing it; local writes are atomic by rename)."""
        if self.is_s3:
            bucket, key = self._key(rel)
            self._client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        path = Path(self.url(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def put_file(self, rel: str, local: Path) -> None:
        """Copy the local file ``local`` to ``rel``."""
        if self.is_s3:
            bucket, key = self._key(rel)
            self._client().upload_file(str(local), bucket, key)
            return
        self.put_bytes(rel, local.read_bytes())

    def get_bytes(self, rel: str) -> bytes | None:
        """The content of ``rel``, or None when it does not exist."""
        if self.is_s3:
            from botocore.exceptions import ClientError

            bucket, key = self._key(rel)
            try:
                return bytes(self._client().get_object(Bucket=bucket, Key=key)["Body"].read())
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
        path = Path(self.url(rel))
        return path.read_bytes() if path.is_file() else None

    def delete(self, rel: str) -> None:
        """Remove the file or the whole folder ``rel`` (nothing when absent)."""
        if self.is_s3:
            bucket, key = self._key(rel)
            client = self._client()
            prefix = f"{key.rstrip('/')}/"
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            keys = [
                key,
                *(o["Key"] for page in pages for o in page.get("Contents", [])),
            ]  # folder markers too
            for i in range(0, len(keys), 1000):
                client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
                )
            return
        path = Path(self.url(rel))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()

    # --------------------------------------------------------------------------------------------- folders
    def list_files(self, rel: str = "") -> dict[str, int]:
        """Every file under folder ``rel`` as {path relative to it: size}."""
        if self.is_s3:
            bucket, key = self._key(rel)
            prefix = f"{key.rstrip('/')}/" if key else ""
            out: dict[str, int] = {}
            for page in (
                self._client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            ):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if rel and not rel.endswith("/"):  # pyarrow (Ray's uploads) leaves empty folder markers
                        out[rel] = int(obj["Size"])
            return out
        base = Path(self.url(rel))
        if not base.is_dir():
            return {}
        return {str(p.relative_to(base)): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def put_dir(self, rel: str, local: Path) -> None:
        """Copy the local folder ``local`` to ``rel`` (files replaced; nothing deleted)."""
        for p in sorted(local.rglob("*")):
            if p.is_file():
                self.put_file(f"{rel}/{p.relative_to(local)}", p)

    def get_dir(self, rel: str, local: Path) -> Path:
        """Copy folder ``rel`` to the local folder ``local``; returns ``local``."""
        for name in self.list_files(rel):
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            data = self.get_bytes(f"{rel}/{name}")
            if data is not None:
                target.write_bytes(data)
        return local

    # --------------------------------------------------------------------------------------- checkpoints
    def checkpoint_names(self) -> list[str]:
        """Checkpoint folder names present in storage, oldest step first."""
        names = {rel.split("/", 1)[0] for rel in self.list_files() if "/" in rel}
        return sorted(
            (n for n in names if checkpoint_step(n) is not None), key=lambda n: checkpoint_step(n) or 0
        )

    def checkpoint_problem(self, name: str) -> str | None:
        """None when checkpoint ``name`` is complete in storage by its manifests (files present, sizes equal)."""
        listing = self.list_files(name)
        manifests = {int(m.group(1)): rel for rel in listing if (m := MANIFEST_RE.match(rel))}
        if not manifests:
            return "no manifest"
        docs = {r: json.loads(self.get_bytes(f"{name}/{rel}") or b"{}") for r, rel in manifests.items()}
        world = int(next(iter(docs.values()))["world_size"])
        if sorted(docs) != list(range(world)):
            return f"manifests of ranks {sorted(docs)} of {world}"
        for doc in docs.values():
            for rel, info in doc["files"].items():
                if listing.get(rel) != info["size"]:
                    return f"{rel}: missing or wrong size"
        return None

    def newest_complete_checkpoint(self, *, after: int = -1) -> tuple[str | None, list[str]]:
        """(the newest complete checkpoint with a step > ``after`` or None, the incomplete ones newer than it)."""
        incomplete: list[str] = []
        for name in reversed(self.checkpoint_names()):
            step = checkpoint_step(name) or 0
            if step <= after:
                break
            if self.checkpoint_problem(name) is None:
                return name, incomplete
            incomplete.append(name)
        return None, incomplete
