"""The training loop: step, skip non-finite, checkpoint, validate, report. It reads top to bottom.

It drives an :class:`~volta.training.engine.Engine` and knows nothing about Ray or DeepSpeed: collectives
(``any_rank``) and side effects (logging, checkpoint + report, validation) are injected as :class:`LoopHooks`.
Randomness is reseeded from ``(seed, rank, step, micro-batch)`` before every forward pass, so a run resumed from
a checkpoint draws the same dropout masks and ITM negatives as an uninterrupted one without storing generator
states.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from volta.errors import DataError
from volta.training.engine import Engine, is_finite, zero_loss

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm: the run is diverging."""

    def __init__(self, message: str, *, step: int = 0) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class LoopState:
    """Everything the loop needs to resume exactly: counters and the data position (JSON-serialisable)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    samples_seen: int = 0
    nonfinite_skipped: int = 0  # micro-batches whose loss was non-finite (their gradient replaced by zeros)
    nonfinite_grad_steps: int = 0  # steps whose gradient norm was non-finite (the engine skipped the update)
    nonfinite_in_row: int = 0
    data_skipped: dict[str, int] = field(default_factory=dict)
    # Samples each DataLoader worker role had drawn this epoch: the batches' position["consumed"] maps, merged.
    data_consumed: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopState:
        """Rebuild from :meth:`to_dict` output (unknown keys ignored for forward compatibility)."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _no_collective(flag: bool) -> bool:
    return flag


def _nothing(*_: Any) -> None:
    return None


@dataclass
class LoopHooks:
    """Injected behaviour. Only ``make_loader`` is required.

    - ``make_loader(epoch, start_micro, consumed)``: the micro-batch iterable of an epoch, starting at a position
      (``consumed``: the samples each DataLoader worker role had drawn, from the batches' positions).
    - ``any_rank(flag)``: True when ``flag`` is True on any rank (a collective; identity in one process).
    - ``on_step(state, metrics)``: after every optimizer step (logging, JSON lines, tracker).
    - ``validate(state)``: validation metrics, every ``val_every`` steps.
    - ``checkpoint(state, metrics)``: save + report, every ``checkpoint_every`` steps, at the end and on preemption.
    - ``report(state, metrics)``: report without a checkpoint, every ``log_every`` steps.
    - ``preempted()``: True once a preemption notice arrived on this rank.
    """

    make_loader: Callable[[int, int, Mapping[str, int]], Iterable[Any]]
    any_rank: Callable[[bool], bool] = _no_collective
    on_step: Callable[[LoopState, dict[str, float]], None] = _nothing
    validate: Callable[[LoopState], dict[str, float]] | None = None
    checkpoint: Callable[[LoopState, dict[str, float]], None] = _nothing
    report: Callable[[LoopState, dict[str, float]], None] = _nothing
    preempted: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class LoopSettings:
    """Plain values the loop needs from the config."""

    total_steps: int
    micro_per_epoch: int
    grad_accum: int
    global_batch_size: int
    seed: int = 0
    rank: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    val_every: int | None = None
    max_nonfinite_in_row: int = 10


def seed_step(seed: int, rank: int, step: int, micro: int = 0) -> None:
    """Seed torch, numpy and random from (seed, rank, step, micro-batch): randomness is a pure function of them."""
    value = (seed * 1_000_003 + rank * 7_919 + step * 131 + micro) % (2**31 - 1)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


class _Batches:
    """Micro-batches across epoch boundaries, tracking the position in the loop state."""

    def __init__(self, hooks: LoopHooks, state: LoopState, micro_per_epoch: int) -> None:
        self.hooks, self.state, self.micro_per_epoch = hooks, state, micro_per_epoch
        self._it: Iterator[Any] | None = None

    def next(self) -> Any:
        s = self.state
        if s.micro_in_epoch >= self.micro_per_epoch:
            s.epoch, s.micro_in_epoch, self._it = s.epoch + 1, 0, None
            s.data_consumed = {}
        if self._it is None:
            self._it = iter(self.hooks.make_loader(s.epoch, s.micro_in_epoch, dict(s.data_consumed)))
        try:
            batch = next(self._it)
        except StopIteration:
            raise DataError(
                f"the data loader of epoch {s.epoch} ended after {s.micro_in_epoch} micro-batches; "
                f"expected {self.micro_per_epoch} (equal batches per rank are required)"
            ) from None
        s.micro_in_epoch += 1
        consumed = (getattr(batch, "position", None) or {}).get("consumed", {})
        s.data_consumed.update({str(role): int(n) for role, n in consumed.items()})
        return batch


