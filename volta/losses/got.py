"""Graph optimal transport (GOT) loss: Wasserstein (WD) + Gromov-Wasserstein (GWD) patch-to-word alignment.

docs/method.md section 2 with defects 2, 3 and 5 fixed: padding gets no transport mass and has no influence at all
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

__all__ = ["cosine_cost", "got_contrastive_loss", "got_loss", "prune_cost", "salience_marginal"]

logger = logging.getLogger(__name__)


def _symmetric_scaled_gram(x: Tensor, inv_norm: Tensor) -> Tensor:
    """``diag(inv) X X^T diag(inv)``, made exactly symmetric.

    A blocked matmul does not promise ``(X X^T)_ik == (X X^T)_ki`` bit for bit, and Gromov-Wasserstein started
    from the symmetric plan ``a b^T`` is sensitive to the last bit where the problem has a symmetry (a 2-token
    caption: swapping the tokens gives the same distance): measured, a 2e-7 asymmetry moved one sample's GWD
    by 9%. Averaging with the transpose costs one pass over the small ``(B, n, n)`` result.
    """
    gram = torch.bmm(x, x.transpose(1, 2))  # (B, n, n)
    gram = gram.add_(gram.transpose(1, 2).clone()).mul_(0.5)
    return gram.mul_(inv_norm.unsqueeze(-1) * inv_norm.unsqueeze(1))  # outer product: symmetric bit for bit


class _CosineSimilarities(torch.autograd.Function):
    """The three cosine-similarity matrices of GOT, ``(X X^T, X Y^T, Y Y^T)`` of the row-normalised features.

    Fused with the normalisation: the forward multiplies the raw features and scales the small ``(B, n, n)``
    results by the inverse norms; the backward folds the normalisation's derivative into the ``(B, n, n)``
    gradient matrices and finishes with one batched matmul per input, so the ``(B, n, d)`` features are read
    by matmuls only. Autograd's graph of ``F.normalize`` + three ``bmm`` made about ten elementwise passes over
    the ``(B, 144, 1024)`` image features and two matmuls per Gram in the backward; at the paper shape that
    was 55% of the GOT loss's forward+backward time (bench/got.py, CPU, 2 threads).

    For ``s_ik = x_i . x_k / (r_i r_k)`` with ``r = max(||x||, eps)`` and an incoming symmetric gradient ``G``:
    ``dL/dx = (diag(1/r) G diag(1/r) - diag(p / r^2)) X`` with ``p_i = sum_k G_ik s_ik`` (plus the cross term),
    and ``p_i = 0`` where the norm is clamped (``x / eps`` is linear there), matching ``F.normalize``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        norm_x = torch.linalg.vector_norm(x, dim=-1)  # (B, n)
        norm_y = torch.linalg.vector_norm(y, dim=-1)  # (B, m)
        inv_x, inv_y = 1.0 / norm_x.clamp_min(eps), 1.0 / norm_y.clamp_min(eps)
        sxx = _symmetric_scaled_gram(x, inv_x)  # (B, n, n)
        sxy = torch.bmm(x, y.transpose(1, 2)).mul_(inv_x.unsqueeze(-1) * inv_y.unsqueeze(1))  # (B, n, m)
        syy = _symmetric_scaled_gram(y, inv_y)  # (B, m, m)
        ctx.save_for_backward(x, y, inv_x, inv_y, norm_x < eps, norm_y < eps, sxx, sxy, syy)
        return sxx, sxy, syy

    @staticmethod
    def backward(ctx: Any, g_xx: Tensor, g_xy: Tensor, g_yy: Tensor) -> tuple[Tensor, Tensor, None]:
        x, y, inv_x, inv_y, clamped_x, clamped_y, sxx, sxy, syy = ctx.saved_tensors
        g_xx = g_xx + g_xx.transpose(1, 2)  # (B, n, n): s is symmetric, both factors are x
        g_yy = g_yy + g_yy.transpose(1, 2)  # (B, m, m)
        g_xy_s = g_xy * sxy  # (B, n, m)
        proj_x = torch.linalg.vecdot(g_xx, sxx, dim=-1) + g_xy_s.sum(dim=-1)  # (B, n)
        proj_y = torch.linalg.vecdot(g_yy, syy, dim=-1) + g_xy_s.sum(dim=-2)  # (B, m)
        proj_x = proj_x.masked_fill(clamped_x, 0.0) * inv_x.square()
        proj_y = proj_y.masked_fill(clamped_y, 0.0) * inv_y.square()
        a_xx = g_xx.mul_(inv_x.unsqueeze(-1)).mul_(inv_x.unsqueeze(1))  # (B, n, n)
        a_xx.diagonal(dim1=1, dim2=2).sub_(proj_x)
        a_yy = g_yy.mul_(inv_y.unsqueeze(-1)).mul_(inv_y.unsqueeze(1))  # (B, m, m)
        a_yy.diagonal(dim1=1, dim2=2).sub_(proj_y)
        a_xy = g_xy * inv_x.unsqueeze(-1) * inv_y.unsqueeze(1)  # (B, n, m)
        grad_x = torch.bmm(a_xx, x).baddbmm_(a_xy, y)  # (B, n, d)
        grad_y = torch.bmm(a_yy, y).baddbmm_(a_xy.transpose(1, 2), x)  # (B, m, d)
        return grad_x, grad_y, None


