"""Pre-training on a local Ray cluster: 2 DeepSpeed ZeRO-2 workers (gloo), S3 checkpoints, crash recovery, resume."""

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


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> str:
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket="ckpts")
    return "ckpts"


def _kill_rank_when_checkpoint(
    out: Path, name: str, client: object, step: int, done: threading.Event
) -> list[int]:
    """SIGKILL rank 1's process (found from outside, by its placement file) once checkpoint `step` is in S3."""
    killed: list[int] = []
    key = f"runs/{name}/checkpoint-{step:08d}/"
    while not done.is_set():
        listing = client.list_objects_v2(Bucket="ckpts", Prefix=key)  # type: ignore[attr-defined]
        info = out / name / "workers" / "rank-1.json"
        if listing.get("KeyCount", 0) and info.exists():
            pid = json.loads(info.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return killed
        time.sleep(0.1)
    return killed


def test_two_workers_s3_checkpoints_crash_recovery_and_resubmission(
    local_ray: None,
    synth_data: Path,
    moto_endpoint: str,
    bucket: str,
    tmp_path: Path,
) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    # 1. Uninterrupted reference run (local storage).
    ref = tmp_path / "ref"
    assert main(["--config", str(DEBUG), *run_overrides(synth_data, ref, "ref", **COMMON)]) == 0
    ref_steps = last_per_step(ref / "ref" / "metrics.jsonl")
    assert sorted(ref_steps) == list(range(1, STEPS + 1))

    # 2. The same run with checkpoints on S3, and rank 1 killed with SIGKILL after the step-6 checkpoint landed.
    out = tmp_path / "crash"
    args = run_overrides(
        synth_data,
        out,
        "crash",
        **COMMON,
        **{"storage.path": "s3://ckpts/runs", "storage.endpoint_url": moto_endpoint},
    )
    done = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(
        target=lambda: killed.extend(_kill_rank_when_checkpoint(out, "crash", s3, 6, done))
    )
    killer.start()
    try:
        assert main(["--config", str(DEBUG), *args]) == 0
    finally:
        done.set()
        killer.join()
    assert killed, "the worker was never killed: the run finished before checkpoint 6 appeared"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="runs/crash/")["Contents"]]
    assert any("checkpoint-00000012/" in k and k.endswith("volta/model.safetensors") for k in keys)
    assert any(
        "checkpoint-00000012/state/" in k and "optim_states" in k for k in keys
    )  # ZeRO shards of both ranks
    assert len([k for k in keys if "checkpoint-00000012/state/" in k and "optim_states" in k]) == 2

    records = (out / "crash" / "metrics.jsonl").read_text().splitlines()
    crash_steps = last_per_step(out / "crash" / "metrics.jsonl")
    assert sorted(crash_steps) == list(range(1, STEPS + 1))
    assert len(records) > STEPS  # some steps after the last checkpoint were redone after the restart
    for step in range(1, STEPS + 1):
        a, b = crash_steps[step]["train/loss"], ref_steps[step]["train/loss"]
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (step, a, b)
    # No optimizer step applied twice: the final weights equal the uninterrupted run's.
    final_ref = load_file(str(ref / "ref" / "final" / "model.safetensors"))
    final_crash = load_file(str(out / "crash" / "final" / "model.safetensors"))
    for k, v in final_ref.items():
        assert torch.allclose(final_crash[k].float(), v.float(), rtol=1e-4, atol=1e-5), k

    # 3. Resubmitting the finished run with a longer schedule resumes at step 12 instead of starting over.
    more = run_overrides(synth_data, ref, "ref", **{**COMMON, "train.max_steps": STEPS + 2})
    assert main(["--config", str(DEBUG), *more]) == 0
    lines = [json.loads(x) for x in (ref / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in lines[STEPS:]] == [STEPS + 1, STEPS + 2]


def test_invalid_config_or_unreachable_storage_fail_before_any_worker(
    synth_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
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
