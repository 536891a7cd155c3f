"""The data pipeline against a moto S3 server on 127.0.0.1: listing, sizes, 2 ranks x 2 workers, resume, faults.

Run inside a private network namespace: ``scripts/in-private-netns.sh .venv/bin/python -m pytest ...``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests import fixtures_data
from tests.fixtures_data import FaultProxy, tiny_config, upload_folder, write_dataset
from volta.config import StorageConfig
from volta.data.batch import VoltaBatch
from volta.data.factory import batches_per_epoch, build_train_loader, dataset_size
from volta.data.pipeline import SkipCounter, iter_shard_samples
from volta.data.s3 import S3Location
from volta.data.s3_opener import S3ObjectReader
from volta.data.shards import DatasetSizeError, resolve_shards

tiny_tokenizer = fixtures_data.tiny_tokenizer
aws_env = fixtures_data.aws_env
moto_endpoint = fixtures_data.moto_endpoint

BUCKET = "volta-data"
N_SHARDS, PER_SHARD = 8, 12


@pytest.fixture(scope="module")
def s3_dataset(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    folder = tmp_path_factory.mktemp("s3data")
    keys = write_dataset(folder, N_SHARDS, PER_SHARD)
    upload_folder(moto_endpoint, folder, BUCKET, "train")
    return f"s3://{BUCKET}/train", keys


def _config(url: str, endpoint: str, **data: Any) -> Any:
    return tiny_config(
        url,
        data=data,
        train={"global_batch_size": 8, "micro_batch_size": 4},
        ray={"num_workers": 2},
        storage={"endpoint_url": endpoint},
    )


def test_listing_patterns_and_manifest_on_s3(s3_dataset: tuple[str, list[str]], moto_endpoint: str) -> None:
    url, _ = s3_dataset
    shards = resolve_shards(url, s3=S3Location(moto_endpoint))
    assert shards == [f"{url}/{i:05d}.tar" for i in range(N_SHARDS)]
    assert resolve_shards(f"{url}/{{00002..00004}}.tar") == shards[2:5]
    storage = StorageConfig(endpoint_url=moto_endpoint)
    assert dataset_size(url, storage) == N_SHARDS * PER_SHARD
    assert dataset_size(f"{url}/{{00000..00002}}.tar", storage) == 3 * PER_SHARD
    with pytest.raises(DatasetSizeError, match=r"data\.samples_per_epoch"):
        dataset_size(f"s3://{BUCKET}/nowhere/00000.tar", storage)


def _keys(batches: list[VoltaBatch]) -> list[str]:
    return [k for b in batches for k in b.keys]


@pytest.mark.timeout(180)
def test_two_ranks_two_workers_read_every_sample_once_and_resume(
    s3_dataset: tuple[str, list[str]], moto_endpoint: str, tiny_tokenizer: Any
) -> None:
    url, keys = s3_dataset
    cfg = _config(url, moto_endpoint, num_workers=2)
    per_rank = batches_per_epoch(cfg, 2)
    assert per_rank == N_SHARDS * PER_SHARD // 8
    runs = [list(build_train_loader(cfg, tiny_tokenizer, rank=r, world_size=2, epoch=1)) for r in (0, 1)]
    assert [len(r) for r in runs] == [per_rank, per_rank]
    seen = Counter(_keys(runs[0]) + _keys(runs[1]))
    assert sorted(seen) == sorted(keys) and set(seen.values()) == {1}
    assert not set(_keys(runs[0])) & set(_keys(runs[1]))
    # Resume rank 0 after batch index 4 (an odd restart point rotates the workers' roles).
    k = runs[0][4].position["next_batch"]
    resumed = list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=2, epoch=1, start_batch=k))
    assert [b.keys for b in resumed] == [b.keys for b in runs[0][k:]]
    for a, b in zip(resumed, runs[0][k:]):
        for va, vb in zip(a.views, b.views, strict=True):
            assert va.images.equal(vb.images) and va.mlm_input_ids.equal(vb.mlm_input_ids)
            assert va.mlm_labels.equal(vb.mlm_labels)
        assert a.position == b.position


@pytest.fixture()
def fault_proxy(moto_endpoint: str) -> Any:
    proxy = FaultProxy(moto_endpoint).start()
    yield proxy
    proxy.stop()


@pytest.mark.timeout(180)
def test_reads_survive_503s_and_broken_connections(
    s3_dataset: tuple[str, list[str]], moto_endpoint: str, fault_proxy: FaultProxy, tiny_tokenizer: Any
) -> None:
    url, keys = s3_dataset
    shards = resolve_shards(url, s3=S3Location(moto_endpoint))
    clean = SkipCounter()
    clean_keys = Counter(
        s["__key__"] for u in shards for s in iter_shard_samples(u, clean, s3=S3Location(moto_endpoint))
    )
    faulty = SkipCounter()
    proxied = Counter(
        s["__key__"]
        for u in shards
        for s in iter_shard_samples(u, faulty, s3=S3Location(fault_proxy.endpoint))
    )
    assert fault_proxy.errors_503 >= N_SHARDS // 2 and fault_proxy.cuts >= 2  # faults really happened
    assert proxied == clean_keys == Counter(keys)  # nothing lost, nothing duplicated
    assert not any(faulty.take().values())
    # The whole training pipeline through the proxy delivers every sample once as well.
    cfg = _config(url, fault_proxy.endpoint, num_workers=0)
    cfg.ray.num_workers = 1
    batches = list(build_train_loader(cfg, tiny_tokenizer, rank=0, world_size=1, epoch=0))
    assert Counter(_keys(batches)) == Counter(keys)


def test_reader_resumes_at_the_byte_offset(
    s3_dataset: tuple[str, list[str]], moto_endpoint: str, fault_proxy: FaultProxy
) -> None:
    url, _ = s3_dataset
    from volta.data.s3 import make_s3_client, split_s3_url

    bucket, key = split_s3_url(f"{url}/00003.tar")
    expected = make_s3_client(S3Location(moto_endpoint)).get_object(Bucket=bucket, Key=key)["Body"].read()
    for _ in range(3):  # three passes meet every phase of the proxy's fault cycle
        reader = S3ObjectReader(f"{url}/00003.tar", s3=S3Location(fault_proxy.endpoint))
        chunks = []
        while chunk := reader.read(4096):
            chunks.append(chunk)
        reader.close()
        assert b"".join(chunks) == expected
    assert fault_proxy.cuts >= 1


def test_gopen_handles_s3_urls(
    s3_dataset: tuple[str, list[str]], moto_endpoint: str, monkeypatch: Any
) -> None:
    import webdataset

    url, keys = s3_dataset
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    ds = webdataset.WebDataset(f"{url}/00000.tar", shardshuffle=False, nodesplitter=None)
    assert [s["__key__"] for s in ds] == keys[:PER_SHARD]


def test_local_path_is_not_touched_by_the_s3_opener(tmp_path: Path) -> None:
    # Local shards never go through boto3 (no endpoint needed).
    write_dataset(tmp_path, 1, 3)
    counter = SkipCounter()
    assert len(list(iter_shard_samples(str(tmp_path / "00000.tar"), counter))) == 3
