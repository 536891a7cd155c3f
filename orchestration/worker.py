"""The per-worker function Ray Train runs on every rank: DeepSpeed engine + volta's training loop.

Every rank builds the task and its data pipeline, creates the DeepSpeed engine (ZeRO-2; bf16 on GPU; fp32/bf16
on CPU with gloo), restores from ``ray.train.get_checkpoint()`` when there is one, and runs
:func:`volta.training.loop.train`. Every rank saves its shard and calls ``ray.train.report`` equally often.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from volta.config import VoltaConfig, config_from_dict, total_steps
from volta.training.loop import LoopHooks, LoopSettings, LoopState, train
from volta.training.metrics import JsonlMetrics, format_progress

log = logging.getLogger("volta.worker")


def _any_rank(flag: bool) -> bool:
    """OR over ranks (one tiny all-reduce); identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (not differentiable; used for LARS norms under ZeRO)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def _record_placement(loader: Any, path: Path, rank: int, world: int, epoch: int) -> Any:
    """Yield the loader's batches; on the first one, write where this rank runs and which samples it reads.

    The file (node id, host, pid, first batch keys) lets a person or a test see how a run spread over nodes.
    """
    import socket

    import ray

    first = True
    for batch in loader:
        if first:
            first = False
            path.parent.mkdir(parents=True, exist_ok=True)
            info = {
                "rank": rank,
                "world_size": world,
                "epoch": epoch,
                "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "first_batch_keys": list(getattr(batch, "keys", [])),
            }
            path.write_text(json.dumps(info))
        yield batch


def _render_validation_heatmaps(
    model: Any, config: VoltaConfig, tokenizer: Any, folder: Path, step: int
) -> Path | None:
    """Word-to-region heat maps of the first ``eval.heatmap_samples`` validation samples (boxes drawn)."""
    from volta.data.factory import build_eval_loader
    from volta.eval.heatmap import render_heatmaps

    assert config.data.val_shards is not None
    loader = build_eval_loader(
        config.data.val_shards,
        tokenizer,
        image_size=config.model.image.img_size,
        max_length=config.model.text.max_length,
        batch_size=config.eval.heatmap_samples,
        max_samples=config.eval.heatmap_samples,
        endpoint_url=config.storage.endpoint_url,
        region=config.storage.region,
    )
    batch = next(iter(loader), None)
    if batch is None:
        return None
    boxes = [list(meta.get("boxes", [])) for meta in batch.metas]
    sizes = [(int(w), int(h)) for w, h in batch.orig_sizes.tolist()]
    return render_heatmaps(
        model,
        config,
        tokenizer,
        list(batch.images),
        batch.captions,
        folder / f"step-{step:08d}.png",
        boxes,
        image_sizes=sizes,
    )


def run_dir(config: VoltaConfig) -> Path:
    """Local folder of this run's files (metrics JSON lines, exported weights, pictures)."""
    return Path(config.train.output_dir) / config.ray.run_name


