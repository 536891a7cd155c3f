"""Learning-rate schedule (linear warm-up, cosine decay to a floor) and the optimizer factory that reads the config."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from volta.config import OptimConfig
from volta.training.lars import LARS, lars_param_groups


def warmup_cosine_factor(step: int, *, total_steps: int, warmup_steps: int, final_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warm-up from ~0, then cosine to ``final_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lrs(cfg: OptimConfig, global_batch_size: int) -> tuple[float, float]:
    """Weight and bias learning rates, scaled by ``global_batch / 512`` when ``scale_lr_with_batch`` (the paper)."""
    scale = global_batch_size / 512 if cfg.scale_lr_with_batch else 1.0
    return cfg.lr * scale, cfg.bias_lr * scale


def scaled_gate_lr(cfg: OptimConfig, global_batch_size: int) -> float | None:
    """``optim.gate_lr`` scaled as the other learning rates; None when the gates train with the biases."""
    if cfg.gate_lr is None:
        return None
    return cfg.gate_lr * (global_batch_size / 512 if cfg.scale_lr_with_batch else 1.0)


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    global_batch_size: int,
    sharded: bool = False,
    norm_all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s trainable parameters (LARS or AdamW, decay excluded on biases/norms).

    ``sharded=True`` (ZeRO stage >= 1) gives LARS one group per parameter and uses ``norm_all_reduce`` so its
    trust ratios see whole-parameter norms.
    """
    lr, bias_lr = scaled_lrs(cfg, global_batch_size)
    groups = lars_param_groups(
        model,
        lr=lr,
        bias_lr=bias_lr,
        weight_decay=cfg.weight_decay,
        one_group_per_param=sharded and cfg.name == "lars",
        gate_lr=scaled_gate_lr(cfg, global_batch_size),
    )
    if cfg.name == "lars":
        return LARS(
            groups,
            lr=lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            eta=cfg.lars_eta,
            norm_all_reduce=norm_all_reduce if sharded else None,
        )
    for g in groups:
        g.pop("lars_exclude")
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying :func:`warmup_cosine_factor` to every group's base lr (stepped once per optimizer step)."""
    warmup = min(total_steps - 1, round(cfg.warmup_epochs * steps_per_epoch)) if total_steps > 1 else 0

    def factor(step: int) -> float:
        return warmup_cosine_factor(
            step, total_steps=total_steps, warmup_steps=max(0, warmup), final_ratio=cfg.final_lr_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def current_lr(optimizer: Any) -> float:
    """The learning rate of the first (weights) group."""
    return float(optimizer.param_groups[0]["lr"])
