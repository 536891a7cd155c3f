"""ZeRO-2 memory: per-rank optimizer, master-weight and gradient bytes with 2 ranks, stage 2 against stage 0.

**Measured** (the debug recipe by default): two gloo ranks on this machine each build the recipe's task and
optimizer exactly as the Ray worker does (``build_optimizer`` sharded for ZeRO, ``build_deepspeed_config`` from the
recipe with ``train.zero_stage`` overridden), create a real DeepSpeed engine, and take one optimizer step on random
batches. Bytes are counted from the engine's own objects, each storage once:

- ``optimizer_state``: the tensors in the wrapped torch optimizer's ``state`` (Adam moments, LARS momentum);
- ``master_weights``: the parameters the torch optimizer updates that are not the model's (ZeRO's fp32 partition
  ``single_partition_of_fp32_groups``, or a mixed-precision optimizer's fp32 copies; none for fp32 stage 0);
- ``gradients``: after the backward pass of an accumulation boundary, before the step: the model parameters'
  ``.grad``, ZeRO's ``averaged_gradients`` partition and the optimizer parameters' ``.grad``;
- ``reduce_buckets``: ZeRO's gradient-reduction buffers during backward (``reduce_bucket_size`` elements each, one
  or two with ``overlap_comm``), reported apart because they are a fixed-size transient, not state.

**Analytic** (the base recipe by default, too large to build twice per rank on a 24 GB machine): the trainable
parameter count comes from the model built on the meta device, and the same quantities follow from the layouts
above (ZeRO-2 divides optimizer state, master weights and gradients by the ranks; parameters are not sharded). The
formula is checked against the measurement on the measured recipe, and both are reported.

    python -m bench.zero_memory [--config configs/debug.yaml] [--cases fp32:adamw bf16:lars] [--analytic configs/base.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("optimizer_state", "master_weights", "gradients")
# Measured by default: the CPU recipes' precision with their optimizer, and bf16 (the GPU precision) with AdamW
# and with LARS, the paper recipe's optimizer, whose ZeRO layout differs (one parameter group per parameter).
CASES = ("fp32:adamw", "bf16:adamw", "bf16:lars")
# Optimizer state per parameter, in fp32 values: Adam's two moments, LARS's momentum buffer.
STATE_FLOATS = {"adamw": 2, "lars": 1}


def _storage_bytes(tensors: Any, exclude: set[int] | None = None) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the tensors' storages, each once (views of one buffer count once)."""
    out: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if exclude is None or storage.data_ptr() not in exclude:
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _zero_gradient_tensors(optimizer: Any) -> list[Any]:
    """The gradient partition a ZeRO stage-1/2 optimizer holds (``averaged_gradients``); [] for other optimizers."""
    out: list[Any] = []
    for value in getattr(optimizer, "averaged_gradients", {}).values():
        if isinstance(value, (list, tuple)):
            out.extend(value)
        else:  # a compact partition buffer object in bf16-with-fp32-accumulation mode
            out.extend(getattr(value, "tensors", None) or [])
            flat = getattr(value, "flat_partition", None)
            if flat is not None:
                out.append(flat)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    rank: int,
    world: int,
    port: int,
    config_path: str,
    overrides: list[str],
    vocab_size: int,
    out_file: str,
) -> None:
    """One rank: build the task + DeepSpeed engine of the recipe, take one optimizer step, write what it holds."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from bench.workload import random_batch
        from orchestration.deepspeed_engine import build_deepspeed_config, initialize_deepspeed
        from volta.config import load_config
        from volta.dist import differentiable_all_reduce_sum
        from volta.task import build_task
        from volta.training.schedule import build_optimizer

        config = load_config(config_path, [*overrides, f"ray.num_workers={world}"])
        torch.manual_seed(config.train.seed)
        task = build_task(config, vocab_size, all_reduce=differentiable_all_reduce_sum)
        params = sum(p.numel() for p in task.parameters() if p.requires_grad)
        optimizer = build_optimizer(
            task,
            config.optim,
            global_batch_size=config.train.global_batch_size,
            sharded=config.train.zero_stage > 0,
        )
        ds_config = build_deepspeed_config(config, world_size=world, on_gpu=False)
        engine = initialize_deepspeed(
            rank=rank, world_size=world, on_gpu=False, model=task, optimizer=optimizer, config=ds_config
        )
        wrapper = engine.optimizer
        buckets = {"peak": 0}
        if hasattr(wrapper, "setup_buckets"):  # record ZeRO's reduce buffers while they exist
            setup = wrapper.setup_buckets

            def recording_setup() -> None:
                setup()
                held = [t for b in wrapper.ipg_buckets.values() for t in b.buffer]
                buckets["peak"] = max(buckets["peak"], sum(_storage_bytes(held).values()))

            wrapper.setup_buckets = recording_setup

        model_storages = set(_storage_bytes(task.parameters()))
        basic = engine.basic_optimizer
        basic_params = [p for g in basic.param_groups for p in g["params"]]
        measured: dict[str, Any] = {}
        for micro in range(config.gradient_accumulation_steps):
            batch = random_batch(config, config.train.micro_batch_size, vocab_size, seed=rank * 1000 + micro)
            loss = engine(batch)["loss"]
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                grads = [p.grad for p in task.parameters()]
                grads += _zero_gradient_tensors(wrapper) + [p.grad for p in basic_params]
                measured["gradients"] = sum(_storage_bytes(grads).values())
            engine.step()
        state = [t for s in basic.state.values() for t in s.values() if torch.is_tensor(t)]
        measured["optimizer_state"] = sum(_storage_bytes(state).values())
        basic_params = [p for g in basic.param_groups for p in g["params"]]  # ZeRO swaps in its partition
        measured["master_weights"] = sum(_storage_bytes(basic_params, exclude=model_storages).values())
        measured["reduce_buckets"] = buckets["peak"]
        measured["parameters_bytes"] = sum(_storage_bytes(task.parameters()).values())
        info = {
            "rank": rank,
            "stage": config.train.zero_stage,
            "precision": config.train.precision,
            "optimizer": config.optim.name,
            "wrapper": type(wrapper).__name__,
            "trainable_parameters": params,
            "loss": float(loss.detach().float()),
            "bytes": measured,
        }
        Path(out_file).write_text(json.dumps(info))
    finally:
        dist.destroy_process_group()


def measure_engines(
    config: str,
    overrides: list[str],
    *,
    stage: int,
    precision: str,
    optimizer: str | None = None,
    world_size: int = 2,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Per-rank bytes of real DeepSpeed engines at ``stage`` over ``world_size`` gloo ranks (the max over ranks).

    ``optimizer`` (``adamw``/``lars``) replaces the recipe's ``optim.name`` when given.
    """
    import torch.multiprocessing as mp

    from volta.config import load_config

    sets = [*overrides, f"train.zero_stage={stage}", f"train.precision={precision}"]
    if optimizer:
        sets.append(f"optim.name={optimizer}")
    if vocab_size is None:
        from bench.workload import recipe_vocab_size

        vocab_size = recipe_vocab_size(load_config(config, sets))
    with tempfile.TemporaryDirectory(prefix="volta-bench-zero-") as tmp:
        files = [str(Path(tmp) / f"rank-{r}.json") for r in range(world_size)]
        port = _free_port()
        mp.start_processes(
            _spawned_rank,
            args=(world_size, port, config, sets, vocab_size, tmp),
            nprocs=world_size,
            start_method="spawn",
        )
        ranks = [json.loads(Path(f).read_text()) for f in files]
    per_rank_max = {k: max(r["bytes"][k] for r in ranks) for k in ranks[0]["bytes"]}
    return {
        "stage": stage,
        "precision": precision,
        "world_size": world_size,
        "vocab_size": vocab_size,
        "optimizer": ranks[0]["optimizer"],
        "wrapper": ranks[0]["wrapper"],
        "trainable_parameters": ranks[0]["trainable_parameters"],
        "per_rank_bytes": per_rank_max,
        "ranks": ranks,
    }