def cosine_cost(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine cost ``1 - cos(x_i, y_j)`` between two batched point sets ``(B, n, d)``, ``(B, m, d)``: ``(B, n, m)``.

    With ``y`` omitted, the intra-set cost of ``x`` (symmetric, zero diagonal). Rows are L2-normalised in fp32;
    an all-zero vector has cosine 0 with everything (cost 1) instead of NaN.
    This is the plain autograd reference; :func:`got_loss` computes the same costs with a fused backward.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xn = F.normalize(x.to(dtype), dim=-1)  # (B, n, d)
        yn = xn if y is None else F.normalize(y.to(dtype), dim=-1)  # (B, m, d)
        return 1.0 - torch.bmm(xn, yn.transpose(1, 2))


def prune_cost(
    cost: Tensor,
    valid: Tensor | None,
    *,
    fraction: float,
    scope: Literal["sample", "batch"] = "sample",
    detach: bool = False,
) -> Tensor:
    """Edge pruning ``relu(C - thr)`` with ``thr = min + fraction * (max - min)`` over the valid entries.

    ``cost`` and ``valid`` are ``(B, n, m)`` (``valid=None``: every entry is valid); the min and max are taken per sample over its valid entries
    (``scope="sample"``, our default) or over every valid entry of the batch (``"batch"``, the authors' choice).
    Invalid entries never affect a threshold; a sample without valid entries gets threshold 0. The threshold is
    differentiable (as in the authors' code) unless ``detach``: then it is a constant of the step.
    """
    if scope not in ("sample", "batch"):
        raise ValueError(f"prune scope must be 'sample' or 'batch', got {scope!r}")
    dims = (1, 2) if scope == "sample" else (0, 1, 2)
    ref = cost.detach() if detach else cost
    if valid is None:  # every entry valid: no masked copies of the cost
        low, high = ref.amin(dim=dims, keepdim=True), ref.amax(dim=dims, keepdim=True)  # (B|1, 1, 1)
        return torch.relu(cost - (low + fraction * (high - low)))
    low = ref.masked_fill(~valid, float("inf")).amin(dim=dims, keepdim=True)  # (B|1, 1, 1)
    high = ref.masked_fill(~valid, float("-inf")).amax(dim=dims, keepdim=True)
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


def salience_marginal(image: Tensor, mask: Tensor, *, temperature: float) -> Tensor:
    """Patch marginal ``(B, P)`` that favours the patches unlike the rest of their image (detached).

    Each valid patch's salience is ``1 - cos(x_j, m)`` with ``m`` the mean of the image's unit-length valid
    patch features; saliences are standardised over the image's valid patches (so the marginal does not depend
    on the feature scale) and the marginal is their softmax at ``temperature``: background that fills most of an
    image gets little mass, the few patches that differ from it most. Padding gets 0; an image whose patches are
    all alike gets the uniform marginal; a row without a valid patch is all zeros. No gradient flows through it.
    """
    if temperature <= 0:
        raise ValueError(f"expected temperature > 0, got {temperature}")
    with torch.no_grad():
        x = F.normalize(image.detach(), dim=-1)  # (B, P, D)
        w = mask.to(x.dtype).unsqueeze(-1)  # (B, P, 1)
        count = w.sum(dim=1).clamp_min(1.0)  # (B, 1)
        mean = F.normalize((x * w).sum(dim=1) / count, dim=-1)  # (B, D)
        sal = 1.0 - torch.einsum("bpd,bd->bp", x, mean)  # (B, P)
        mu = (sal * w.squeeze(-1)).sum(dim=1, keepdim=True) / count
        var = (((sal - mu) ** 2) * w.squeeze(-1)).sum(dim=1, keepdim=True) / count
        z = (sal - mu) / var.sqrt().clamp_min(1e-6)
        logits = (z / temperature).masked_fill(~mask, float("-inf"))
        out = torch.softmax(logits, dim=1)
        return torch.nan_to_num(out, nan=0.0)  # a row without a valid patch: all -inf -> nan -> 0


def _image_marginal(image: Tensor, mask: Tensor, dtype: torch.dtype, salience: float | None) -> Tensor:
    """The WD/GW patch marginal: uniform (``salience`` None, the paper) or :func:`salience_marginal`."""
    if salience is None:
        return _uniform(mask, dtype)
    return salience_marginal(image.to(dtype), mask, temperature=salience)


def _check_tokens(image_tokens: Tensor, text_tokens: Tensor, image_mask: Tensor, text_mask: Tensor) -> None:
    """Shapes ``(B, P, D)``, ``(B, T, D)`` with masks ``(B, P)``, ``(B, T)``, or a one-line ValueError."""
    if image_tokens.dim() != 3 or text_tokens.dim() != 3 or image_tokens.shape[0] != text_tokens.shape[0]:
        raise ValueError(
            f"expected (B, P, D) and (B, T, D), got {tuple(image_tokens.shape)}, {tuple(text_tokens.shape)}"
        )
    if image_mask.shape != image_tokens.shape[:2] or text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(f"masks {tuple(image_mask.shape)}, {tuple(text_mask.shape)} do not match the tokens")


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
    prune_detach: bool = True,
    image_marginal_kl: float | None = None,
    image_salience: float | None = None,
) -> dict[str, Tensor]:
    """GOT loss between image patches ``(B, P, D)`` and text tokens ``(B, T, D)`` (the GOT-projected features).

    Features are L2-normalised; the cross cost is ``1 - cos`` pruned by :func:`prune_cost` (threshold held
    constant when ``prune_detach``, our default; differentiable as in the authors' code otherwise); ``wd`` (B,) is
    ``<C, T>`` with T from :func:`~volta.losses.ot.ipot` (gradients through the unrolled iterations); ``gwd``
    (B,) is :func:`~volta.losses.ot.gromov_wasserstein` between the pruned intra-image and intra-text cosine
    costs. Marginals are uniform over the True entries of the bool masks ``(B, P)`` and ``(B, T)``; padding has
    no influence. A sample with no valid patch or no valid token contributes ``wd = gwd = 0`` and is left out
    of the mean: ``loss = mean over the other samples of wd_weight * wd + gwd_weight * gwd`` (0, with a
    gradient of zeros, when there is none). ``plan`` is the detached WD plan ``(B, P, T)`` for inspection.

    ``image_marginal_kl`` (None: balanced, the paper) relaxes the WD plan's patch marginal to a KL penalty of
    that weight (:func:`~volta.losses.ot.ipot`'s ``row_kl``): every word still carries ``1 / T`` of the mass, but
    the patches need not each receive ``1 / P``, so two words that name one object can both put their mass on
    its few patches instead of one of them being pushed onto the background. The GW term stays balanced.

    ``image_salience`` (None: uniform patch marginal, the paper) replaces the patch marginal of both the WD and
    the GW term by :func:`salience_marginal` at that temperature: the words' mass must then land mostly on the
    patches that stand out from their image, not on the background every image shares.
    """
    _check_tokens(image_tokens, text_tokens, image_mask, text_mask)
    bsz, num_patches, num_tokens = image_tokens.shape[0], image_tokens.shape[1], text_tokens.shape[1]
    image_mask, text_mask = image_mask.bool(), text_mask.bool()
    with torch.autocast(device_type=image_tokens.device.type, enabled=False):
        image, image_mask_c, image_order = _compact(image_tokens, image_mask)  # (B, P', D)
        text, text_mask_c, text_order = _compact(text_tokens, text_mask)  # (B, T', D)
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        a = _image_marginal(image, image_mask_c, dtype, image_salience)  # (B, P')
        b = _uniform(text_mask_c, dtype)  # (B, T')

        sim_image, sim_cross, sim_text = _CosineSimilarities.apply(image.to(dtype), text.to(dtype), 1e-12)
        cross_valid = image_mask_c.unsqueeze(-1) & text_mask_c.unsqueeze(1)  # (B, P', T')
        cost = prune_cost(
            1.0 - sim_cross, cross_valid, fraction=prune_fraction, scope=prune_scope, detach=prune_detach
        )
        plan = ipot(cost, a, b, beta=ipot_beta, num_iters=ipot_iters, row_kl=image_marginal_kl)  # (B, P', T')
        wd = (cost * plan).sum(dim=(1, 2))  # (B,)

        # no gather index = nothing was padded: every pair is valid and pruning needs no masked copies
        image_valid = None if image_order is None else image_mask_c.unsqueeze(-1) & image_mask_c.unsqueeze(1)
        text_valid = None if text_order is None else text_mask_c.unsqueeze(-1) & text_mask_c.unsqueeze(1)
        cost_image = prune_cost(
            1.0 - sim_image, image_valid, fraction=prune_fraction, scope=prune_scope, detach=prune_detach
        )
        cost_text = prune_cost(
            1.0 - sim_text, text_valid, fraction=prune_fraction, scope=prune_scope, detach=prune_detach
        )
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


