"""Graph optimal transport (GOT) loss: Wasserstein (WD) + Gromov-Wasserstein (GWD) patch-to-word alignment.

VOLTA.md section 2 with defects 2, 3 and 5 fixed: padding gets no transport mass and has no influence at all
(a padded sample gives exactly the values of the unpadded sample alone), the pruning threshold is per sample by
default, and all OT arithmetic is fp32 under any autocast.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from volta.losses.ot import gromov_wasserstein, ipot

__all__ = ["cosine_cost", "got_loss", "prune_cost"]

logger = logging.getLogger(__name__)


class _SymmetricGram(torch.autograd.Function):
    """``x x^T`` whose backward is one batched matmul ``(G + G^T) x`` instead of autograd's two."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.bmm(x, x.transpose(1, 2))  # (B, n, n)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.bmm(grad + grad.transpose(1, 2), x)  # (B, n, d)


def cosine_cost(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine cost ``1 - cos(x_i, y_j)`` between two batched point sets ``(B, n, d)``, ``(B, m, d)``: ``(B, n, m)``.

    With ``y`` omitted, the intra-set cost of ``x`` (symmetric, zero diagonal). Rows are L2-normalised in fp32;
    an all-zero vector has cosine 0 with everything (cost 1) instead of NaN.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xn = F.normalize(x.to(dtype), dim=-1)  # (B, n, d)
        if y is None:
            sim = _SymmetricGram.apply(xn)  # (B, n, n)
        else:
            yn = F.normalize(y.to(dtype), dim=-1)  # (B, m, d)
            sim = torch.bmm(xn, yn.transpose(1, 2))  # (B, n, m)
        return 1.0 - sim


def prune_cost(
    cost: Tensor, valid: Tensor, *, fraction: float, scope: Literal["sample", "batch"] = "sample"
) -> Tensor:
    """Edge pruning ``relu(C - thr)`` with ``thr = min + fraction * (max - min)`` over the valid entries.

    ``cost`` and ``valid`` are ``(B, n, m)``; the min and max are taken per sample over its valid entries
    (``scope="sample"``, our default) or over every valid entry of the batch (``"batch"``, the authors' choice).
    Invalid entries never affect a threshold; a sample without valid entries gets threshold 0. The threshold is
    not detached (as in the authors' code).
    """
    if scope not in ("sample", "batch"):
        raise ValueError(f"prune scope must be 'sample' or 'batch', got {scope!r}")
    dims = (1, 2) if scope == "sample" else (0, 1, 2)
    low = cost.masked_fill(~valid, float("inf")).amin(dim=dims, keepdim=True)  # (B|1, 1, 1)
    high = cost.masked_fill(~valid, float("-inf")).amax(dim=dims, keepdim=True)
    any_valid = valid.any(dim=1, keepdim=True).any(dim=2, keepdim=True)
    if scope == "batch":
        any_valid = any_valid.any(dim=0, keepdim=True)
    thr = torch.where(any_valid, low + fraction * (high - low), torch.zeros_like(low))
    return torch.relu(cost - thr)


def _compact(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Move each sample's valid rows to the front (order kept) and cut the padding all samples share.

    Returns the compacted features, mask and the gather index (None when nothing was cut). Exact: padding
    never influences the result, so dropping it only saves work on every OT iteration.
    """
    length = max(int(mask.sum(dim=1).max()), 1)
    if length == mask.shape[1] and bool(mask.all()):
        return x, mask, None
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :length]  # (B, L): valid first
    xc = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, L, d)
    return xc, torch.gather(mask, 1, order), order


def _uniform(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniform marginal over the True entries of ``mask`` (B, n); all zeros for an empty row."""
    weights = mask.to(dtype)  # (B, n)
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


def got_loss(
    image_tokens: Tensor,
    text_tokens: Tensor,
    image_mask: Tensor,
    text_mask: Tensor,
    *,
    wd_weight: float,
    gwd_weight: float,
    ipot_beta: float,
    ipot_iters: int,
    gw_beta: float,
    gw_outer_iters: int,
    gw_inner_iters: int,
    prune_fraction: float,
    prune_scope: Literal["sample", "batch"] = "sample",
) -> dict[str, Tensor]:
    """GOT loss between image patches ``(B, P, D)`` and text tokens ``(B, T, D)`` (the GOT-projected features).

    Features are L2-normalised; the cross cost is ``1 - cos`` pruned by :func:`prune_cost`; ``wd`` (B,) is
    ``<C, T>`` with T from :func:`~volta.losses.ot.ipot` (gradients through the unrolled iterations); ``gwd``
    (B,) is :func:`~volta.losses.ot.gromov_wasserstein` between the pruned intra-image and intra-text cosine
    costs. Marginals are uniform over the True entries of the bool masks ``(B, P)`` and ``(B, T)``; padding has
    no influence. A sample with no valid patch or no valid token contributes ``wd = gwd = 0`` and is left out
    of the mean: ``loss = mean over the other samples of wd_weight * wd + gwd_weight * gwd`` (0, with a
    gradient of zeros, when there is none). ``plan`` is the detached WD plan ``(B, P, T)`` for inspection.
    """
    if image_tokens.dim() != 3 or text_tokens.dim() != 3 or image_tokens.shape[0] != text_tokens.shape[0]:
        raise ValueError(
            f"expected (B, P, D) and (B, T, D), got {tuple(image_tokens.shape)}, {tuple(text_tokens.shape)}"
        )
    if image_mask.shape != image_tokens.shape[:2] or text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(f"masks {tuple(image_mask.shape)}, {tuple(text_mask.shape)} do not match the tokens")
    bsz, num_patches, num_tokens = image_tokens.shape[0], image_tokens.shape[1], text_tokens.shape[1]
    image_mask, text_mask = image_mask.bool(), text_mask.bool()
    with torch.autocast(device_type=image_tokens.device.type, enabled=False):
        image, image_mask_c, image_order = _compact(image_tokens, image_mask)  # (B, P', D)
        text, text_mask_c, text_order = _compact(text_tokens, text_mask)  # (B, T', D)
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        a, b = _uniform(image_mask_c, dtype), _uniform(text_mask_c, dtype)  # (B, P'), (B, T')

        cross_valid = image_mask_c.unsqueeze(-1) & text_mask_c.unsqueeze(1)  # (B, P', T')
        cost = prune_cost(cosine_cost(image, text), cross_valid, fraction=prune_fraction, scope=prune_scope)
        plan = ipot(cost, a, b, beta=ipot_beta, num_iters=ipot_iters)  # (B, P', T')
        wd = (cost * plan).sum(dim=(1, 2))  # (B,)

        image_valid = image_mask_c.unsqueeze(-1) & image_mask_c.unsqueeze(1)  # (B, P', P')
        text_valid = text_mask_c.unsqueeze(-1) & text_mask_c.unsqueeze(1)  # (B, T', T')
        cost_image = prune_cost(cosine_cost(image), image_valid, fraction=prune_fraction, scope=prune_scope)
        cost_text = prune_cost(cosine_cost(text), text_valid, fraction=prune_fraction, scope=prune_scope)
        _, gwd = gromov_wasserstein(
            cost_image, cost_text, a, b, beta=gw_beta, outer_iters=gw_outer_iters, inner_iters=gw_inner_iters
        )

        present = image_mask.any(dim=1) & text_mask.any(dim=1)  # (B,)
        per_sample = wd_weight * wd + gwd_weight * gwd  # (B,), exactly 0 for an empty sample
        loss = per_sample.sum() / present.sum().clamp_min(1)

        full_plan = plan.detach()
        if text_order is not None:
            full_plan = torch.zeros(
                bsz, full_plan.shape[1], num_tokens, dtype=full_plan.dtype, device=full_plan.device
            ).scatter_(2, text_order.unsqueeze(1).expand(-1, full_plan.shape[1], -1), full_plan)
        if image_order is not None:
            full_plan = torch.zeros(
                bsz, num_patches, num_tokens, dtype=full_plan.dtype, device=full_plan.device
            ).scatter_(1, image_order.unsqueeze(-1).expand(-1, -1, num_tokens), full_plan)
    return {"wd": wd, "gwd": gwd, "loss": loss, "plan": full_plan}
