"""`volta data upload` against a moto S3 server on 127.0.0.1: checksums, skipping, repairing, reading back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from volta.data.inspect import inspect_shards, iter_captions
from volta.data.s3 import S3Location, make_s3_client
from volta.data.synth import write_synth_split
from volta.data.upload import file_checksums, upload_dataset

pytestmark = pytest.mark.timeout(180)

_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    old = {k: os.environ.get(k) for k in _AWS}
    os.environ.update(_AWS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    make_s3_client(S3Location(url)).create_bucket(Bucket="shards")
    yield url
    server.stop()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    write_synth_split(folder, 30, image_size=48, samples_per_shard=10)
    return folder


def _get(endpoint: str, key: str) -> dict:
    return make_s3_client(S3Location(endpoint)).get_object(Bucket="shards", Key=key)


def test_upload_verifies_skips_and_repairs(endpoint: str, dataset: Path) -> None:
    keys = ["set/00000.tar", "set/00001.tar", "set/00002.tar", "set/sizes.json"]
    sent: list[int] = []
    first = upload_dataset(dataset, "s3://shards/set", s3=S3Location(endpoint), progress=sent.append)
    assert first.uploaded == keys  # shards first, the manifest last
    assert first.skipped == [] and first.replaced == []
    total = sum((dataset / k.split("/")[1]).stat().st_size for k in keys)
    assert sum(sent) == first.bytes_sent == total
    for key in keys:
        obj = _get(endpoint, key)
        local = (dataset / key.split("/")[1]).read_bytes()
        assert obj["Body"].read() == local
        assert (
            obj["Metadata"]["sha256"]
            == file_checksums(
                dataset / key.split("/")[1], multipart_threshold=1 << 30, part_size=1 << 26
            ).sha256
        )

    second = upload_dataset(dataset, "s3://shards/set/", s3=S3Location(endpoint))
    assert second.skipped == keys and second.uploaded == [] and second.bytes_sent == 0

    # Corrupt one object behind our back (same size, same checksum metadata: only the ETag can tell); delete
    # one.
    client = make_s3_client(S3Location(endpoint))
    meta = _get(endpoint, "set/00001.tar")["Metadata"]
    flipped = bytearray((dataset / "00001.tar").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one byte off
    client.put_object(Bucket="shards", Key="set/00001.tar", Body=bytes(flipped), Metadata=meta)
    client.delete_object(Bucket="shards", Key="set/00002.tar")
    third = upload_dataset(dataset, "s3://shards/set", s3=S3Location(endpoint))
    assert third.replaced == ["set/00001.tar"] and third.uploaded == ["set/00002.tar"]
    assert third.skipped == ["set/00000.tar", "set/sizes.json"]
    assert _get(endpoint, "set/00001.tar")["Body"].read() == (dataset / "00001.tar").read_bytes()

    # What was uploaded reads back through the S3 side of `volta data inspect`.
    summary = inspect_shards("s3://shards/set", s3=S3Location(endpoint))
    assert summary["total_samples"] == summary["manifest_total"] == 30 and summary["problems"] == {}
    assert len(list(iter_captions("s3://shards/set", s3=S3Location(endpoint)))) == 30


def test_multipart_etag_is_predicted_and_checked(endpoint: str, tmp_path: Path) -> None:
    big = tmp_path / "00000.tar"
    big.write_bytes(os.urandom(11 << 20))
    threshold = part = 5 << 20
    expected = file_checksums(big, multipart_threshold=threshold, part_size=part)
    assert expected.etag.endswith("-3")
    report = upload_dataset(
        tmp_path, "s3://shards/big", s3=S3Location(endpoint), multipart_threshold=threshold, part_size=part
    )
    assert report.uploaded == ["big/00000.tar"]
    head = make_s3_client(S3Location(endpoint)).head_object(Bucket="shards", Key="big/00000.tar")
    assert head["ETag"].strip('"') == expected.etag
    again = upload_dataset(
        tmp_path, "s3://shards/big", s3=S3Location(endpoint), multipart_threshold=threshold, part_size=part
    )
    assert again.skipped == ["big/00000.tar"]


def test_upload_command_skips_what_is_there(endpoint: str, dataset: Path, tmp_path: Path) -> None:
    upload_dataset(dataset, "s3://shards/cli", s3=S3Location(endpoint))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **_AWS}
    volta = Path(sys.executable).parent / "volta"
    run = subprocess.run(
        [str(volta), "data", "upload", str(dataset), "s3://shards/cli", "--endpoint-url", endpoint],
        capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["uploaded"] == [] and len(report["skipped"]) == 4 and report["bytes_sent"] == 0
    bad = subprocess.run(
        [str(volta), "data", "upload", str(dataset), "shards/cli"],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert bad.returncode == 2 and "s3://bucket/prefix" in bad.stderr