def _spawned_rank(
    rank: int, world: int, port: int, config: str, sets: list[str], vocab_size: int, tmp: str
) -> None:
    _rank_main(rank, world, port, config, sets, vocab_size, str(Path(tmp) / f"rank-{rank}.json"))


def analytic_bytes(
    parameters: int, *, optimizer: str, precision: str, stage: int, world_size: int
) -> dict[str, float]:
    """Per-rank bytes of the ZeRO layouts for ``parameters`` trainable parameters (no alignment padding).

    Model weights and gradients are in the training precision (fp32 4 bytes, bf16 2 bytes; DeepSpeed accumulates
    gradients in the model's dtype by default); optimizer state and master weights are fp32. Stage 0 keeps
    everything whole and needs master weights only in mixed precision; stage 1/2 keep an fp32 master partition
    in every precision and divide state, master weights and (stage 2) gradients by the ranks. Except with LARS:
    under ZeRO it gets one parameter group per parameter (whole-parameter trust ratios), every parameter then
    straddles its own group's partition boundary, and ZeRO-2's contiguous gradient buffer holds each such
    parameter's gradient whole, so gradients are not divided (measured: 1.00x on the debug recipe).
    """
    width = 2 if precision in ("bf16", "fp16") else 4
    shard = world_size if stage >= 1 else 1
    grads_shard = world_size if stage >= 2 and optimizer != "lars" else 1
    out = {
        "optimizer_state": 4.0 * STATE_FLOATS[optimizer] * parameters / shard,
        "master_weights": 4.0 * parameters / shard if (stage >= 1 or width == 2) else 0.0,
        "gradients": float(width * parameters) / grads_shard,
        "parameters_bytes": float(width * parameters),
    }
    return out


