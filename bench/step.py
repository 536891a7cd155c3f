"""Training-step throughput of the task module: prefix sharing, bf16 and gradient checkpointing against fp32.

One process, no Ray, no data pipeline: the recipe's task (random weights) takes full optimizer steps (forward,
backward, the recipe's optimizer through volta's plain-torch engine) on random batches of the recipe's micro-batch
size. Every variant runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own; variants
alternate over ``--rounds`` and each keeps its fastest round, so a burst of load from another process on a shared
machine does not decide a ratio. Every ratio is against the baseline of the same run (prefix sharing on, fp32, no
checkpointing). The variants start from the same weights and see the same batches and random draws, so their
per-step losses must agree (up to bf16 rounding for bf16), which the report checks.

    python -m bench.step [--config configs/demo.yaml] [--steps 6] [--warmup 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.workload import NO_DROPOUT

log = logging.getLogger(__name__)

BASELINE = "fp32"
# Variant name -> config overrides on top of the recipe (the baseline forces the recipe to the baseline state).
# Dropout is off in every variant (see bench.workload.NO_DROPOUT), so their losses can be compared.
VARIANTS: dict[str, list[str]] = {
    BASELINE: [
        *NO_DROPOUT,
        "train.precision=fp32",
        "model.share_unimodal_prefix=true",
        "model.image.grad_checkpointing=false",
        "model.text.grad_checkpointing=false",
    ],
    "no_prefix_sharing": ["model.share_unimodal_prefix=false"],
    "bf16": ["train.precision=bf16"],
    "grad_checkpointing": ["model.image.grad_checkpointing=true", "model.text.grad_checkpointing=true"],
}


def cpu_bf16_support() -> dict[str, Any]:
    """Whether this CPU runs bf16 natively: its ISA flags (avx512_bf16, amx_bf16) and oneDNN's own answer."""
    import torch

    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = None
    isa = sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})
    return {"isa_flags": isa, "onednn_bf16": onednn, "supported": bool(isa) and onednn is not False}


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_variant(
    config_path: str,
    overrides: list[str],
    *,
    steps: int,
    warmup: int,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run ``warmup + steps`` optimizer steps of the recipe's task in this process and measure them.

    Returns samples/s (micro-batch size over the median timed step), every step's total loss, the resident memory
    before the first step and the process's peak. Seeds are fixed, so two variants see the same weights, batches
    and random draws.
    """
    import torch

    from bench.workload import random_batch, recipe_vocab_size
    from volta.config import load_config
    from volta.task import build_task
    from volta.training.engine import TorchEngine
    from volta.training.loop import seed_step
    from volta.training.schedule import build_optimizer

    torch.set_num_threads(threads or os.cpu_count() or 1)
    config = load_config(config_path, overrides)
    vocab = vocab_size or recipe_vocab_size(config)
    batch = batch_size or config.train.micro_batch_size
    torch.manual_seed(config.train.seed)
    task = build_task(config, vocab)
    optimizer = build_optimizer(task, config.optim, global_batch_size=batch)
    engine = TorchEngine(task, optimizer, precision=config.train.precision)
    batches = [random_batch(config, batch, vocab, seed=i) for i in range(2)]
    rss_start = _rss_mb()
    times: list[float] = []
    losses: list[float] = []
    task.train()
    for step in range(warmup + steps):
        seed_step(config.train.seed, 0, step)
        start = time.perf_counter()
        loss = engine.forward(batches[step % len(batches)])["loss"]
        engine.backward(loss)
        engine.step()
        elapsed = time.perf_counter() - start
        losses.append(float(loss.detach().float()))
        if step >= warmup:
            times.append(elapsed)
    median = statistics.median(times)
    return {
        "samples_per_s": batch / median,
        "step_s_median": median,
        "step_s_min": min(times),
        "losses": losses,
        "rss_start_mb": rss_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch_size": batch,
        "vocab_size": vocab,
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in task.parameters()),
    }


def _run_child(args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run :func:`measure_variant` in a fresh interpreter and return its JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.step", "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.step child {args} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def run(
    config: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    *,
    steps: int = 6,
    warmup: int = 2,
    rounds: int = 2,
    variants: list[str] | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """Measure every variant (each in a fresh subprocess, alternating, best of ``rounds``) and their ratios."""
    names = variants or list(VARIANTS)
    if BASELINE not in names:
        names = [BASELINE, *names]
    bf16 = cpu_bf16_support()
    skipped: dict[str, str] = {}
    if "bf16" in names and not bf16["supported"]:
        names.remove("bf16")
        skipped["bf16"] = "this CPU has no native bf16 (avx512_bf16/amx_bf16)"
    best: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for name in names:
            args = ["--config", config, "--steps", str(steps), "--warmup", str(warmup)]
            for item in [*(overrides or []), *VARIANTS[BASELINE], *VARIANTS[name]]:
                args += ["--set", item]
            for flag, value in (
                ("--vocab-size", vocab_size),
                ("--batch-size", batch_size),
                ("--threads", threads),
            ):
                if value is not None:
                    args += [flag, str(value)]
            result = _run_child(args, timeout_s)
            log.info("%s: %.2f samples/s", name, result["samples_per_s"])
            if name not in best or result["samples_per_s"] > best[name]["samples_per_s"]:
                best[name] = result
    base = best[BASELINE]
    report: dict[str, Any] = {
        "config": config,
        "overrides": overrides or [],
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "cpu_bf16": bf16,
        "skipped": skipped,
        "variants": best,
    }
    ratios: dict[str, Any] = {}
    for name, res in best.items():
        if name == BASELINE:
            continue
        ratios[name] = {
            "samples_per_s_ratio": res["samples_per_s"] / base["samples_per_s"],
            "peak_rss_ratio": res["peak_rss_mb"] / base["peak_rss_mb"],
            "step_memory_ratio": (res["peak_rss_mb"] - res["rss_start_mb"])
            / max(base["peak_rss_mb"] - base["rss_start_mb"], 1e-9),
            "first_loss_rel_diff": _max_rel_diff(res["losses"][:1], base["losses"][:1]),
            "loss_max_rel_diff": _max_rel_diff(res["losses"], base["losses"]),
        }
    if "no_prefix_sharing" in ratios:
        # The target is phrased as sharing on over sharing off.
        ratios["prefix_sharing_speedup"] = 1.0 / ratios["no_prefix_sharing"]["samples_per_s_ratio"]
    report["ratios"] = ratios
    return report


def _print_report(r: dict[str, Any]) -> None:
    base = r["variants"][BASELINE]
    print(
        f"task step throughput, {r['config']} {' '.join(r['overrides'])}: micro-batch {base['batch_size']}, "
        f"{base['parameters'] / 1e6:.2f} M parameters, {base['torch_threads']} torch threads, "
        f"median of {r['steps']} steps after {r['warmup']}, best of {r['rounds']} rounds"
    )
    print(
        f"  {'variant':20s}{'samples/s':>11s}{'ratio':>8s}{'peak RSS MiB':>14s}{'step MiB':>10s}{'loss diff':>11s}"
    )
    for name, res in r["variants"].items():
        q = r["ratios"].get(name, {})
        print(
            f"  {name:20s}{res['samples_per_s']:11.2f}{q.get('samples_per_s_ratio', 1.0):8.2f}"
            f"{res['peak_rss_mb']:14.0f}{res['peak_rss_mb'] - res['rss_start_mb']:10.0f}"
            f"{q.get('loss_max_rel_diff', 0.0):11.1e}"
        )
    for name, why in r["skipped"].items():
        print(f"  {name}: skipped ({why})")
    if "prefix_sharing_speedup" in r["ratios"]:
        print(
            f"  prefix sharing on / off: {r['ratios']['prefix_sharing_speedup']:.2f}x samples/s (target >= 1.3)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per variant; the fastest is kept")
    p.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS))
    p.add_argument("--vocab-size", type=int, default=None, help="default: the recipe's tokenizer")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.micro_batch_size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPU cores)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        result = measure_variant(
            args.config,
            args.overrides,
            steps=args.steps,
            warmup=args.warmup,
            vocab_size=args.vocab_size,
            batch_size=args.batch_size,
            threads=args.threads,
        )
        print(json.dumps(result))
        return 0
    report = run(
        args.config,
        args.overrides,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        variants=args.variants,
        vocab_size=args.vocab_size,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    _print_report(report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
