"""The per-worker function Ray Train runs on every rank: DeepSpeed engine + volta's training loop.

Only what is Ray or DeepSpeed lives here: the run itself is assembled by :func:`volta.training.run.assemble`.
Every rank wraps the assembled task in a DeepSpeed engine (ZeRO-2; bf16 on GPU; fp32/bf16 on CPU with gloo),
restores from the newest complete checkpoint in storage (Ray's registered one, or a newer one whose every rank
manifest verifies; a corrupt download falls back to an older one) and runs :func:`volta.training.loop.train`.
Every rank saves its shard with a manifest and calls ``ray.train.report`` equally often; rank 0 keeps the run's
metrics file and heat maps in storage. A deterministic failure is recorded in the run's ``FAILED.json`` so that
Ray's retries stop at once (:mod:`volta.training.failures`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from volta import failpoints
from volta.config import config_from_dict
from volta.devices import resolve_device
from volta.dist import Collectives
from volta.errors import DataError
from volta.run_storage import RunStorage, checkpoint_step, verify_checkpoint_dir, write_manifest
from volta.training.failures import (
    deterministic_kind,
    failure_line,
    read_failure,
    record_failure,
    record_retried_failure,
)
from volta.training.loop import LoopState, train
from volta.training.run import assemble

log = logging.getLogger("volta.worker")


def _record_placement(loader: Any, path: Path, rank: int, world: int, epoch: int) -> Any:
    """Yield the loader's batches; on the first one, write where this rank runs and which samples it reads.

    The file (node id, host, pid, first batch keys) lets a person or a test see how a run spread over nodes.
    """
    import socket

    import ray

    first = True
    for batch in loader:
        position = getattr(batch, "position", {})
        failpoints.trace(
            f"rank{rank}",
            {
                "epoch": position.get("epoch"),
                "batch": position.get("next_batch", 0) - 1,
                "keys": list(batch.keys),
            },
        )
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


def _storage_checkpoint(config: Any, name: str) -> Any:
    """A Ray Checkpoint for the folder ``name`` of this run in storage (not necessarily registered by Ray)."""
    import ray.train

    from orchestration.pretrain import storage_target

    path, filesystem = storage_target(config)
    return ray.train.Checkpoint(path=f"{path}/{config.ray.run_name}/{name}", filesystem=filesystem)


def _candidates(config: Any, storage: RunStorage, registered: Any, rank: int) -> list[tuple[str, Any, bool]]:
    """Checkpoints to resume from, best first: (name, Ray checkpoint, verified by manifests in storage).

    A checkpoint complete in storage (every rank's manifest present, every file it lists there with its size)
    and newer than Ray's registered one comes first: a worker killed after writing it but before Ray registered
    it must not cost its steps. Ray's registered checkpoint follows, then older complete ones (if a download
    turns out corrupt). Incomplete checkpoints newer than the registered one are partial saves of killed
    workers: rank 0 deletes them.
    """
    registered_name = Path(registered.path).name if registered is not None else None
    registered_step = checkpoint_step(registered_name or "") if registered_name else None
    newest, stale = storage.newest_complete_checkpoint(
        after=registered_step if registered_step is not None else -1
    )
    if rank == 0:
        for name in stale:
            log.warning("deleting %s: incomplete in storage (%s)", name, storage.checkpoint_problem(name))
            storage.delete(name)
    out: list[tuple[str, Any, bool]] = []
    if newest is not None:
        log.info(
            "resuming from %s: complete in storage (all rank manifests verify) and newer than Ray's registered %s",
            newest,
            registered_name or "none",
        )
        out.append((newest, _storage_checkpoint(config, newest), True))
    if registered is not None and registered_name is not None:
        out.append((registered_name, registered, storage.checkpoint_problem(registered_name) is None))
    for name in reversed(storage.checkpoint_names()):
        step = checkpoint_step(name) or 0
        if (
            registered_step is not None
            and step < registered_step
            and storage.checkpoint_problem(name) is None
        ):
            out.append((name, _storage_checkpoint(config, name), True))
    return out


@contextlib.contextmanager
def private_copy(checkpoint: Any, rank: int) -> Iterator[str]:
    """A directory holding ``checkpoint``'s files that no other process writes to or deletes while it is open.

    Ray's ``Checkpoint.as_directory`` downloads a remote checkpoint into one directory per checkpoint object,
    shared by the ranks of a node: a rank that enters after another has finished downloading downloads it again
    over the files the other is reading, and the last one out deletes it (a CI run saw rank 0 read a torn
    ``mp_rank_00_model_states.pt`` after a restart). Each rank therefore downloads into a directory of its own
    and deletes it when done; a checkpoint on the local file system is read in place, never copied.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    local = tempfile.mkdtemp(prefix=f"volta-resume-r{rank}-")
    try:
        checkpoint.to_directory(local)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _restore_metrics(storage: RunStorage, local: Path, step: int) -> None:
    """Rank 0 on resume: the run's metrics file from storage, cut after ``step`` (the steps about to be redone)."""
    data = storage.get_bytes("metrics.jsonl")
    lines = data.decode().splitlines() if data else (local.read_text().splitlines() if local.exists() else [])
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text("".join(f"{line}\n" for line in kept))