def meta_parameter_count(config: str, overrides: list[str]) -> dict[str, Any]:
    """Trainable parameters of a recipe's model built on the meta device (no memory, no download)."""
    import torch

    from bench.workload import recipe_vocab_size
    from volta.config import load_config
    from volta.models.factory import build_model

    cfg = load_config(config, overrides)
    vocab = recipe_vocab_size(cfg)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=vocab)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_parameters": trainable,
        "vocab_size": vocab,
        "optimizer": cfg.optim.name,
        "precision": cfg.train.precision,
        "reduce_bucket_bytes": reduce_bucket_bytes(cfg),
    }


def reduce_bucket_bytes(config: Any) -> float:
    """Bytes of ZeRO-2's gradient-reduction buffers during backward for a recipe's DeepSpeed config.

    ``reduce_bucket_size`` elements in the model's dtype, twice with ``overlap_comm`` (double buffering).
    """
    from orchestration.deepspeed_engine import build_deepspeed_config

    on_gpu = bool(config.ray.use_gpu)
    ds = build_deepspeed_config(config, world_size=config.ray.num_workers, on_gpu=on_gpu)
    zero = ds.get("zero_optimization", {})
    width = 2 if config.train.precision in ("bf16", "fp16") else 4
    buffers = 2 if zero.get("overlap_comm", False) else 1
    return float(buffers * int(zero.get("reduce_bucket_size", 5e8)) * width)


