"""bench.run_all: the report's machine section, skipping, failures and the headline ratios."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import run_all


def test_everything_skipped_still_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert run_all.main(["--out", str(out), "--skip", *run_all.BENCHMARKS]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert all(report[name]["skipped"] == "--skip" for name in run_all.BENCHMARKS)
    assert report["headline"]["prefix_sharing_speedup"] == {"value": None, "target": ">= 1.3"}


def test_a_failing_benchmark_is_recorded_and_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(
        run_all, "_runners", lambda args: {"step": broken, "got": lambda: {"speedup_vs_baseline": 1.5}}
    )
    out = tmp_path / "r.json"
    assert run_all.main(["--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["step"]["error"] == "RuntimeError: boom"
    assert report["headline"]["got_speedup_vs_baseline"]["value"] == 1.5


def test_headline_reads_the_nested_results() -> None:
    report = {
        "step": {"ratios": {"prefix_sharing_speedup": 1.6, "bf16": {"samples_per_s_ratio": 0.9}}},
        "scaling": {"ratios": {"2_over_1": 1.7}},
        "zero_memory": {"measured": {"fp32:adamw": {"ratios": {"optimizer_state": 0.5}}}},
        "submit_latency": {"submissions": [{"first_step_s": 30.0}, {"first_step_s": 25.0}]},
    }
    h = run_all.headline(report)
    assert h["prefix_sharing_speedup"]["value"] == 1.6
    assert h["bf16_over_fp32"]["value"] == 0.9
    assert h["two_over_one_worker"]["value"] == 1.7
    assert h["zero2_optimizer_state_ratio_fp32_adamw"]["value"] == 0.5
    assert h["submit_to_first_step_s_cold"]["value"] == 30.0
    assert h["data_s3_over_local"]["value"] is None


def test_driver_connected_time_is_found_when_another_write_lands_on_the_same_line() -> None:
    from datetime import datetime

    from bench.submit_latency import driver_connected_time

    stamp = "2026-12-07 00:56:09,803"
    expected = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    clean = f"{stamp}\tINFO worker.py:2029 -- Connected to Ray cluster. View the dashboard at http://127.0.0.1:1\n"
    # The driver's C++ core writes to the same stderr; its line can land in front of the Python record.
    interleaved = (
        "[2026-12-07 00:56:09,769 W 3981 3981] network_util.cc:330: Failed to determine local IP" + clean
    )
    assert driver_connected_time("Running entrypoint\n" + clean) == expected
    assert driver_connected_time(interleaved) == expected
    assert (
        driver_connected_time("2026-12-07 00:56:09,770\tINFO worker.py:1841 -- Connecting to existing\n")
        is None
    )
