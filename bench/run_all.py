"""`make bench`: every benchmark that runs on CPU, one JSON report (ratios against same-run baselines).

Writes ``bench/results-cpu.json``: the GOT kernel, the data pipeline, task-step throughput (prefix sharing, bf16,
gradient checkpointing), ZeRO-2 memory, 1 vs 2 worker scaling and submit-to-first-step latency, plus the machine
they ran on (CPU model, cores, load average before and after: a loaded machine makes every figure noisier).
``--skip NAME ...`` leaves benchmarks out (the Ray ones take minutes); the GOT ablation (two short pre-training
runs) is opt-in with ``--ablation``. A benchmark that fails is recorded with its error and the exit status is 1.
Ray benchmarks must run inside the private network namespace (``make bench`` does that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHMARKS = ("got", "data", "step", "zero_memory", "scaling", "submit_latency")


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name", from /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Where the figures come from: CPU model and cores, memory, Python, platform, current load."""
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 1) if pages else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": None,
        "load_average_start": os.getloadavg(),
    }


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's target ratios, each with its target, read from the benchmarks' results (None if not run)."""
    figures = {
        "got_speedup_vs_baseline": (_get(report, "got", "speedup_vs_baseline"), ">= 2"),
        "got_speedup_vs_pot": (_get(report, "got", "speedup_vs_pot"), ">= 5"),
        "data_s3_over_local": (_get(report, "data", "s3_over_local"), ">= 0.9"),
        "prefix_sharing_speedup": (_get(report, "step", "ratios", "prefix_sharing_speedup"), ">= 1.3"),
        "bf16_over_fp32": (_get(report, "step", "ratios", "bf16", "samples_per_s_ratio"), None),
        "grad_checkpointing_time_ratio": (
            _get(report, "step", "ratios", "grad_checkpointing", "samples_per_s_ratio"),
            None,
        ),
        "grad_checkpointing_step_memory_ratio": (
            _get(report, "step", "ratios", "grad_checkpointing", "step_memory_ratio"),
            None,
        ),
        "two_over_one_worker": (_get(report, "scaling", "ratios", "2_over_1"), ">= 1.5"),
        "zero2_optimizer_state_ratio_fp32_adamw": (
            _get(report, "zero_memory", "measured", "fp32:adamw", "ratios", "optimizer_state"),
            "<= 0.55",
        ),
        "zero2_optimizer_state_ratio_bf16_lars": (
            _get(report, "zero_memory", "measured", "bf16:lars", "ratios", "optimizer_state"),
            "<= 0.55",
        ),
        "zero2_gradients_ratio_bf16_lars": (
            _get(report, "zero_memory", "measured", "bf16:lars", "ratios", "gradients"),
            None,
        ),
        "zero2_optimizer_state_ratio_base_analytic": (
            _get(report, "zero_memory", "analytic", "ratios", "optimizer_state"),
            "<= 0.55",
        ),
    }
    subs = _get(report, "submit_latency", "submissions")
    cold = subs[0]["first_step_s"] if isinstance(subs, list) and subs else None
    figures["submit_to_first_step_s_cold"] = (cold, None)
    return {k: {"value": v, "target": t} for k, (v, t) in figures.items()}


def _runners(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    from bench import data, got, scaling, step, submit_latency, zero_memory

    return {
        "got": lambda: got.run(repeats=args.repeats),
        "data": lambda: data.run(),
        "step": lambda: step.run(),
        "zero_memory": lambda: zero_memory.run(),
        "scaling": lambda: scaling.run(),
        "submit_latency": lambda: submit_latency.run(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results-cpu.json")
    p.add_argument("--repeats", type=int, default=5, help="GOT kernel repeats")
    p.add_argument("--skip", nargs="+", default=[], choices=BENCHMARKS, help="benchmarks to leave out")
    p.add_argument("--ablation", action="store_true", help="also run the GOT ablation (minutes)")
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["python -m bench.run_all", *(argv or sys.argv[1:])]),
    }
    failed = False
    for name, runner in _runners(args).items():
        if name in args.skip:
            report[name] = {"skipped": "--skip"}
            continue
        start = time.perf_counter()
        try:
            report[name] = runner()
        except Exception as err:  # one broken benchmark must not lose the others' figures
            failed = True
            report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        report[name]["bench_wall_s"] = round(time.perf_counter() - start, 1)
        print(f"run_all: {name} done in {report[name]['bench_wall_s']} s", file=sys.stderr)
    if args.ablation:
        from bench import got_ablation

        report["got_ablation"] = got_ablation.run(
            "configs/demo.yaml", [], str(Path("runs/got-ablation").resolve())
        )
    report["machine"]["load_average_end"] = os.getloadavg()
    report["headline"] = headline(report)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    json.dump(report, sys.stdout, indent=2, default=str)
    print()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
