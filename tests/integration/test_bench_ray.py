"""The Ray benchmarks on tiny settings: 1 vs 2 worker scaling, submit-to-first-step, bench.gpu's Ray phase."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu, scaling
from tests.conftest import REPO

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.timeout(900)]
DEBUG = str(REPO / "configs" / "debug.yaml")


def test_scaling_trains_the_same_global_batch_with_one_and_two_workers(tmp_path: Path) -> None:
    report = scaling.run(DEBUG, workers=(1, 2), steps=2, warmup=1, samples=64, out_dir=str(tmp_path))
    one, two = report["runs"]["1"], report["runs"]["2"]
    assert one["gradient_accumulation"] == 2 and two["gradient_accumulation"] == 1  # global batch 8, micro 4
    assert one["timed_steps"] == two["timed_steps"] == 2
    assert report["ratios"]["2_over_1"] == pytest.approx(two["samples_per_s"] / one["samples_per_s"])
    # Both went through the real path: DeepSpeed checkpoints of every rank, placement files of every rank.
    for n in (1, 2):
        workers = sorted(p.name for p in (tmp_path / f"scaling-{n}w" / "workers").iterdir())
        assert workers == [f"rank-{r}.json" for r in range(n)]


def test_submit_latency_times_the_milestones_of_a_submitted_job(tmp_path: Path) -> None:
    # A fresh process: Ray reads RAY_AUTH_MODE once per process, and earlier Ray tests in this pytest worker ran
    # without token auth, so an in-process client would keep sending no token to the token-auth head.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.submit_latency",
            "--config",
            DEBUG,
            "--repeats",
            "1",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    (sub,) = report["submissions"]
    assert report["head_startup_s"] > 0
    assert sub["cli_s"] > 0 and 0 < sub["driver_start_s"] < sub["first_batch_s"]
    log_text = (tmp_path / "runs" / "latency-0.log").read_text()
    assert sub["driver_connected_s"] is not None, log_text[:3000]
    assert sub["driver_start_s"] <= sub["driver_connected_s"]
    assert sub["first_batch_s"] <= sub["first_step_s"] <= sub["job_total_s"]
    assert (tmp_path / "runs" / "latency-0" / "metrics.jsonl").read_text().count("\n") == 1
    assert "Connected to Ray cluster" in log_text


def test_gpu_benchmark_ray_phase_runs_one_bf16_worker_on_cpu() -> None:
    # One worker in bf16 under DeepSpeed: the path a single-GPU run takes (world size 1, no all-reduce).
    report = gpu.run(device=torch.device("cpu"), tiny=True, steps=1, warmup=1, vocab_size=300, budget_s=900)
    ray = report["ray"]
    assert ray["samples_per_s"] > 0 and ray["timed_steps"] == 1 and ray["batch_size"] == 4
    assert ray["over_one_process"] == pytest.approx(ray["samples_per_s"] / report["samples_per_s"])
    assert "ray" not in report["skipped"]
