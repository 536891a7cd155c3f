"""Barlow Twins redundancy-reduction loss over the global batch, with the collective injected by the caller.

The authors summed per-rank losses with an all-reduce, so Barlow Twins' weight against the other losses shrank
as 1 / world size (docs/method.md, defect 4). Here the statistics are global sums, every rank returns the same global
loss, and the gradients are those of one process holding the whole batch (see :func:`barlow_twins_loss`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from volta.dist import AllReduce

__all__ = ["barlow_twins_loss"]

logger = logging.getLogger(__name__)


def barlow_twins_loss(
    z1: Tensor, z2: Tensor, *, lambd: float, all_reduce: AllReduce | None = None, eps: float = 1e-5
) -> Tensor:
    """Barlow Twins loss ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` of two embeddings ``(N, D)``.

    ``C (D, D)`` is the cross-correlation of the embeddings standardised per dimension (mean 0, biased variance
    1 with ``eps`` added, as a BatchNorm without affine parameters) over the GLOBAL batch: with ``all_reduce``
    (a differentiable sum over ranks, e.g. :func:`volta.dist.differentiable_all_reduce_sum`) the means, variances and
    ``C`` are built from sums over all ranks' rows. Convention: every rank returns the same global loss value;
    because the all-reduce's backward sums gradients over ranks, a rank's gradient w.r.t. its own rows is
    ``world_size`` times the single-process gradient, and averaging parameter gradients over ranks (as DDP and
    DeepSpeed do) yields exactly the single-process gradient of the whole batch. Computed in fp32, autocast off.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"expected two (N, D) embeddings of the same shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )

    def reduce(x: Tensor) -> Tensor:
        return x if all_reduce is None else all_reduce(x)

    with torch.autocast(device_type=z1.device.type, enabled=False):
        dtype = torch.float64 if z1.dtype == torch.float64 else torch.float32
        z1, z2 = z1.to(dtype), z2.to(dtype)
        count = reduce(torch.tensor(float(z1.shape[0]), dtype=dtype, device=z1.device))  # global N
        sums = reduce(torch.stack((z1.sum(dim=0), z2.sum(dim=0))))  # (2, D)
        mean = sums / count
        centred1, centred2 = z1 - mean[0], z2 - mean[1]  # (N, D)
        # Two passes (mean, then centred squares) rather than E[z^2] - E[z]^2, which cancels badly in fp32.
        sq = reduce(torch.stack((centred1.square().sum(dim=0), centred2.square().sum(dim=0))))  # (2, D)
        inv_std = torch.rsqrt(sq / count + eps)  # (2, D)
        std1, std2 = centred1 * inv_std[0], centred2 * inv_std[1]  # (N, D)
        corr = reduce(std1.T @ std2) / count  # (D, D)
        on_diag = (1.0 - torch.diagonal(corr)).square().sum()
        eye = torch.eye(corr.shape[0], dtype=torch.bool, device=corr.device)  # (D, D)
        off_diag = corr.masked_fill(eye, 0.0).square().sum()
        return on_diag + lambd * off_diag
