"""One prepared GPU benchmark: the paper setting in bf16 on one GPU, in under 8 minutes.

The paper setting is ``configs/base.yaml`` (Swin-B 384 + RoBERTa-base, fusion in the last N = 6 blocks, LARS,
micro-batch 32) with random weights (the cost of a step does not depend on them; nothing is downloaded). It
measures, each phase bounded in steps and checked against a time budget:

1. **One process, no Ray** (volta's plain-torch engine, bf16 autocast): samples/s (median step after warm-up),
   peak GPU memory (``max_memory_allocated``), model FLOPs of one forward + backward counted with
   ``torch.utils.flop_counter.FlopCounterMode``, achieved TFLOP/s and MFU = achieved / the GPU's dense bf16 peak
   (looked up from the device name; unknown -> null); with prefix sharing on (the recipe) and off, whose
   losses must agree (dropout off in both). A batch that does not fit is halved and the size reported.
2. **GOT kernel**: ``got_loss`` forward + backward at the recipe's shape (B, 144 patches, 30 tokens, the GOT
   projector width) on the GPU, against the straightforward implementation of ``bench.got``.
3. **With Ray, when installed**: the real pre-training path (TorchTrainer, 1 GPU worker, DeepSpeed ZeRO-2 bf16,
   the data pipeline on synthetic 384 px shards): the loop's samples/s after warm-up.

Results go to ``--out`` (JSON, rewritten after every phase, so a run cut short keeps what it measured) and stdout.
Without CUDA it prints one line and exits 2; ``--dry-run`` (= ``--device cpu --tiny``) runs the same code on CPU
with the debug recipe, for tests::

    python -m bench.gpu --out results-gpu.json        # on the GPU machine
    python -m bench.gpu --dry-run --no-ray            # the same code path on CPU in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.workload import NO_DROPOUT

log = logging.getLogger(__name__)

PAPER_CONFIG = "configs/base.yaml"
TINY_CONFIG = "configs/debug.yaml"
# Dense (no sparsity) bf16 tensor-core peaks from the vendor's data sheets, matched on the device name in order.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)
RANDOM_WEIGHTS = ["model.image.pretrained=false", "model.text.pretrained=false"]


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` in TFLOP/s, or None when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def device_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: device name, peak, torch/CUDA versions, CPU cores."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": name,
            "memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda,
            "peak_bf16_tflops": peak_bf16_tflops(name),
        }
    else:
        info |= {"name": platform.processor() or "cpu", "peak_bf16_tflops": None}
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def count_step_flops(engine: Any, batch: Any) -> float:
    """FLOPs of one forward + backward of the task (matmuls, convolutions, attention) counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = engine.forward(batch)["loss"]
        engine.backward(loss)
    engine.module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure_task_steps(
    config_path: str,
    overrides: list[str],
    device: torch.device,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    peak_tflops: float | None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Train the recipe's task for ``warmup + steps`` steps in this process; a batch that does not fit is halved."""
    while True:
        try:
            return _task_steps(
                config_path,
                overrides,
                device,
                batch_size=batch_size,
                steps=steps,
                warmup=warmup,
                peak_tflops=peak_tflops,
                vocab_size=vocab_size,
            )
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            log.warning("batch %d does not fit; trying %d", batch_size, batch_size // 2)
            batch_size //= 2
        finally:
            gc.collect()  # the failed attempt's model and activations, before the allocator's cache is emptied
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _task_steps(
    config_path: str,
    overrides: list[str],
    device: torch.device,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    peak_tflops: float | None,
    vocab_size: int | None,
) -> dict[str, Any]:
    from bench.workload import random_batch, recipe_vocab_size
    from volta.config import load_config
    from volta.task import build_task
    from volta.training.engine import TorchEngine
    from volta.training.loop import seed_step
    from volta.training.schedule import build_optimizer

    config = load_config(config_path, overrides)
    vocab = vocab_size or recipe_vocab_size(config)
    torch.manual_seed(config.train.seed)
    task = build_task(config, vocab).to(device)
    optimizer = build_optimizer(task, config.optim, global_batch_size=config.train.global_batch_size)
    engine = TorchEngine(task, optimizer, precision=config.train.precision, device=device)
    batches = [random_batch(config, batch_size, vocab, seed=i).to(device) for i in range(2)]
    task.train()
    seed_step(config.train.seed, 0, 0)
    flops = count_step_flops(engine, batches[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    losses: list[float] = []
    for step in range(warmup + steps):
        seed_step(config.train.seed, 0, step)
        _sync(device)
        start = time.perf_counter()
        loss = engine.forward(batches[step % 2])["loss"]
        engine.backward(loss)
        engine.step()
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach().float()))
    step_s = statistics.median(times)
    achieved = flops / step_s / 1e12
    result = {
        "batch_size": batch_size,
        "samples_per_s": batch_size / step_s,
        "step_s_median": step_s,
        "step_s_min": min(times),
        "peak_memory_gib": _peak_memory_gib(device),
        "flops_per_step": flops,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "losses": losses,
        "parameters": sum(p.numel() for p in task.parameters()),
        "vocab_size": vocab,
        "precision": config.train.precision,
    }
    del engine, optimizer, task, batches
    return result


def measure_got(
    config_path: str, overrides: list[str], device: torch.device, *, repeats: int
) -> dict[str, Any]:
    """GOT forward + backward at the recipe's shape on ``device``: ours vs ``bench.got``'s straightforward version."""
    from bench.got import baseline_got, make_batch
    from volta.config import load_config
    from volta.losses.got import got_loss

    config = load_config(config_path, overrides)
    c, m = config.loss, config.model
    patches = (m.image.img_size // 32) ** 2  # Swin's final grid: 4x patch embedding, three 2x merges
    shape = (config.train.micro_batch_size, patches, m.text.max_length, m.got_projector_out_dim)
    image, text, image_mask, text_mask = (t.to(device) for t in make_batch(*shape))
    settings = c.got.kwargs()  # the solver settings the task trains with

    def ours(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return got_loss(i, t, image_mask, text_mask, **settings)["loss"]  # type: ignore[arg-type]

    def baseline(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return baseline_got(i, t, image_mask, text_mask)["loss"]

    def time_it(fn: Any) -> float:
        times = []
        for k in range(repeats + 1):
            i, t = image.detach().requires_grad_(), text.detach().requires_grad_()
            _sync(device)
            start = time.perf_counter()
            fn(i, t).backward()
            _sync(device)
            if k:  # the first call is a warm-up
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    ours_s, base_s = time_it(ours), time_it(baseline)
    return {
        "shape_b_p_t_d": list(shape),
        "ours_fwd_bwd_ms": ours_s * 1e3,
        "baseline_fwd_bwd_ms": base_s * 1e3,
        "speedup_vs_baseline": base_s / ours_s,
        "repeats": repeats,
    }


def measure_ray_path(
    config_path: str,
    overrides: list[str],
    device: torch.device,
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    samples: int,
) -> dict[str, Any]:
    """samples/s of the real pre-training path with one worker (Ray Train + DeepSpeed ZeRO-2 + data pipeline)."""
    import ray

    from bench.scaling import run_overrides, step_throughput, write_bench_shards
    from orchestration.pretrain import main as pretrain_main
    from volta.config import load_config

    cores = os.cpu_count() or 1
    image_size = load_config(config_path, overrides).model.image.img_size
    with tempfile.TemporaryDirectory(prefix="volta-bench-gpu-") as tmp:
        root = Path(tmp)
        data = write_bench_shards(
            root / "data", samples=samples, image_size=image_size, workers=min(8, cores)
        )
        sets = [*overrides, *run_overrides(data, root, "gpu-bench", workers=1, steps=warmup + steps)]
        sets += [f"train.global_batch_size={batch_size}", f"train.micro_batch_size={batch_size}"]
        if device.type == "cuda":
            loaders = max(1, min(8, cores - 2))
            sets += ["ray.use_gpu=true", "ray.gpus_per_worker=1", f"ray.cpus_per_worker={loaders + 1}"]
            sets += [f"data.num_workers={loaders}", "train.device=cuda"]
        else:
            sets += ["ray.use_gpu=false", "train.device=cpu"]
        args = ["--config", config_path]
        for item in sets:
            args += ["--set", item]
        started = not ray.is_initialized()
        if started:
            ray.init(include_dashboard=False, log_to_driver=False)
        try:
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                status = pretrain_main(args)
            if status != 0:
                raise RuntimeError(f"the Ray pre-training run failed (exit status {status})")
            result = step_throughput(root / "gpu-bench" / "metrics.jsonl", warmup)
        finally:
            if started:
                ray.shutdown()
    result |= {"wall_s": time.perf_counter() - start, "batch_size": batch_size, "tokenizer_vocab": 400}
    return result


def _write(report: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))


def run(
    *,
    device: torch.device,
    tiny: bool = False,
    config: str | None = None,
    overrides: list[str] | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    batch_size: int | None = None,
    use_ray: bool = True,
    budget_s: float = 450,
    peak_tflops: float | None = None,
    vocab_size: int | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    """Run every phase that fits in ``budget_s``; returns (and writes to ``out`` after each phase) the report.

    ``vocab_size`` defaults to the recipe's tokenizer (RoBERTa's 50,265 for the paper setting).
    """
    from volta.config import load_config

    t0 = time.perf_counter()
    config = config or (TINY_CONFIG if tiny else PAPER_CONFIG)
    steps = steps or (3 if tiny else 10)
    warmup = warmup or (1 if tiny else 3)
    sets = [*RANDOM_WEIGHTS, *NO_DROPOUT, "train.precision=bf16", *(overrides or [])]
    recipe = load_config(config, sets)
    batch = batch_size or (4 if tiny else recipe.train.micro_batch_size)
    info = device_info(device)
    peak = peak_tflops or info["peak_bf16_tflops"]
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.gpu", *sys.argv[1:]]) if __name__ == "__main__" else None,
        "machine": info,
        "config": config,
        "overrides": sets,
        "tiny": tiny,
        "model": {
            "image": recipe.model.image.name,
            "img_size": recipe.model.image.img_size,
            "text": recipe.model.text.name,
            "fusion_depth": recipe.model.fusion_depth,
        },
        "peak_bf16_tflops": peak,
        "skipped": {},
    }

    def left() -> float:
        return budget_s - (time.perf_counter() - t0)

    for name, sharing in (("prefix_sharing_on", True), ("prefix_sharing_off", False)):
        if left() < (5 if tiny else 60):
            report["skipped"][name] = "time budget"
            continue
        report[name] = measure_task_steps(
            config,
            [*sets, f"model.share_unimodal_prefix={str(sharing).lower()}"],
            device,
            batch_size=batch,
            steps=steps,
            warmup=warmup,
            peak_tflops=peak,
            vocab_size=vocab_size,
        )
        _write(report, out)
    on, off = report.get("prefix_sharing_on"), report.get("prefix_sharing_off")
    if on and off:
        report["prefix_sharing_speedup"] = on["samples_per_s"] / off["samples_per_s"]
        report["prefix_sharing_first_loss_rel_diff"] = abs(on["losses"][0] - off["losses"][0]) / abs(
            off["losses"][0]
        )
        if on["batch_size"] != off["batch_size"]:
            report["prefix_sharing_note"] = "the two variants ran at different batch sizes (memory)"
    report["samples_per_s"] = on["samples_per_s"] if on else None
    report["peak_memory_gib"] = on["peak_memory_gib"] if on else None
    report["mfu"] = on["mfu"] if on else None
    if left() > (5 if tiny else 30):
        report["got_kernel"] = measure_got(config, sets, device, repeats=3 if tiny else 10)
    else:
        report["skipped"]["got_kernel"] = "time budget"
    if left() > (5 if tiny else 30):
        # The views rendered on this device (data.views.render_on: device), at the recipe's size and batch.
        from bench.feed import measure_device

        report["device_render"] = measure_device(
            str(device), image_size=recipe.model.image.img_size, batch_size=batch, steps=3 if tiny else 10
        )
    else:
        report["skipped"]["device_render"] = "time budget"
    _write(report, out)
    if not use_ray:
        report["skipped"]["ray"] = "--no-ray"
    elif not _ray_available():
        report["skipped"]["ray"] = "ray/deepspeed not installed"
    elif left() < (60 if tiny else 180):
        report["skipped"]["ray"] = f"time budget ({left():.0f} s left)"
    else:
        report["ray"] = measure_ray_path(
            config,
            sets,
            device,
            batch_size=report["prefix_sharing_on"]["batch_size"] if on else batch,
            steps=steps,
            warmup=warmup,
            samples=64 if tiny else 512,
        )
        if on:
            report["ray"]["over_one_process"] = report["ray"]["samples_per_s"] / on["samples_per_s"]
    report["wall_s"] = time.perf_counter() - t0
    _write(report, out)
    return report


def _ray_available() -> bool:
    try:
        import deepspeed  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="debug recipe, batch 4, 3 steps (for CPU dry runs)")
    p.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny")
    p.add_argument("--config", default=None, help=f"default: {PAPER_CONFIG} ({TINY_CONFIG} with --tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; 3 tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.micro_batch_size (4 tiny)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray + DeepSpeed phase")
    p.add_argument("--budget-s", type=float, default=450, help="phases that would not fit are skipped")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="override the device's bf16 peak (for MFU)"
    )
    p.add_argument("--out", default=None, help="write the JSON report here too")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench.gpu: no CUDA device here; run it on a GPU machine (or --dry-run for the CPU code path)",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu" and not args.tiny:
        print(
            "bench.gpu: the paper setting on CPU would take hours; use --tiny (or --dry-run)", file=sys.stderr
        )
        return 2
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    report = run(
        device=torch.device(args.device),
        tiny=args.tiny,
        config=args.config,
        overrides=args.overrides,
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        use_ray=not args.no_ray,
        budget_s=args.budget_s,
        peak_tflops=args.peak_tflops,
        out=args.out,
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
