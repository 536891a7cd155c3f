"""The composition root of a pre-training run: one rank's task, optimizer inputs, loaders, validation, outputs.

:func:`assemble` builds everything one rank needs except the engine and the launcher's own reporting, so every
launcher (the Ray Train worker in ``orchestration/worker.py``, the single-process ``volta train``, a notebook)
runs the same run::

    run = assemble(config, rank=0, world_size=1, device=torch.device("cpu"), collectives=Collectives.for_world(1))
    engine = TorchEngine(run.task, run.optimizer, run.scheduler, ...)   # or DeepSpeed around the same objects
    train(engine, run.settings, run.hooks(checkpoint=..., report=...), state)
    run.finish()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from volta.config import VoltaConfig, total_steps
from volta.dist import Collectives
from volta.task import VoLTATask, build_task
from volta.training.engine import Engine
from volta.training.heap import release_free_heap
from volta.training.loop import LoopHooks, LoopSettings, LoopState
from volta.training.metrics import JsonlMetrics, format_progress

__all__ = ["Run", "assemble", "run_dir"]

log = logging.getLogger(__name__)

StepCallback = Callable[[LoopState, dict[str, float]], None]


def run_dir(config: VoltaConfig) -> Path:
    """Local folder of this run's files (metrics JSON lines, exported weights, pictures)."""
    return Path(config.train.output_dir) / config.ray.run_name


@dataclass
class Run:
    """One rank of an assembled run. Launchers wrap ``task``/``optimizer``/``scheduler`` in an engine and call
    :meth:`hooks` with their reporting; rank 0 writes metrics, pictures and the final model."""

    config: VoltaConfig
    rank: int
    world_size: int
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    task: VoLTATask
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    settings: LoopSettings
    collectives: Collectives
    out_dir: Path

    def __post_init__(self) -> None:
        self._metrics = JsonlMetrics(self.out_dir / "metrics.jsonl") if self.rank == 0 else None

    # ------------------------------------------------------------------------------------------------ data
    def make_loader(
        self, epoch: int, start_micro: int, consumed: Mapping[str, int] | None = None
    ) -> Iterable[Any]:
        """This rank's training batches of ``epoch`` from micro-batch ``start_micro`` on (``consumed``: the
        per-worker sample counts of the batches read so far, which make the resume exact)."""
        from volta.data.factory import build_train_loader

        return build_train_loader(
            self.config,
            self.tokenizer,
            rank=self.rank,
            world_size=self.world_size,
            epoch=epoch,
            start_batch=start_micro,
            consumed=consumed or None,
            # Page-locked batches on a GPU host: the copy to the device overlaps compute (non_blocking moves).
            pin_memory=self.device.type == "cuda",
        )

    # ------------------------------------------------------------------------------------------ per step
    def log_step(self, state: LoopState, metrics: dict[str, float]) -> None:
        """Rank 0: append the step's metrics to ``metrics.jsonl`` and log a progress line every ``log_every``."""
        if self._metrics is None:
            return
        self._metrics.write(metrics)
        if state.step % self.config.train.log_every == 0 or state.step == self.settings.total_steps:
            log.info(format_progress(metrics, self.settings.total_steps))

    def validate(
        self, state: LoopState, on_picture: Callable[[Path], None] | None = None
    ) -> dict[str, float]:
        """Rank 0: validation metrics and (``eval.heatmap_samples``) a heat-map picture; {} on other ranks.

        Evaluation runs the model in eval mode (running BatchNorm statistics, no collectives), while the other
        ranks go on and wait for rank 0 in the next step's collectives.
        """
        if self.rank != 0 or not self.config.data.val_shards:
            return {}
        from volta.eval.validate import run_validation

        metrics = run_validation(
            self.task.model,
            self.config,
            self.tokenizer,
            shards=self.config.data.val_shards,
            device=self.device,
            max_samples=self.config.eval.max_samples,
        )
        if self.config.eval.heatmap_samples > 0:
            picture = self.render_heatmaps(state.step)
            if picture is not None and on_picture is not None:
                on_picture(picture)
        return metrics

    def render_heatmaps(self, step: int) -> Path | None:
        """Word-to-region heat maps of the first ``eval.heatmap_samples`` validation samples (boxes drawn)."""
        from volta.data.factory import build_config_eval_loader
        from volta.eval.heatmap import render_heatmaps

        assert self.config.data.val_shards is not None
        n = self.config.eval.heatmap_samples
        loader = build_config_eval_loader(
            self.config, self.tokenizer, self.config.data.val_shards, batch_size=n, max_samples=n
        )
        batch = next(iter(loader), None)
        if batch is None:
            return None
        return render_heatmaps(
            self.task.model,
            self.config,
            self.tokenizer,
            list(batch.images),
            batch.captions,
            self.out_dir / "heatmaps" / f"step-{step:08d}.png",
            [list(meta.get("boxes", [])) for meta in batch.metas],
            image_sizes=[(int(w), int(h)) for w, h in batch.orig_sizes.tolist()],
        )

    # --------------------------------------------------------------------------------------- checkpoints
    def save(self, engine: Engine, directory: Path, state: LoopState) -> None:
        """Every rank: the engine's state (its shard) and the loop state; rank 0 adds a safetensors copy of the
        whole model under ``volta/``, so evaluation and export never unpickle training state."""
        from volta.models.export import save_volta_checkpoint

        engine.save(directory, state.to_dict())
        if self.rank == 0:
            save_volta_checkpoint(self.task.model, directory / "volta", self.config)

    def finish(self) -> None:
        """Rank 0: the final model (``final/``) and the exported encoders (``export/``) in the run folder."""
        if self.rank != 0:
            return
        from volta.models.export import export_encoders, save_volta_checkpoint

        save_volta_checkpoint(self.task.model, self.out_dir / "final", self.config)
        export_encoders(self.task.model, self.out_dir / "export", self.config, tokenizer=self.tokenizer)
        log.info(
            "final model in %s, exported encoders in %s", self.out_dir / "final", self.out_dir / "export"
        )

    # -------------------------------------------------------------------------------------------- hooks
    def hooks(
        self,
        *,
        checkpoint: StepCallback,
        report: StepCallback,
        make_loader: Callable[[int, int, Mapping[str, int]], Iterable[Any]] | None = None,
        on_metrics: StepCallback | None = None,
        on_picture: Callable[[Path], None] | None = None,
        preempted: Callable[[], bool] = lambda: False,
    ) -> LoopHooks:
        """The loop's hooks: this run's loader, logging and validation around the launcher's reporting."""

        trim_every = self.config.train.heap_trim_every

        def on_step(state: LoopState, metrics: dict[str, float]) -> None:
            self.log_step(state, metrics)
            if on_metrics is not None and self.rank == 0:
                on_metrics(state, metrics)
            if trim_every is not None and state.step % trim_every == 0:
                release_free_heap()

        return LoopHooks(
            make_loader=make_loader or self.make_loader,
            any_rank=self.collectives.any_rank,
            on_step=on_step,
            checkpoint=checkpoint,
            validate=lambda state: self.validate(state, on_picture),
            report=report,
            preempted=preempted,
        )


