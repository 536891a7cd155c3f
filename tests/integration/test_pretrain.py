"""Pre-training on a local Ray cluster: 2 DeepSpeed ZeRO-2 workers (gloo), outputs in storage, resubmission."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load_file

from orchestration.pretrain import main
from tests.fixtures_data import aws_env, moto_endpoint
from tests.fixtures_pretrain import DEBUG, last_per_step, run_overrides, synth_data
from volta.run_storage import RunStorage

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.timeout(900)]

STEPS = 12
COMMON = {
    "train.max_steps": STEPS,
    "train.checkpoint_every": 3,
    "data.shuffle_buffer": 0,
    "ray.max_failures": 2,
}


@pytest.fixture(scope="module")
def local_ray(aws_env: None) -> Iterator[None]:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_workers_train_export_and_a_resubmission_continues(
    local_ray: None, synth_data: Path, tmp_path: Path
) -> None:
    # Crashes, partial and unregistered checkpoints, corrupt files and flaky S3 are in test_faults.py; this is
    # the plain path and the resubmission of a finished run with a longer schedule.
    ref = tmp_path / "ref"
    assert main(["--config", str(DEBUG), *run_overrides(synth_data, ref, "ref", **COMMON)]) == 0
    storage = RunStorage.for_run(str(ref / "ray"), "ref")
    assert storage.get_bytes("resumes.jsonl") is None  # the reference run never restarted
    lines = [json.loads(x) for x in (ref / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in lines] == list(range(1, STEPS + 1))
    stored = [json.loads(x) for x in (storage.get_bytes("metrics.jsonl") or b"").decode().splitlines()]
    assert stored == lines  # the run's record in storage is the same file
    for rel in ("config.yaml", "final/model.safetensors", "export/image_encoder.safetensors"):
        assert storage.get_bytes(rel) is not None, rel
    final = load_file(str(ref / "ref" / "final" / "model.safetensors"))
    assert (
        storage.get_bytes("final/model.safetensors")
        == (ref / "ref" / "final" / "model.safetensors").read_bytes()
    )
    assert all(torch.isfinite(v.float()).all() for v in final.values())

    # Resubmitting the finished run with a longer schedule resumes at step 12 instead of starting over.
    before = len(lines)
    more = run_overrides(synth_data, ref, "ref", **{**COMMON, "train.max_steps": STEPS + 2})
    assert main(["--config", str(DEBUG), *more]) == 0
    lines = [json.loads(x) for x in (ref / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in lines[before:]] == [STEPS + 1, STEPS + 2]
    resumes = [json.loads(x) for x in (storage.get_bytes("resumes.jsonl") or b"").decode().splitlines()]
    assert [r["step"] for r in resumes] == [STEPS]  # the first step it ran was the last checkpoint + 1


def test_invalid_config_or_unreachable_storage_fail_before_any_worker(
    synth_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    aws_env: None,  # credentials present: this test is about an unreachable bucket, not missing credentials
) -> None:
    import ray

    was_running = ray.is_initialized()
    assert main(["--config", str(DEBUG), "--set", "model.fusion_depth=99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("volta-pretrain: config error: model.fusion_depth:")
    bad_storage = run_overrides(
        synth_data,
        tmp_path,
        "x",
        **{"storage.path": "s3://nowhere/runs", "storage.endpoint_url": "http://127.0.0.1:9"},
    )
    t0 = time.monotonic()
    assert main(["--config", str(DEBUG), *bad_storage]) == 2
    assert "storage.path: cannot reach s3://nowhere/runs" in capsys.readouterr().err
    assert time.monotonic() - t0 < 60
    missing = run_overrides(tmp_path / "none", tmp_path, "y")
    assert main(["--config", str(DEBUG), *missing]) == 2
    assert "data.train_shards:" in capsys.readouterr().err
    assert ray.is_initialized() == was_running  # nothing started Ray