def train_fn_per_worker(config_dict: dict[str, Any]) -> None:
    """Ray Train entry point: one rank of a VoLTA pre-training run described by a validated config dict."""
    import ray.train

    from orchestration.tracking import Tracker
    from volta.data.s3 import S3Location

    config = config_from_dict(config_dict)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage = RunStorage.for_run(
        config.storage.path, config.ray.run_name, S3Location.from_storage(config.storage)
    )
    failed = read_failure(storage)
    if failed is not None:  # a deterministic failure stopped this run: a retry would only repeat it
        log.error("rank %d: not training: %s", rank, failure_line(failed))
        return
    progress = _Progress()
    try:
        _train(config, storage, rank, world, ctx, progress, Tracker)
    except Exception as exc:
        kind = deterministic_kind(exc)
        if kind is not None:
            step = max(progress.step, int(getattr(exc, "step", 0)))
            record = record_failure(
                storage, exc, kind=kind, rank=rank, step=step, last_checkpoint=progress.checkpoint
            )
            log.error("rank %d: %s", rank, failure_line(record))
        else:
            record_retried_failure(
                storage, exc, rank=rank, step=progress.step, last_checkpoint=progress.checkpoint
            )
        raise


class _Progress:
    """What a failure record needs: the step reached and the last complete checkpoint's location."""

    step: int = 0
    checkpoint: str | None = None


