"""The per-worker function Ray Train runs on every rank: DeepSpeed engine + volta's training loop.

Only what is Ray or DeepSpeed lives here: the run itself is assembled by :func:`volta.training.run.assemble`.
Every rank wraps the assembled task in a DeepSpeed engine (ZeRO-2; bf16 on GPU; fp32/bf16 on CPU with gloo),
restores from ``ray.train.get_checkpoint()`` when there is one, and runs :func:`volta.training.loop.train`.
Every rank saves its shard and calls ``ray.train.report`` equally often.
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

from volta.config import config_from_dict
from volta.dist import Collectives
from volta.training.loop import LoopState, train
from volta.training.run import assemble, resolve_device

log = logging.getLogger("volta.worker")


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


def train_fn_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point: one rank of a VoLTA pre-training run described by a validated config dict."""
    import deepspeed
    import ray.train

    from orchestration.deepspeed_engine import DeepSpeedEngineAdapter, build_deepspeed_config
    from orchestration.tracking import Tracker

    config = config_from_dict(config_dict)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray reserved no GPU for this worker unless ray.use_gpu: then the CPU, whatever train.device says.
    device = resolve_device(config.train.device if config.ray.use_gpu else "cpu", ctx.get_local_rank())
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    checkpoint = ray.train.get_checkpoint()
    run = assemble(
        config,
        rank=rank,
        world_size=world,
        device=device,
        collectives=Collectives.for_world(world),
        load_pretrained=checkpoint is None,
    )
    ds_engine, _, _, _ = deepspeed.initialize(
        model=run.task,
        optimizer=run.optimizer,
        lr_scheduler=run.scheduler,
        config=build_deepspeed_config(config, world_size=world, on_gpu=on_gpu),
        dist_init_required=False,
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
    tracker = Tracker.start(config) if rank == 0 else None

    def save_and_report(st: LoopState, metrics: dict[str, float]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"volta-ckpt-{st.step:08d}-r{rank}-"))
        try:
            run.save(engine, tmp, st)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=f"checkpoint-{st.step:08d}",
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def make_loader(epoch: int, start_micro: int) -> Any:
        placement = run.out_dir / "workers" / f"rank-{rank}.json"
        return _record_placement(run.make_loader(epoch, start_micro), placement, rank, world, epoch)

    hooks = run.hooks(
        checkpoint=save_and_report,
        report=lambda st, metrics: ray.train.report(metrics),
        make_loader=make_loader,
        on_metrics=(lambda st, m: tracker.log_metrics(m, step=st.step)) if tracker else None,
        on_picture=(lambda picture: tracker.log_artifact(str(picture), "heatmaps")) if tracker else None,
        preempted=lambda: ray.train.get_preemption_info() is not None,
    )
    if state.step >= run.settings.total_steps:
        log.info("rank %d: run already finished at step %d", rank, state.step)
    else:
        train(engine, run.settings, hooks, state)
    run.finish()
    if tracker is not None:
        tracker.finish()