def assemble(
    config: VoltaConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    collectives: Collectives,
    load_pretrained: bool = True,
) -> Run:
    """Build one rank of a run: tokenizer, task (pretrained weights unless resuming), optimizer and LR schedule
    sized to the run, and the loop settings. Seeds torch so that every rank starts from identical weights."""
    from volta.data.factory import batches_per_epoch, samples_per_epoch
    from volta.data.tokenizer import load_tokenizer
    from volta.training.schedule import build_optimizer, build_scheduler

    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    tokenizer = load_tokenizer(config.tokenizer_name)
    task = build_task(config, len(tokenizer), all_reduce=collectives.all_reduce)
    if load_pretrained:
        from volta.models.factory import load_pretrained_weights

        load_pretrained_weights(task.model, config.model)
    micro_per_epoch = batches_per_epoch(config, world_size)
    steps = total_steps(config, samples_per_epoch(config))
    optimizer = build_optimizer(
        task,
        config.optim,
        global_batch_size=config.train.global_batch_size,
        sharded=config.train.zero_stage > 0 and world_size > 1,
        norm_all_reduce=collectives.sum_over_ranks,
    )
    steps_per_epoch = max(1, micro_per_epoch // config.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, config.optim, total_steps=steps, steps_per_epoch=steps_per_epoch)
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
    return Run(
        config=config,
        rank=rank,
        world_size=world_size,
        device=device,
        tokenizer=tokenizer,
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        settings=settings,
        collectives=collectives,
        out_dir=run_dir(config),
    )
