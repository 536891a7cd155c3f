"""Data-parallel scaling on CPU: the same global batch with 1 and 2 Ray workers under DeepSpeed ZeRO-2.

Both runs go through the real pre-training path (``orchestration/pretrain.py`` -> TorchTrainer ->
``train_fn_per_worker`` -> DeepSpeed ZeRO-2 on gloo with ``DS_ACCELERATOR=cpu`` -> volta's loop) on a local Ray
with one CPU per worker. Each worker is one core's worth of work: one torch thread and the data pipeline in the
worker process (``data.num_workers=0``), so a 1-worker run cannot borrow the idle core through DataLoader
processes. The global batch stays the recipe's; 1 worker accumulates the micro-batches that 2 workers split.
samples/s is the median over the steps after ``--warmup`` of the loop's own per-step figure (global batch over
rank 0's step time, data loading and collectives included); the report gives 2 workers over 1 (target >= 1.5).
The shards are synthetic (``volta data synth``) at the recipe's image size, written to a temporary folder.
Run inside the private network namespace::

    scripts/in-private-netns.sh .venv/bin/python -m bench.scaling [--config configs/demo.yaml] [--steps 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_bench_shards(folder: Path, *, samples: int, image_size: int, workers: int = 1) -> Path:
    """Synthetic grounding shards (``train/``, a small ``val/``) and a BPE tokenizer under ``folder``."""
    from volta.data.synth import write_synth_dataset

    write_synth_dataset(
        folder,
        train_samples=samples,
        val_samples=16,
        image_size=image_size,
        samples_per_shard=max(1, samples // 8),
        tokenizer_vocab_size=400,
        workers=workers,
    )
    return folder


def run_overrides(data: Path, out: Path, name: str, *, workers: int, steps: int) -> list[str]:
    """``--set`` items that point a recipe at the bench shards and make it a plain timed run of ``steps``."""
    items = {
        "data.train_shards": str(data / "train"),
        "data.val_shards": "null",
        "data.tokenizer": str(data / "tokenizer"),
        "data.num_workers": 0,
        "data.samples_per_epoch": "null",
        "train.max_steps": steps,
        "train.val_every": "null",
        "train.checkpoint_every": 1_000_000,  # one checkpoint, after the last step
        "train.log_every": 1_000_000,
        "train.output_dir": str(out),
        "storage.path": str(out / "ray"),
        "ray.num_workers": workers,
        "ray.cpus_per_worker": 1,
        "ray.max_failures": 0,
        "ray.run_name": name,
        "tracking.uri": "null",
    }
    return [f"{k}={v}" for k, v in items.items()]


def step_throughput(metrics_file: Path, warmup: int) -> dict[str, Any]:
    """Median samples/s of the steps after ``warmup`` in a run's metrics.jsonl (the last record per step)."""
    per_step: dict[int, float] = {}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        per_step[int(rec["step"])] = float(rec["train/samples_per_s"])
    timed = [v for step, v in sorted(per_step.items()) if step > warmup]
    if not timed:
        raise RuntimeError(f"{metrics_file}: no steps after the {warmup} warm-up steps")
    return {"samples_per_s": statistics.median(timed), "timed_steps": len(timed), "per_step": timed}


def run(
    config: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    *,
    workers: tuple[int, ...] = (1, 2),
    steps: int = 8,
    warmup: int = 3,
    samples: int = 512,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Train ``warmup + steps`` steps with each worker count on a local Ray and compare samples/s."""
    import ray

    from orchestration.pretrain import main as pretrain_main
    from volta.config import load_config

    for key, value in (("OMP_NUM_THREADS", "1"), ("DS_ACCELERATOR", "cpu"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(key, value)
    recipe = load_config(config, overrides or [])
    report: dict[str, Any] = {
        "config": config,
        "overrides": overrides or [],
        "global_batch_size": recipe.train.global_batch_size,
        "micro_batch_size": recipe.train.micro_batch_size,
        "precision": recipe.train.precision,
        "zero_stage": recipe.train.zero_stage,
        "steps": steps,
        "warmup": warmup,
        "runs": {},
    }
    started_ray = False
    with contextlib.ExitStack() as stack:
        root = Path(out_dir) if out_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        data = write_bench_shards(root / "data", samples=samples, image_size=recipe.model.image.img_size)
        if not ray.is_initialized():
            ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
            started_ray = True
        try:
            for n in workers:
                name = f"scaling-{n}w"
                sets = [*(overrides or []), *run_overrides(data, root, name, workers=n, steps=warmup + steps)]
                args = ["--config", config]
                for item in sets:
                    args += ["--set", item]
                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):  # the driver's JSON summary is not this report
                    status = pretrain_main(args)
                if status != 0:
                    raise RuntimeError(f"the {n}-worker run failed (exit status {status})")
                result = step_throughput(root / name / "metrics.jsonl", warmup)
                result["wall_s"] = time.perf_counter() - start
                result["gradient_accumulation"] = recipe.train.global_batch_size // (
                    n * recipe.train.micro_batch_size
                )
                report["runs"][str(n)] = result
                log.info("%d worker(s): %.2f samples/s", n, result["samples_per_s"])
        finally:
            if started_ray:
                ray.shutdown()
    base = report["runs"][str(workers[0])]["samples_per_s"]
    report["ratios"] = {
        f"{n}_over_{workers[0]}": report["runs"][str(n)]["samples_per_s"] / base for n in workers[1:]
    }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--samples", type=int, default=512, help="synthetic training samples")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    r = run(
        args.config,
        args.overrides,
        workers=tuple(args.workers),
        steps=args.steps,
        warmup=args.warmup,
        samples=args.samples,
        out_dir=args.out,
    )
    print(
        f"scaling, {r['config']}: global batch {r['global_batch_size']}, micro-batch {r['micro_batch_size']}, "
        f"{r['precision']}, ZeRO-{r['zero_stage']}, median of {r['steps']} steps after {r['warmup']}",
        file=sys.stderr,
    )
    for n, res in r["runs"].items():
        print(
            f"  {n} worker(s): {res['samples_per_s']:7.2f} samples/s  (accumulation {res['gradient_accumulation']}, "
            f"{res['wall_s']:.0f} s end to end)",
            file=sys.stderr,
        )
    for name, ratio in r["ratios"].items():
        print(f"  {name.replace('_', ' ')}: {ratio:.2f}x (target >= 1.5)", file=sys.stderr)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
