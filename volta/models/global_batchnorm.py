"""BatchNorm whose statistics cover the global batch through an injected all-reduce (works on CPU with gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, and Barlow Twins needs projector statistics over the whole batch
for the loss to be the same at any world size. The model keeps plain ``nn.BatchNorm1d``; the task swaps them for
this module (:func:`convert_to_global_batchnorm`) and passes a differentiable sum over ranks. Without an all-reduce
it computes exactly what ``nn.BatchNorm1d`` computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with batch statistics summed over ranks by ``all_reduce`` (a differentiable sum)."""

    def __init__(
        self, num_features: int, *, all_reduce: Callable[[Tensor], Tensor] | None = None, **kwargs: object
    ):
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.all_reduce = all_reduce

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x (N, C)`` with the global batch's mean and biased variance while training."""
        # DeepSpeed's bf16/fp16 engines cast parameters but not buffers: running statistics then stay fp32 while
        # the input is bf16, which nn.BatchNorm1d rejects; such a layer takes the explicit paths below.
        mixed = self.running_mean is not None and x.dtype != self.running_mean.dtype
        if not mixed and (not self.training or self.all_reduce is None):
            return super().forward(x)
        if not self.training:
            assert self.running_mean is not None and self.running_var is not None
            rm, rv = self.running_mean, self.running_var
            y = (x.to(rm.dtype) - rm) / torch.sqrt(rv + self.eps)  # (N, C)
            if self.affine:
                y = y * self.weight.to(rm.dtype) + self.bias.to(rm.dtype)
            return y.to(x.dtype)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in >= fp32
        count = torch.tensor([float(xf.shape[0])], device=x.device)
        stats = torch.cat([xf.sum(0), xf.pow(2).sum(0), count])  # (2C + 1,)
        if self.all_reduce is not None:
            stats = self.all_reduce(stats)
        c = self.num_features
        n = stats[-1].detach()
        mean = stats[:c] / n  # (C,)
        var = (stats[c : 2 * c] / n - mean.pow(2)).clamp_min(0.0)  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        y = (xf - mean) / torch.sqrt(var + self.eps)  # (N, C)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_to_global_batchnorm(
    module: nn.Module, all_reduce: Callable[[Tensor], Tensor] | None
) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``module`` (in place) by a :class:`GlobalBatchNorm1d` sharing its state."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, GlobalBatchNorm1d):
            new = GlobalBatchNorm1d(
                child.num_features,
                all_reduce=all_reduce,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.to(device=next(iter(child.state_dict().values())).device)
            setattr(module, name, new)
        elif isinstance(child, GlobalBatchNorm1d):
            child.all_reduce = all_reduce
        else:
            convert_to_global_batchnorm(child, all_reduce)
    return module
