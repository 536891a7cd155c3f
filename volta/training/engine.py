"""The small engine protocol the training loop drives, and a plain-torch engine for tests and single processes.

DeepSpeed's engine satisfies the same protocol through an adapter in ``orchestration/``; the loop never knows which
one it runs. Semantics follow DeepSpeed: ``backward`` is called on every micro-batch's loss (the engine divides by
the accumulation count), ``step`` on every micro-batch (the update happens at accumulation boundaries).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from volta.training.safe_load import load_restricted


@runtime_checkable
class Engine(Protocol):
    """What the training loop needs from an engine."""

    @property
    def module(self) -> nn.Module: ...

    def forward(self, batch: Any) -> Mapping[str, Tensor]: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> None: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...

    def grad_norm(self) -> float | None: ...

    def lr(self) -> float: ...

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None: ...

    def load(self, directory: str | Path) -> dict[str, Any]: ...


def zero_loss(module: nn.Module) -> Tensor:
    """A loss equal to 0 that touches every trainable parameter, so backward yields exact zero gradients.

    Used in place of a non-finite loss: every rank still runs backward over every parameter, so the gradient
    collectives of data-parallel engines stay matched, and nothing is learned from the bad micro-batch.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.stack([(p.reshape(-1)[:1] * 0).sum() for p in params]).sum()


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast for ``precision`` on ``device``; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class TorchEngine:
    """Plain PyTorch engine: autocast, gradient accumulation, clipping, optimizer + scheduler, checkpoints.

    ``module`` is the task (``forward(batch) -> dict`` with a ``loss`` entry). Checkpoints are a safetensors-free
    ``state.pt`` loaded by restricted unpickling (:func:`~volta.training.safe_load.load_restricted`).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        grad_accum: int = 1,
        grad_clip: float | None = None,
        precision: str = "fp32",
        device: torch.device | str = "cpu",
    ) -> None:
        self._module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.precision = precision
        self.device = torch.device(device)
        self.micro_steps = 0
        self._last_grad_norm: float | None = None

    @property
    def module(self) -> nn.Module:
        return self._module

    def forward(self, batch: Any) -> Mapping[str, Tensor]:
        """Run the task on ``batch`` (moved to the engine's device) under the configured autocast."""
        if hasattr(batch, "to"):
            batch = batch.to(
                self.device, non_blocking=self.device.type == "cuda"
            )  # pinned batches: async copy
        with autocast_context(self.device, self.precision):
            return self._module(batch)

    def backward(self, loss: Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            params = [p for p in self._module.parameters() if p.grad is not None]
            if self.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            else:
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
                )
            self._last_grad_norm = float(norm)
            # As DeepSpeed's ZeRO optimizer does: a non-finite gradient norm skips the update (and the schedule).
            if math.isfinite(self._last_grad_norm):
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def grad_norm(self) -> float | None:
        return self._last_grad_norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        """Write model, optimizer, scheduler and the loop's client state to ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {
            "module": self._module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "micro_steps": self.micro_steps,
        }
        tmp = out / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(out / "state.pt")
        (out / "client_state.json").write_text(json.dumps(client_state))

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save` wrote and return the client state."""
        src = Path(directory)
        # Restricted unpickling with torch's own safe set only: optimizer and scheduler states are plain.
        state = load_restricted(src / "state.pt", checkpoint=src, map_location=self.device)
        self._module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = int(state["micro_steps"])
        return dict(json.loads((src / "client_state.json").read_text()))


def is_finite(value: Tensor) -> bool:
    """True when a scalar tensor is finite."""
    return bool(torch.isfinite(value.detach()).all()) and not math.isnan(float(value.detach().float().sum()))