def _ratios(stage2: dict[str, float], stage0: dict[str, float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {k: (stage2[k] / stage0[k] if stage0[k] else None) for k in KINDS}
    both = stage0["optimizer_state"] + stage0["master_weights"]
    out["optimizer_state_with_master"] = (stage2["optimizer_state"] + stage2["master_weights"]) / both
    return out


def run(
    config: str = "configs/debug.yaml",
    overrides: list[str] | None = None,
    *,
    cases: tuple[str, ...] = CASES,
    analytic_config: str | None = "configs/base.yaml",
    world_size: int = 2,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Measure stage 0 and stage 2 engines on ``config`` per ``precision:optimizer`` case, and the analytic
    model on both recipes."""
    overrides = overrides or []
    report: dict[str, Any] = {"world_size": world_size, "measured": {}, "analytic": {}}
    for case in cases:
        precision, _, optim = case.partition(":")
        stages = {
            stage: measure_engines(
                config,
                overrides,
                stage=stage,
                precision=precision,
                optimizer=optim or None,
                world_size=world_size,
                vocab_size=vocab_size,
            )
            for stage in (0, 2)
        }
        params = stages[0]["trainable_parameters"]
        optimizer = stages[0]["optimizer"]
        model = {
            stage: analytic_bytes(
                params, optimizer=optimizer, precision=precision, stage=stage, world_size=world_size
            )
            for stage in (0, 2)
        }
        report["measured"][case] = {
            "config": config,
            "overrides": overrides,
            "precision": precision,
            "trainable_parameters": params,
            "optimizer": optimizer,
            "stage0": stages[0],
            "stage2": stages[2],
            "ratios": _ratios(stages[2]["per_rank_bytes"], stages[0]["per_rank_bytes"]),
            # How far the analytic formula is from the engines (alignment padding, partition boundaries).
            "analytic_rel_error": {
                f"stage{s}.{k}": (stages[s]["per_rank_bytes"][k] - model[s][k]) / model[s][k]
                for s in (0, 2)
                for k in KINDS
                if model[s][k]
            },
        }
    if analytic_config:
        meta = meta_parameter_count(analytic_config, [])
        model = {
            stage: analytic_bytes(
                meta["trainable_parameters"],
                optimizer=meta["optimizer"],
                precision=meta["precision"],
                stage=stage,
                world_size=world_size,
            )
            for stage in (0, 2)
        }
        model[0]["reduce_buckets"] = 0.0
        model[2]["reduce_buckets"] = meta["reduce_bucket_bytes"]
        report["analytic"] = {
            "config": analytic_config,
            **meta,
            "stage0": model[0],
            "stage2": model[2],
            "ratios": _ratios(model[2], model[0]),
        }
    return report


def _mib(x: float) -> str:
    return f"{x / 2**20:10.2f}"


def _print_report(r: dict[str, Any]) -> None:
    print(f"ZeRO per-rank memory, {r['world_size']} ranks, stage 2 vs stage 0 (MiB)")
    rows = [*KINDS, "reduce_buckets"]
    for m in r["measured"].values():
        s0, s2 = m["stage0"]["per_rank_bytes"], m["stage2"]["per_rank_bytes"]
        print(
            f"measured: {m['config']} {m['precision']}, {m['optimizer']}, {m['trainable_parameters'] / 1e6:.2f} M "
            f"parameters ({m['stage0']['wrapper']} vs {m['stage2']['wrapper']})"
        )
        for k in rows:
            ratio = m["ratios"].get(k)
            print(f"  {k:26s}{_mib(s0[k])}{_mib(s2[k])}   {'' if ratio is None else f'{ratio:.3f}x'}")
        print(
            f"  {'optimizer state + master':26s}{'':20s}   {m['ratios']['optimizer_state_with_master']:.3f}x"
        )
    a = r.get("analytic")
    if a:
        print(
            f"analytic: {a['config']} {a['precision']}, {a['optimizer']}, "
            f"{a['trainable_parameters'] / 1e6:.2f} M parameters (meta device)"
        )
        for k in rows:
            ratio = a["ratios"].get(k)
            print(
                f"  {k:26s}{_mib(a['stage0'][k])}{_mib(a['stage2'][k])}   {'' if ratio is None else f'{ratio:.3f}x'}"
            )
        print(
            f"  {'optimizer state + master':26s}{'':20s}   {a['ratios']['optimizer_state_with_master']:.3f}x"
        )
    print("target: stage-2 optimizer state <= 0.55x of stage 0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/debug.yaml", help="recipe measured with real engines")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--cases",
        nargs="+",
        default=list(CASES),
        help="PRECISION:OPTIMIZER pairs measured with real engines (optimizer empty = the recipe's)",
    )
    p.add_argument("--analytic", default="configs/base.yaml", help="recipe computed analytically ('' = none)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the recipe's tokenizer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    report = run(
        args.config,
        args.overrides,
        cases=tuple(args.cases),
        analytic_config=args.analytic or None,
        world_size=args.world_size,
        vocab_size=args.vocab_size,
    )
    _print_report(report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
