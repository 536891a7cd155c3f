"""bench.gpu: refuses without CUDA, and its CPU dry run goes through every one-process phase."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu
from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("args", [[], ["--device", "cpu"]])
def test_without_cuda_or_tiny_it_refuses_in_one_line(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("bench.gpu: ")


def test_peak_lookup_by_device_name() -> None:
    assert gpu.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None


@pytest.mark.timeout(240)
def test_dry_run_reports_throughput_memory_flops_and_got(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    report = gpu.run(
        device=torch.device("cpu"),
        tiny=True,
        steps=1,
        warmup=1,
        use_ray=False,
        peak_tflops=1.0,  # a made-up peak, so the MFU arithmetic runs
        vocab_size=300,
        out=str(out),
    )
    assert json.loads(out.read_text())["prefix_sharing_on"] == report["prefix_sharing_on"]
    on, off = report["prefix_sharing_on"], report["prefix_sharing_off"]
    for res in (on, off):
        assert res["samples_per_s"] > 0 and res["peak_memory_gib"] > 0 and res["precision"] == "bf16"
        assert res["mfu"] == pytest.approx(res["achieved_tflops"] / 1.0)
    # Recomputing the prefix is more work for the same model: more counted FLOPs, the same first loss.
    assert off["flops_per_step"] > on["flops_per_step"] > 0
    assert report["prefix_sharing_first_loss_rel_diff"] < 1e-3
    assert report["samples_per_s"] == on["samples_per_s"] and report["mfu"] == on["mfu"]
    got = report["got_kernel"]
    assert got["ours_fwd_bwd_ms"] > 0 and got["baseline_fwd_bwd_ms"] > 0
    assert report["device_render"]["samples_per_s"] > 0 and report["device_render"]["device"] == "cpu"
    assert report["skipped"] == {"ray": "--no-ray"}
    assert report["machine"]["peak_bf16_tflops"] is None  # a CPU has no entry in the table
