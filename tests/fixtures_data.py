"""Test data for the data pipeline: tiny synthetic shards, a tiny tokenizer, a moto S3 server, a fault proxy.

Shards are written with ``webdataset.TarWriter`` in the img2dataset layout (``{key}.png|jpg``, ``{key}.txt``,
``{key}.json``) plus ``sizes.json``. The S3 server and the fault-injecting proxy bind 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import webdataset
from PIL import Image, ImageDraw

from volta.config import VoltaConfig, config_from_dict

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["square", "circle", "triangle", "star"]
_RGB = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 180),
    "orange": (240, 140, 20),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}


def caption_for(index: int) -> str:
    """A deterministic caption with a few words (enough for EDA operations and BPE training)."""
    colour, shape = COLOURS[index % len(COLOURS)], SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    return f"a {colour} {shape} on a plain background number {index}"


def draw_image(index: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A small picture of a coloured shape (different for every index), encoded as PNG or JPEG."""
    img = Image.new("RGB", size, (index * 37 % 256, index * 91 % 256, index * 53 % 256))
    draw = ImageDraw.Draw(img)
    colour = _RGB[COLOURS[index % len(COLOURS)]]
    x0, y0 = index % 7 + 2, index % 5 + 2
    draw.rectangle([x0, y0, x0 + size[0] // 2, y0 + size[1] // 2], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def good_sample(index: int, *, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> dict[str, Any]:
    """One well-formed sample dict for ``TarWriter`` (key, image, caption, metadata with one box)."""
    ext = "png" if fmt == "PNG" else "jpg"
    meta = {
        "width": size[0],
        "height": size[1],
        "label": index % len(COLOURS),
        "boxes": [{"phrase": COLOURS[index % len(COLOURS)], "bbox": [2, 2, size[0] // 2, size[1] // 2]}],
    }
    return {
        "__key__": f"s{index:05d}",
        ext: draw_image(index, size, fmt),
        "txt": caption_for(index).encode(),
        "json": json.dumps(meta).encode(),
    }


def corrupt_body_sample(index: int) -> dict[str, Any]:
    """:func:`good_sample` as a JPEG cut just after its scan header: the header (and size) parses, decoding fails."""
    sample = good_sample(index, fmt="JPEG")
    scan = sample["jpg"].index(b"\xff\xda")  # start-of-scan marker: everything before it is header
    return {**sample, "jpg": sample["jpg"][: scan + 20]}


def write_shard(path: Path, samples: list[dict[str, Any]]) -> None:
    """Write one tar shard with webdataset's TarWriter."""
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def write_dataset(folder: Path, n_shards: int, per_shard: int, *, start: int = 0) -> list[str]:
    """Write ``n_shards`` shards of ``per_shard`` good samples plus ``sizes.json``; return all keys in order."""
    folder.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    sizes: dict[str, int] = {}
    for s in range(n_shards):
        samples = [good_sample(start + s * per_shard + i) for i in range(per_shard)]
        write_shard(folder / f"{s:05d}.tar", samples)
        sizes[f"{s:05d}.tar"] = per_shard
        keys.extend(x["__key__"] for x in samples)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return keys


def truncate_tar_inside_member(path: Path, member_index: int) -> None:
    """Cut a tar file in the middle of the data of its ``member_index``-th member (a broken upload)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    member = members[member_index]
    cut = member.offset_data + max(1, member.size // 2)
    data = path.read_bytes()[:cut]
    path.write_bytes(data)


def tiny_config(train_shards: str | list[str], **sections: dict[str, Any]) -> VoltaConfig:
    """A VoltaConfig for data tests: 32 px images, 16 tokens, micro batch 4, no shuffle buffer, no workers."""
    data: dict[str, Any] = {
        "model": {
            "image": {"img_size": 32, "pretrained": False},
            "text": {"max_length": 16, "pretrained": False},
        },
        "data": {"train_shards": train_shards, "val_shards": None, "shuffle_buffer": 0, "num_workers": 0},
        "train": {"global_batch_size": 4, "micro_batch_size": 4, "seed": 7},
        "ray": {"num_workers": 1},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A byte-level BPE tokenizer trained offline on the synthetic captions (no hub download)."""
    from volta.data.tokenizer import train_bpe_tokenizer

    captions = [caption_for(i) for i in range(400)] + ["an extra caption with other words"] * 4
    return train_bpe_tokenizer(captions, tmp_path_factory.mktemp("tok"), vocab_size=300)


# ----------------------------------------------------------------------------------------------------- S3
@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Dummy credentials for moto, set for the whole session (DataLoader workers inherit them)."""
    values = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def moto_endpoint(aws_env: None) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port), as ``http://127.0.0.1:PORT``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def upload_folder(endpoint: str, folder: Path, bucket: str, prefix: str) -> None:
    """Upload every file of ``folder`` to ``s3://bucket/prefix/`` (creating the bucket if needed)."""
    from volta.data.s3 import S3Location, make_s3_client

    client = make_s3_client(S3Location(endpoint, "us-east-1"))
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that breaks some shard downloads on purpose.

    Of the GET requests for ``.tar`` objects, number n (from 0) is answered with 503 SlowDown when
    ``n % 3 == 1`` and cut off half-way through the body when ``n % 3 == 2`` (alternately a clean close and a
    TCP reset); the rest pass through. Everything else is forwarded untouched.
    """

    def __init__(self, upstream: str) -> None:
        host_port = upstream.split("://", 1)[1]
        host, port = host_port.split(":")
        self.upstream = (host, int(port))
        self.tar_gets = 0
        self.errors_503 = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def action(self, path: str) -> str:
        if ".tar" not in path.split("?")[0]:
            return "pass"
        with self._lock:
            n = self.tar_gets
            self.tar_gets += 1
        return ("pass", "503", "cut")[n % 3]


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _forward(self, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(method, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.getheaders(), data

    def do_HEAD(self) -> None:
        status, headers, _ = self._forward("HEAD")
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection"):
                self.send_header(k, v)
        self.end_headers()

    def do_GET(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        action = proxy.action(self.path)
        if action == "503":
            with proxy._lock:
                proxy.errors_503 += 1
            body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        status, headers, data = self._forward("GET")
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if action == "cut" and status in (200, 206) and len(data) > 2048:
            with proxy._lock:
                proxy.cuts += 1
                reset = proxy.cuts % 2 == 0
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if reset:  # SO_LINGER 0: close sends a TCP RST instead of a FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.wfile.write(data)