def _merge_stats(total: dict[str, int], stats: Mapping[str, int] | None) -> None:
    for k, v in (stats or {}).items():
        total[k] = total.get(k, 0) + int(v)


def train(
    engine: Engine, settings: LoopSettings, hooks: LoopHooks, state: LoopState | None = None
) -> LoopState:
    """Run optimizer steps from ``state.step`` to ``settings.total_steps``; return the final state."""
    state = state or LoopState()
    batches = _Batches(hooks, state, settings.micro_per_epoch)
    start_time, start_step = time.perf_counter(), state.step
    preempt_saved = False
    engine.module.train()
    while state.step < settings.total_steps:
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        good = 0
        for micro in range(settings.grad_accum):
            batch = batches.next()
            _merge_stats(state.data_skipped, getattr(batch, "stats", None))
            # Seeded after fetching: creating a loader (as a resumed run does) draws from the global generator.
            seed_step(settings.seed, settings.rank, state.step, micro)
            out = engine.forward(batch)
            loss = out["loss"]
            if hooks.any_rank(not is_finite(loss)):
                # Every rank replaces this micro-batch's loss by an exact zero so collectives stay matched.
                engine.backward(zero_loss(engine.module))
                state.nonfinite_skipped += 1
            else:
                engine.backward(loss)
                good += 1
                for k, v in out.items():
                    if v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v.detach().float())
            engine.step()
        # A finite loss can still give non-finite gradients (an overflow in the backward pass). The engines skip
        # such an update (DeepSpeed: the ZeRO optimizer's overflow check; TorchEngine: the same rule) and report
        # the norm as non-finite; the norm is global, so every rank sees the same value.
        norm = engine.grad_norm()
        bad_grads = norm is not None and not math.isfinite(norm)
        state.nonfinite_grad_steps += int(bad_grads)
        state.step += 1
        state.samples_seen += settings.global_batch_size
        bad_step = good < settings.grad_accum or bad_grads
        state.nonfinite_in_row = state.nonfinite_in_row + 1 if bad_step else 0
        if state.nonfinite_in_row >= settings.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"non-finite loss or gradients in {state.nonfinite_in_row} consecutive steps (step {state.step}); "
                "lower the learning rate or check the data",
                step=state.step,
            )
        dt = time.perf_counter() - t0
        metrics = {f"train/{k}": v / good for k, v in sums.items()} if good else {}
        metrics["train/lr"] = engine.lr()
        if norm is not None and not bad_grads:
            metrics["train/grad_norm"] = norm
        metrics["train/samples_per_s"] = settings.global_batch_size / max(dt, 1e-9)
        metrics["train/nonfinite_skipped"] = float(state.nonfinite_skipped)
        metrics["train/nonfinite_grad_steps"] = float(state.nonfinite_grad_steps)
        metrics.update({f"data/skipped_{k}": float(v) for k, v in state.data_skipped.items()})
        metrics["step"] = float(state.step)
        metrics["epoch"] = float(state.epoch)
        elapsed = time.perf_counter() - start_time
        metrics["eta_s"] = elapsed / (state.step - start_step) * (settings.total_steps - state.step)
        if settings.val_every and hooks.validate is not None and state.step % settings.val_every == 0:
            metrics.update(hooks.validate(state))
            engine.module.train()
        hooks.on_step(state, metrics)
        final = state.step == settings.total_steps
        if not preempt_saved and hooks.any_rank(hooks.preempted()):
            log.warning("preemption notice: checkpointing at step %d", state.step)
            hooks.checkpoint(state, metrics)
            preempt_saved = True
        elif final or state.step % settings.checkpoint_every == 0:
            hooks.checkpoint(state, metrics)
        elif state.step % settings.log_every == 0:
            hooks.report(state, metrics)
    return state