def _train(
    config: Any, storage: RunStorage, rank: int, world: int, ctx: Any, progress: _Progress, tracker_cls: Any
) -> None:
    import ray.train

    from orchestration.deepspeed_engine import (
        DeepSpeedEngineAdapter,
        build_deepspeed_config,
        initialize_deepspeed,
    )

    # Ray reserved no GPU for this worker unless ray.use_gpu: then the CPU, whatever train.device says.
    device = resolve_device(config.train.device if config.ray.use_gpu else "cpu", ctx.get_local_rank())
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    candidates = _candidates(config, storage, ray.train.get_checkpoint(), rank)
    run = assemble(
        config,
        rank=rank,
        world_size=world,
        device=device,
        collectives=Collectives.for_world(world),
        load_pretrained=not candidates,
    )
    ds_engine = initialize_deepspeed(
        rank=rank,
        world_size=world,
        on_gpu=on_gpu,
        model=run.task,
        optimizer=run.optimizer,
        lr_scheduler=run.scheduler,
        config=build_deepspeed_config(config, world_size=world, on_gpu=on_gpu),
    )
    engine: Any = DeepSpeedEngineAdapter(ds_engine, device)
    state = LoopState()
    resumed: str | None = None
    problems: list[str] = []
    for name, checkpoint, manifests in candidates:
        with private_copy(checkpoint, rank) as ckpt_dir:
            problem = verify_checkpoint_dir(Path(ckpt_dir)) if manifests else None
            if problem is not None:
                problems.append(f"{name}: {problem}")
                log.warning("rank %d: %s is corrupt (%s); trying an older checkpoint", rank, name, problem)
                continue
            state = LoopState.from_dict(engine.load(ckpt_dir))
            resumed = name
            break
    if candidates and resumed is None:
        raise DataError(f"no checkpoint of this run can be loaded: {'; '.join(problems)}")
    if resumed is not None:
        progress.checkpoint = storage.url(resumed)
        log.info("rank %d resumed at step %d from %s (epoch %d, micro-batch %d)", rank, state.step, resumed,
                 state.epoch, state.micro_in_epoch)  # fmt: skip
        if rank == 0:
            _restore_metrics(storage, run.out_dir / "metrics.jsonl", state.step)
            _append_resume(storage, state.step, resumed)
    progress.step = state.step
    if os.environ.get(failpoints.ENV):
        engine = _FailpointEngine(engine, rank, state.step)
    tracker = tracker_cls.start(config) if rank == 0 else None

    def upload_metrics() -> None:
        local = run.out_dir / "metrics.jsonl"
        if rank == 0 and local.exists():
            storage.put_file("metrics.jsonl", local)

    def save_and_report(st: LoopState, metrics: dict[str, float]) -> None:
        name = f"checkpoint-{st.step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f"volta-ckpt-{st.step:08d}-r{rank}-"))
        try:
            run.save(engine, tmp, st)
            upload_metrics()  # before the checkpoint can exist: a resume from it always finds its steps' metrics
            failpoints.kill_once("kill_in_save", rank=rank, step=st.step)
            write_manifest(tmp, rank=rank, world_size=world, step=st.step)
            if failpoints.armed("kill_unregistered", rank=rank, step=st.step):
                _die_unregistered(storage, name, tmp, rank)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress.checkpoint = storage.url(name)

    def on_step(st: LoopState, metrics: dict[str, float]) -> None:
        progress.step = st.step
        if tracker is not None:
            tracker.log_metrics(metrics, step=st.step)

    def on_picture(picture: Path) -> None:
        storage.put_file(f"heatmaps/{picture.name}", picture)
        if tracker is not None:
            tracker.log_artifact(str(picture), "heatmaps")

    def make_loader(epoch: int, start_micro: int, consumed: Mapping[str, int]) -> Any:
        placement = run.out_dir / "workers" / f"rank-{rank}.json"
        loader = run.make_loader(epoch, start_micro, consumed)
        return _record_placement(loader, placement, rank, world, epoch)

    hooks = run.hooks(
        checkpoint=save_and_report,
        report=lambda st, metrics: ray.train.report(metrics),
        make_loader=make_loader,
        on_metrics=on_step,
        on_picture=on_picture if rank == 0 else None,
        preempted=lambda: ray.train.get_preemption_info() is not None,
    )
    if state.step >= run.settings.total_steps:
        log.info("rank %d: run already finished at step %d", rank, state.step)
    else:
        train(engine, run.settings, hooks, state)
    # The final model and the exported encoders are made by the driver from the last registered checkpoint.
    upload_metrics()
    if tracker is not None:
        tracker.finish()


class _FailpointEngine:
    """The engine with the fault-injection tests' failpoints around it (only when VOLTA_FAILPOINTS is set)."""

    def __init__(self, inner: Any, rank: int, step: int) -> None:
        self.inner, self.rank, self.steps_done = inner, rank, step

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, batch: Any) -> Any:
        out = dict(self.inner.forward(batch))
        step = self.steps_done + 1
        if failpoints.armed("nan_loss", rank=self.rank, step=step):
            out["loss"] = out["loss"] * float("nan")
        failpoints.kill_once(
            "kill_mid_step", rank=self.rank, step=step
        )  # after the forward, before the update
        return out

    def step(self) -> None:
        boundary = self.inner.is_gradient_accumulation_boundary()
        self.inner.step()
        self.steps_done += int(boundary)


def _die_unregistered(storage: RunStorage, name: str, part: Path, rank: int) -> None:
    """Failpoint ``kill_unregistered``: this rank's part of checkpoint ``name`` reaches storage, all ranks wait
    for each other, then die before Ray registers it (a whole worker group lost at the worst moment)."""
    marker = Path(os.environ[failpoints.DIR_ENV]) / f"kill_unregistered.rank{rank}.fired"
    if marker.exists():
        return
    storage.put_dir(name, part)
    torch.distributed.barrier()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)


def _append_resume(storage: RunStorage, step: int, name: str) -> None:
    """Rank 0: one line per resume in the run's ``resumes.jsonl`` (which checkpoint, which step)."""
    old = storage.get_bytes("resumes.jsonl") or b""
    line = json.dumps(
        {"step": step, "checkpoint": name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )
    storage.put_bytes("resumes.jsonl", old + line.encode() + b"\n")