def got_contrastive_loss(
    image_tokens: Tensor,
    text_tokens: Tensor,
    image_mask: Tensor,
    text_mask: Tensor,
    *,
    temperature: float,
    ipot_beta: float,
    ipot_iters: int,
    image_marginal_kl: float | None = None,
    image_salience: float | None = None,
    swap_tokens: Tensor | None = None,
    swap_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """In-batch contrast of Wasserstein distances: every image against every caption of the local batch.

    ``wd[i, j] = <C_ij, T_ij>`` with ``C_ij = 1 - cos`` between image ``i``'s patches and caption ``j``'s tokens
    (unpruned) and ``T_ij`` the IPOT plan after ``ipot_iters`` steps under uniform marginals over the True
    entries of the masks (gradients flow through the unrolled steps). ``loss`` is the symmetric InfoNCE of the
    scores ``-wd / temperature`` with the matching caption as the positive: the mean of the image-to-text and
    text-to-image cross entropies. ``acc`` is the mean top-1 accuracy of both directions; ``wd`` is ``(B, B)``.

    Not in the paper: balanced GOT on matched pairs only is as cheap when every word is matched to the
    background patches that every image has as when words are matched to the objects they name
    (docs/losses.md); a caption's plan must be cheaper on its own image than on the others only in the second case.
    ``image_marginal_kl`` relaxes the patch marginal and ``image_salience`` replaces it as in :func:`got_loss`.
    Samples without a valid patch or token are left out; with fewer than two samples left the loss is 0 (with a
    zero gradient). Negatives are the local batch (no all-gather). All arithmetic in fp32 (fp64 for fp64 inputs).

    ``swap_tokens (B, T2, D)`` with ``swap_mask (B, T2)`` (not in the paper; None: off) are the tokens of each
    image's own caption with two of its words swapped (:func:`volta.data.views.swap_words`): one more negative
    per image in the image-to-text direction, scored against that image alone. It has the words of the positive,
    so a plan cannot tell the two apart by which words occur, only by where each word's mass lands: cheaper on
    the positive only when each word sits on the region it names in its own caption. A row whose mask is all
    False has no swap negative. ``swap_acc`` is the share of images with a swap negative whose own caption has
    the lower distance (0 when none has one).
    """
    _check_tokens(image_tokens, text_tokens, image_mask, text_mask)
    if temperature <= 0:
        raise ValueError(f"expected temperature > 0, got {temperature}")
    image_mask, text_mask = image_mask.bool(), text_mask.bool()
    with torch.autocast(device_type=image_tokens.device.type, enabled=False):
        image, image_mask_c, _ = _compact(image_tokens, image_mask)  # (B, P', D)
        text, text_mask_c, _ = _compact(text_tokens, text_mask)  # (B, T', D)
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        bsz, p, t = image.shape[0], image.shape[1], text.shape[1]
        xn = F.normalize(image.to(dtype), dim=-1).reshape(bsz * p, -1)  # (B*P', D)
        yn = F.normalize(text.to(dtype), dim=-1).reshape(bsz * t, -1)  # (B*T', D)
        sim = (xn @ yn.T).view(bsz, p, bsz, t).permute(0, 2, 1, 3)  # (B_img, B_txt, P', T')
        cost = (1.0 - sim).reshape(bsz * bsz, p, t)
        a_image = _image_marginal(image, image_mask_c, dtype, image_salience)  # (B, P')
        a = a_image.unsqueeze(1).expand(bsz, bsz, p).reshape(bsz * bsz, p)
        b = _uniform(text_mask_c, dtype).unsqueeze(0).expand(bsz, bsz, t).reshape(bsz * bsz, t)
        plan = ipot(
            cost, a, b, beta=ipot_beta, num_iters=ipot_iters, row_kl=image_marginal_kl
        )  # (B*B, P', T')
        wd = (cost * plan).sum(dim=(1, 2)).view(bsz, bsz)  # (B_img, B_txt)

        swap_wd = None
        if swap_tokens is not None:
            if swap_mask is None or swap_tokens.shape[0] != bsz or swap_mask.shape != swap_tokens.shape[:2]:
                raise ValueError(
                    f"expected swap tokens (B={bsz}, T, D) with a (B, T) mask, got {tuple(swap_tokens.shape)}"
                )
            swap, swap_mask_c, _ = _compact(swap_tokens, swap_mask.bool())  # (B, T2', D)
            swap_n = F.normalize(swap.to(dtype), dim=-1)
            swap_cost = 1.0 - torch.einsum("bpd,btd->bpt", xn.view(bsz, p, -1), swap_n)  # (B, P', T2')
            swap_plan = ipot(
                swap_cost,
                a_image,
                _uniform(swap_mask_c, dtype),
                beta=ipot_beta,
                num_iters=ipot_iters,
                row_kl=image_marginal_kl,
            )
            swap_wd = (swap_cost * swap_plan).sum(dim=(1, 2))  # (B,)

        keep = torch.nonzero(image_mask.any(dim=1) & text_mask.any(dim=1)).squeeze(1)  # (N,)
        if keep.numel() < 2:
            zero = wd.sum() * 0.0
            out = {"loss": zero, "acc": zero.detach(), "wd": wd.detach()}
            return out | ({} if swap_wd is None else {"swap_acc": zero.detach()})
        scores = -wd.index_select(0, keep).index_select(1, keep) / temperature  # (N, N)
        target = torch.arange(keep.numel(), device=scores.device)
        acc = 0.5 * (
            (scores.argmax(dim=1) == target).to(dtype).mean()
            + (scores.argmax(dim=0) == target).to(dtype).mean()
        )
        extra: dict[str, Tensor] = {}
        i2t = scores
        if swap_wd is not None:
            has_swap = swap_mask.bool().any(dim=1).index_select(0, keep)  # type: ignore[union-attr]
            column = (-swap_wd.index_select(0, keep) / temperature).masked_fill(~has_swap, float("-inf"))
            i2t = torch.cat([scores, column.unsqueeze(1)], dim=1)  # (N, N + 1)
            wins = (scores.diagonal() > column) & has_swap
            extra["swap_acc"] = (wins.sum() / has_swap.sum().clamp_min(1)).to(dtype).detach()
            extra["swap_wd"] = swap_wd.detach()
        loss = 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(scores.T, target))
    return {"loss": loss, "acc": acc.detach(), "wd": wd.detach()} | extra
