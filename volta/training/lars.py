"""LARS (layer-wise adaptive rate scaling) as in Barlow Twins / VoLTA, and the paper's parameter groups.

Biases and normalisation parameters are excluded from weight decay and from the trust-ratio adaptation. The
optimizer works unchanged under DeepSpeed ZeRO-2, which flattens each parameter group and gives every rank a slice
of it: with one parameter per group (see :func:`lars_param_groups`) a slice's squared norm is a partial sum, and
the injected ``norm_all_reduce`` (a sum over ranks) turns it into the whole parameter's norm, so trust ratios are
exactly those of the unsharded optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum, weight decay and per-parameter trust ratio ``eta * ||w|| / ||g + wd*w||``.

    Update per parameter (groups with ``lars_exclude=True`` skip decay and adaptation):
    ``g <- g + wd*w``; ``g <- g * eta*||w||/||g||`` (when both norms > 0); ``m <- momentum*m + g``; ``w <- w - lr*m``.
    ``norm_all_reduce`` sums a 1-D tensor of squared norms over ranks; pass it when parameters are sharded.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        *,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        eta: float = 0.001,
        norm_all_reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if lr <= 0 or momentum < 0 or eta <= 0 or weight_decay < 0:
            raise ValueError(f"invalid LARS settings lr={lr} momentum={momentum} eta={eta} wd={weight_decay}")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "eta": eta,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)
        self.norm_all_reduce = norm_all_reduce

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one LARS update to every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        items: list[tuple[dict[str, Any], Tensor, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                w = p.float()
                if not group["lars_exclude"] and group["weight_decay"] > 0:
                    g = g.add(w, alpha=group["weight_decay"])
                items.append((group, p, g))
        if not items:
            return loss
        # Squared norms of every adapted parameter and its update, reduced over ranks in one collective.
        adapted = [(grp, p, g) for grp, p, g in items if not grp["lars_exclude"]]
        if adapted:
            sq = torch.stack(
                [torch.stack([p.float().pow(2).sum(), g.pow(2).sum()]) for _, p, g in adapted]
            )  # (n, 2)
            if self.norm_all_reduce is not None:
                sq = self.norm_all_reduce(sq)
            norms = sq.sqrt()
            ratios = {}
            for (grp, p, _), (w_norm, g_norm) in zip(adapted, norms.tolist()):
                ratios[id(p)] = grp["eta"] * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
        for group, p, g in items:
            if not group["lars_exclude"]:
                g = g * ratios[id(p)]
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf.mul_(group["momentum"]).add_(g)
            p.add_(buf.to(p.dtype), alpha=-group["lr"])
        return loss


def is_excluded_from_decay(name: str, param: Tensor) -> bool:
    """Biases, normalisation weights, gates and other 1-D parameters get no decay or LARS adaptation."""
    return param.ndim <= 1 or name.endswith(".bias")


def is_fusion_gate(name: str) -> bool:
    """The scalar gates of the cross-modal fusion (``[model.]fusion.<side>.<k>.gate``)."""
    parts = name.split(".")
    return parts[-1] == "gate" and "fusion" in parts


def lars_param_groups(
    model: nn.Module,
    *,
    lr: float,
    bias_lr: float,
    weight_decay: float,
    one_group_per_param: bool = False,
    gate_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into weights (lr, decay, adapted) and biases/norms (bias_lr, excluded).

    With ``gate_lr`` the fusion gates form a third group (that lr, no decay, excluded); otherwise they are in the
    bias group. With ``one_group_per_param`` every parameter gets its own group (needed for LARS under ZeRO
    sharding, where a group is flattened and sliced across ranks).
    """
    weights: list[Tensor] = []
    excluded: list[Tensor] = []
    gates: list[Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if gate_lr is not None and is_fusion_gate(name):
            gates.append(p)
        else:
            (excluded if is_excluded_from_decay(name, p) else weights).append(p)
    w_group = {"lr": lr, "weight_decay": weight_decay, "lars_exclude": False}
    b_group = {"lr": bias_lr, "weight_decay": 0.0, "lars_exclude": True}
    g_group = {"lr": gate_lr, "weight_decay": 0.0, "lars_exclude": True}
    if one_group_per_param:
        return [
            {"params": [p], **group}
            for params, group in ((weights, w_group), (excluded, b_group), (gates, g_group))
            for p in params
        ]
    candidates = (
        {"params": weights, **w_group},
        {"params": excluded, **b_group},
        {"params": gates, **g_group},
    )
    return [g for g in candidates if g["params"]]
