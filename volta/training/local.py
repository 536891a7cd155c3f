"""``volta train``: a whole pre-training run in this one process, without Ray or DeepSpeed.

The same run the Ray workers execute (:func:`volta.training.run.assemble`), driven by the plain-torch engine:
for a laptop, a notebook, a debugger, or a single-GPU machine. Checkpoints go to ``<run folder>/checkpoints/``;
running the same command again resumes from the newest one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from volta.config import VoltaConfig
from volta.devices import resolve_device
from volta.dist import Collectives
from volta.training.engine import TorchEngine
from volta.training.loop import LoopState, train
from volta.training.run import Run, assemble

__all__ = ["latest_checkpoint", "train_local"]

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step-"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (a ``step-N`` directory with its loop state), if any."""
    done = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / "client_state.json").exists()]
    return max(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def _save(run: Run, engine: TorchEngine, state: LoopState) -> None:
    """Write ``step-N`` through a temporary folder, so an interrupted save never looks complete."""
    folder = run.out_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    partial = folder / f".partial-{state.step:08d}"
    shutil.rmtree(partial, ignore_errors=True)
    run.save(engine, partial, state)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    log.info("checkpoint %s", final)


def train_local(config: VoltaConfig) -> Run:
    """Train ``config`` in this process (resuming from the run folder's newest checkpoint); returns the run."""
    device = resolve_device(config.train.device)
    resume = latest_checkpoint(Path(config.train.output_dir) / config.ray.run_name / "checkpoints")
    run = assemble(
        config,
        rank=0,
        world_size=1,
        device=device,
        collectives=Collectives.for_world(1),
        load_pretrained=resume is None,
    )
    engine = TorchEngine(
        run.task,
        run.optimizer,
        run.scheduler,
        grad_accum=config.gradient_accumulation_steps,
        grad_clip=config.optim.grad_clip,
        precision=config.train.precision,
        device=device,
    )
    state = LoopState()
    if resume is not None:
        state = LoopState.from_dict(engine.load(resume))
        log.info("resumed from %s at step %d", resume, state.step)

    def checkpoint(st: LoopState, metrics: dict[str, Any]) -> None:
        _save(run, engine, st)

    if state.step < run.settings.total_steps:
        train(engine, run.settings, run.hooks(checkpoint=checkpoint, report=lambda st, m: None), state)
    run.finish()
    return run