def train_fn_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point: one rank of a VoLTA pre-training run described by a validated config dict."""
    import deepspeed
    import ray.train

    from orchestration.deepspeed_engine import DeepSpeedEngineAdapter, build_deepspeed_config
    from orchestration.tracking import Tracker
    from volta.data.factory import batches_per_epoch, build_train_loader, samples_per_epoch
    from volta.data.tokenizer import load_tokenizer
    from volta.losses.barlow_twins import differentiable_all_reduce_sum
    from volta.models.export import export_encoders, save_volta_checkpoint
    from volta.task import build_task
    from volta.training.schedule import build_optimizer, build_scheduler

    config = config_from_dict(config_dict)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    on_gpu = config.ray.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank

    tokenizer = load_tokenizer(config.tokenizer_name)
    distributed = world > 1
    task = build_task(config, tokenizer, all_reduce=differentiable_all_reduce_sum if distributed else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        from volta.models.factory import load_pretrained_weights

        load_pretrained_weights(task.model, config.model)

    micro_per_epoch = batches_per_epoch(config, world)
    steps = total_steps(config, samples_per_epoch(config))
    steps_per_epoch = max(1, micro_per_epoch // config.gradient_accumulation_steps)
    optimizer = build_optimizer(
        task,
        config.optim,
        global_batch_size=config.train.global_batch_size,
        sharded=config.train.zero_stage > 0 and distributed,
        norm_all_reduce=_sum_over_ranks,
    )
    scheduler = build_scheduler(optimizer, config.optim, total_steps=steps, steps_per_epoch=steps_per_epoch)
    ds_config = build_deepspeed_config(config, world_size=world, on_gpu=on_gpu)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    engine = DeepSpeedEngineAdapter(ds_engine, device)

    state = LoopState()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = LoopState.from_dict(engine.load(ckpt_dir))
        log.info(
            "rank %d resumed at step %d (epoch %d, micro-batch %d)",
            rank,
            state.step,
            state.epoch,
            state.micro_in_epoch,
        )

    out_dir = run_dir(config)
    jsonl = JsonlMetrics(out_dir / "metrics.jsonl") if rank == 0 else None
    tracker = Tracker.start(config) if rank == 0 else None

    def make_loader(epoch: int, start_micro: int) -> Any:
        loader = build_train_loader(
            config, tokenizer, rank=rank, world_size=world, epoch=epoch, start_batch=start_micro
        )
        return _record_placement(loader, out_dir / "workers" / f"rank-{rank}.json", rank, world, epoch)

    def on_step(st: LoopState, metrics: dict[str, float]) -> None:
        if rank == 0:
            assert jsonl is not None
            jsonl.write(metrics)
            if tracker is not None:
                tracker.log_metrics(metrics, step=st.step)
            if st.step % config.train.log_every == 0 or st.step == steps:
                log.info(format_progress(metrics, steps))

    def save_and_report(st: LoopState, metrics: dict[str, float]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"volta-ckpt-{st.step:08d}-r{rank}-"))
        try:
            engine.save(tmp, st.to_dict())
            if rank == 0:
                # A safetensors copy of the whole model: evaluation and export never unpickle training state.
                save_volta_checkpoint(task.model, tmp / "volta", config)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=f"checkpoint-{st.step:08d}",
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def report_only(st: LoopState, metrics: dict[str, float]) -> None:
        ray.train.report(metrics)

    def validate(st: LoopState) -> dict[str, float]:
        # Rank 0 only: evaluation runs the model in eval mode (running BatchNorm statistics, no collectives),
        # while the other ranks go on and wait for rank 0 in the next step's collectives.
        if rank != 0 or not config.data.val_shards:
            return {}
        from volta.eval.validate import run_validation

        metrics = run_validation(
            task.model,
            config,
            tokenizer,
            shards=config.data.val_shards,
            device=device,
            max_samples=config.eval.max_samples,
        )
        if config.eval.heatmap_samples > 0:
            picture = _render_validation_heatmaps(
                task.model, config, tokenizer, out_dir / "heatmaps", st.step
            )
            if tracker is not None and picture is not None:
                tracker.log_artifact(str(picture), "heatmaps")
        return metrics

    def preempted() -> bool:
        return ray.train.get_preemption_info() is not None

    settings = LoopSettings(
        total_steps=steps,
        micro_per_epoch=micro_per_epoch,
        grad_accum=config.gradient_accumulation_steps,
        global_batch_size=config.train.global_batch_size,
        seed=config.train.seed,
        rank=rank,
        log_every=config.train.log_every,
        checkpoint_every=config.train.checkpoint_every,
        val_every=config.train.val_every,
        max_nonfinite_in_row=config.train.max_nonfinite_in_row,
    )
    hooks = LoopHooks(
        make_loader=make_loader,
        any_rank=_any_rank,
        on_step=on_step,
        checkpoint=save_and_report,
        validate=validate,
        report=report_only,
        preempted=preempted,
    )
    if state.step >= steps:
        log.info("rank %d: run already finished at step %d", rank, state.step)
    else:
        train(engine, settings, hooks, state)
    if rank == 0:
        save_volta_checkpoint(task.model, out_dir / "final", config)
        export_encoders(task.model, out_dir / "export", config, tokenizer=tokenizer)
        log.info("final model in %s, exported encoders in %s", out_dir / "final", out_dir / "export")
        if tracker is not None:
            tracker.finish()
