"""Batched optimal-transport solvers for GOT: IPOT, log-domain Sinkhorn and square-loss Gromov-Wasserstein.

Every solver takes a batch of problems ``cost (B, n, m)`` with marginals ``a (B, n)`` and ``b (B, m)`` that may
contain zeros: a zero-mass point is padding, it receives exactly zero transport mass and has no influence on the
other points (the plan of a padded problem equals the plan of the unpadded one). All arithmetic runs in fp32
(fp64 when an input is fp64) with autocast disabled, so bf16/fp16 inputs or mixed-precision training cannot
underflow ``exp(-C / beta)`` (docs/method.md defect 5).

Why not POT's batched solvers (``ot.batch``, POT 0.9.7): ``solve_batch(method="proximal")`` returned the
independent coupling instead of the proximal-point plan, and every batched solver returned NaN as soon as a
marginal had a zero entry (padding); see /work/shared/FIELD-NOTES.md. POT's exact solvers (``ot.emd2``,
``ot.gromov.gromov_wasserstein2``) are the references of our tests and the baseline of ``bench/got.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

__all__ = ["gromov_wasserstein", "gromov_wasserstein_value", "ipot", "relaxed_row_power", "sinkhorn"]

logger = logging.getLogger(__name__)

# Floor of every scaling denominator. A row or column with positive mass has a denominator of at least
# min(kernel) * mass, far above this for the bounded costs of GOT; only zero-mass (padding) points and
# pathological costs reach the floor, where it keeps the arithmetic finite (their mass is then exactly 0).
_TINY = 1e-30


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64 (gradcheck), fp32 otherwise: never a half type."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_problem(cost: Tensor, a: Tensor, b: Tensor) -> None:
    if cost.dim() != 3 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"expected cost (B, n, m), a (B, n), b (B, m); got {tuple(cost.shape)}, "
            f"{tuple(a.shape)}, {tuple(b.shape)}"
        )
    bsz, n, m = cost.shape
    if a.shape != (bsz, n) or b.shape != (bsz, m):
        raise ValueError(
            f"marginals {tuple(a.shape)} and {tuple(b.shape)} do not match cost {tuple(cost.shape)}"
        )


def _gibbs_kernel(cost: Tensor, valid: Tensor, beta: float, per_row: bool = True) -> Tensor:
    """``exp(-C / beta)`` with each row shifted by its minimum over valid pairs and zero on invalid pairs.

    The row shift multiplies each kernel row by a constant, which the next row scaling absorbs exactly, so the
    IPOT/Sinkhorn iterates are unchanged while every valid row keeps an entry equal to 1 (no fp32 underflow of a
    whole row). The shift is detached: the plan does not depend on it. A KL-relaxed row scaling absorbs only a
    constant shared by all rows (the column scaling takes it), so ``per_row=False`` shifts each problem by its
    minimum instead.
    """
    masked = cost.detach().masked_fill(~valid, float("inf"))
    shift = masked.amin(dim=-1, keepdim=True)  # (B, n, 1)
    if not per_row:
        shift = shift.amin(dim=-2, keepdim=True)  # (B, 1, 1)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    kernel = torch.exp((shift - cost) / beta)  # (B, n, m)
    return kernel.masked_fill(~valid, 0.0)


def _valid_pairs(a: Tensor, b: Tensor) -> Tensor:
    return (a > 0).unsqueeze(-1) & (b > 0).unsqueeze(-2)  # (B, n, m)


# One IPOT step's saved values, for the hand-written backward: (q, x, delta, y, sigma_prev, sigma, plan).
_Step = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _row_scaling(a: Tensor, x: Tensor, power: float) -> Tensor:
    """``(a / x) ** power`` with zero for zero-mass rows: the exact row scaling (power 1) or the KL-relaxed one."""
    ratio = a / x.clamp_min(_TINY)  # (B, n)
    if power == 1.0:
        return ratio
    return torch.where(a > 0, ratio.pow(power), torch.zeros_like(ratio))  # 0 ** 0 would give padding mass


def _ipot_iterate(
    kernel: Tensor, a: Tensor, b: Tensor, num_iters: int, steps: list[_Step] | None, power: float = 1.0
) -> Tensor:
    """Run ``num_iters`` IPOT steps from ``T = ones`` on a precomputed kernel; record steps when asked.

    ``power`` is the row scaling's exponent: 1 for exact row marginals, ``rho / (rho + beta)`` for a KL-relaxed
    row marginal of weight ``rho`` (:func:`ipot`).
    """
    sigma = torch.ones_like(b)  # (B, m); invalid columns are zero in the kernel, so their value never matters
    plan = kernel
    for it in range(num_iters):
        q = kernel if it == 0 else kernel * plan  # (B, n, m): Q = A * T
        x = torch.bmm(q, sigma.unsqueeze(-1)).squeeze(-1)  # (B, n)
        delta = _row_scaling(a, x, power)  # (B, n)
        y = torch.bmm(delta.unsqueeze(1), q).squeeze(1)  # (B, m)
        sigma_new = b / y.clamp_min(_TINY)  # (B, m)
        plan = q * sigma_new.unsqueeze(1)  # (B, n, m)
        plan.mul_(delta.unsqueeze(-1))
        if steps is not None:
            steps.append((q, x, delta, y, sigma, sigma_new, plan))
        sigma = sigma_new
    return plan


def _ipot_backward(grad_plan: Tensor, kernel: Tensor, steps: list[_Step], power: float = 1.0) -> Tensor:
    """Reverse-mode derivative of :func:`_ipot_iterate` w.r.t. the kernel, one step at a time.

    Written by hand instead of recording the loop with autograd: it needs about 10 passes over the (B, n, m)
    tensors per step where autograd's graph needs about 15 plus its per-node overhead.
    """
    grad_kernel = torch.zeros_like(kernel)  # (B, n, m)
    grad_sigma = torch.zeros_like(steps[-1][5])  # (B, m): gradient w.r.t. sigma from the following step
    for it in range(len(steps) - 1, -1, -1):
        q, x, delta, y, sigma_prev, sigma, _ = steps[it]
        # plan = delta * q * sigma
        p = grad_plan * q  # (B, n, m)
        g_delta = torch.bmm(p, sigma.unsqueeze(-1)).squeeze(-1)  # (B, n)
        g_sigma = grad_sigma + torch.bmm(delta.unsqueeze(1), p).squeeze(1)  # (B, m)
        # sigma = b / clamp(y): d sigma / d y = -sigma / y where not clamped
        g_y = torch.where(y > _TINY, -g_sigma * sigma / y.clamp_min(_TINY), torch.zeros_like(y))  # (B, m)
        # y = q^T delta
        g_delta = g_delta + torch.bmm(q, g_y.unsqueeze(-1)).squeeze(-1)  # (B, n)
        # delta = (a / clamp(x)) ** power: d delta / d x = -power * delta / x where not clamped
        g_x = torch.where(
            x > _TINY, -g_delta * delta * power / x.clamp_min(_TINY), torch.zeros_like(x)
        )  # (B, n)
        # x = q sigma_prev
        grad_sigma = torch.bmm(g_x.unsqueeze(1), q).squeeze(1)  # (B, m)
        # d q = grad_plan * (delta sigma^T) + delta g_y^T + g_x sigma_prev^T
        g_q = grad_plan * sigma.unsqueeze(1)  # (B, n, m)
        g_q.mul_(delta.unsqueeze(-1))
        left = torch.stack((delta, g_x), dim=-1)  # (B, n, 2)
        right = torch.stack((g_y, sigma_prev), dim=1)  # (B, 2, m)
        g_q.baddbmm_(left, right)
        if it == 0:
            grad_kernel += g_q  # q = kernel * ones
        else:
            grad_kernel.addcmul_(g_q, steps[it - 1][6])  # q = kernel * plan_prev
            grad_plan = g_q * kernel
    return grad_kernel


class _Ipot(torch.autograd.Function):
    """IPOT with a hand-written backward through the unrolled iterations (gradient w.r.t. the cost only)."""

    @staticmethod
    def forward(
        ctx: Any, cost: Tensor, a: Tensor, b: Tensor, beta: float, num_iters: int, power: float
    ) -> Tensor:
        valid = _valid_pairs(a, b)
        kernel = _gibbs_kernel(cost, valid, beta, per_row=power == 1.0)  # (B, n, m)
        steps: list[_Step] | None = [] if ctx.needs_input_grad[0] else None
        plan = _ipot_iterate(kernel, a, b, num_iters, steps, power)
        ctx.beta, ctx.power = beta, power
        ctx.steps = steps
        ctx.save_for_backward(kernel)
        return plan

    @staticmethod
    def backward(ctx: Any, grad_plan: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        (kernel,) = ctx.saved_tensors
        if ctx.steps is None:
            return None, None, None, None, None, None
        grad_kernel = _ipot_backward(grad_plan.to(kernel.dtype), kernel, ctx.steps, ctx.power)
        # d exp((s - C) / beta) / dC; zero on invalid pairs where the kernel is 0
        grad_cost = grad_kernel * kernel * (-1.0 / ctx.beta)
        # With costs far beyond beta (C / beta ~ 1e5) some scalings saturate at the _TINY floor and their
        # products overflow; the unrolled map is then locally constant, so the true derivative there is 0.
        grad_cost = torch.nan_to_num(grad_cost, nan=0.0, posinf=0.0, neginf=0.0)
        return grad_cost, None, None, None, None, None


def relaxed_row_power(row_kl: float | None, beta: float) -> float:
    """The row scaling's exponent of IPOT with a KL-relaxed row marginal of weight ``row_kl`` (None: exact rows)."""
    if row_kl is None:
        return 1.0
    if row_kl < 0:
        raise ValueError(f"expected row_kl >= 0 or None, got {row_kl}")
    return row_kl / (row_kl + beta)


def ipot(
    cost: Tensor, a: Tensor, b: Tensor, *, beta: float, num_iters: int, row_kl: float | None = None
) -> Tensor:
    """Batched proximal-point optimal transport (IPOT, Xie et al. 2020): the plan ``(B, n, m)`` after ``num_iters`` steps.

    Each step multiplies the previous plan by the Gibbs kernel ``exp(-C / beta)`` and rescales it once to the
    row marginals ``a (B, n)`` then the column marginals ``b (B, m)``, starting from ``T = ones``; the column
    marginals therefore hold exactly and the row marginals converge as ``num_iters`` grows (to the exact OT plan
    for any ``beta``). Zero-mass points get exactly zero mass. Gradients w.r.t. ``cost`` flow through the unrolled
    iterations (marginals are treated as constants). Computed in fp32 (fp64 for fp64 inputs) with autocast off.

    ``row_kl`` (None: exact row marginals, the balanced problem) relaxes the rows to a KL penalty of that weight:
    each step then solves ``min <C, T> + beta KL(T | T_prev) + row_kl KL(T 1 | a)`` with the columns exact, whose
    row scaling is ``(a / (Q sigma)) ** (row_kl / (row_kl + beta))`` (semi-relaxed unbalanced OT, Chizat et al.
    2018). The plan still carries the columns' total mass; ``row_kl = 0`` frees the rows, so every column puts
    its mass on its cheapest rows independently (after ``t`` steps ``T_ij = b_j softmax_i(-t C_ij / beta)``).
    """
    _check_problem(cost, a, b)
    if beta <= 0 or num_iters < 1:
        raise ValueError(f"expected beta > 0 and num_iters >= 1, got beta={beta}, num_iters={num_iters}")
    power = relaxed_row_power(row_kl, beta)
    dtype = _compute_dtype(cost, a, b)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        plan: Tensor = _Ipot.apply(
            cost.to(dtype), a.to(dtype), b.to(dtype), float(beta), int(num_iters), power
        )
    return plan


def _masked_logsumexp(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """logsumexp over valid entries; rows with no valid entry get a finite dummy (discarded by the caller).

    Feeding ``-inf`` rows to ``torch.logsumexp`` would give ``-inf - (-inf) = NaN`` in its backward even where the
    incoming gradient is zero; the dummy zeros keep both passes finite.
    """
    x = x.masked_fill(~valid, float("-inf"))
    x = x.masked_fill(~valid.any(dim=dim, keepdim=True), 0.0)
    return torch.logsumexp(x, dim=dim)


def sinkhorn(cost: Tensor, a: Tensor, b: Tensor, *, epsilon: float, num_iters: int) -> Tensor:
    """Batched entropic OT by log-domain Sinkhorn: the plan ``(B, n, m)`` after ``num_iters`` row+column updates.

    Solves ``min <C, T> - epsilon H(T)`` with marginals ``a (B, n)`` and ``b (B, m)`` by alternating dual
    updates in the log domain (stable for any ``epsilon``); zero-mass points get exactly zero mass and do not
    influence the others. Differentiable w.r.t. ``cost`` through the unrolled iterations. Computed in fp32 (fp64
    for fp64 inputs) with autocast off.
    """
    _check_problem(cost, a, b)
    if epsilon <= 0 or num_iters < 1:
        raise ValueError(f"expected epsilon > 0 and num_iters >= 1, got {epsilon}, {num_iters}")
    dtype = _compute_dtype(cost, a, b)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost, a, b = cost.to(dtype), a.to(dtype), b.to(dtype)
        valid = _valid_pairs(a, b)  # (B, n, m)
        rows, cols = a > 0, b > 0
        log_kernel = torch.where(valid, cost, torch.zeros_like(cost)) / -epsilon  # (B, n, m)
        log_a = torch.log(torch.where(rows, a, torch.ones_like(a)))  # (B, n)
        log_b = torch.log(torch.where(cols, b, torch.ones_like(b)))  # (B, m)
        f = torch.zeros_like(a)  # (B, n): dual potentials in units of epsilon
        g = torch.zeros_like(b)  # (B, m)
        for _ in range(num_iters):
            f = torch.where(rows, log_a - _masked_logsumexp(log_kernel + g.unsqueeze(1), valid, -1), 0.0)
            g = torch.where(cols, log_b - _masked_logsumexp(log_kernel + f.unsqueeze(-1), valid, -2), 0.0)
        log_plan = (log_kernel + f.unsqueeze(-1) + g.unsqueeze(1)).masked_fill(~valid, float("-inf"))
        return torch.exp(log_plan)  # (B, n, m)


def _square_loss_terms(cost_x: Tensor, cost_y: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The constant part of the square-loss GW tensor product: ``(Cx^2 a) 1^T + 1 (Cy^2 b)^T``, (B, n, m)."""
    cx2 = torch.bmm(cost_x.square(), a.unsqueeze(-1))  # (B, n, 1)
    cy2 = torch.bmm(cost_y.square(), b.unsqueeze(-1)).transpose(1, 2)  # (B, 1, m)
    return cx2 + cy2


def _prepare_gw(
    cost_x: Tensor, cost_y: Tensor, a: Tensor, b: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate, cast to the compute dtype and zero the costs of padding pairs (garbage must not leak)."""
    bsz, n, n2 = cost_x.shape
    _, m, m2 = cost_y.shape
    if n != n2 or m != m2 or a.shape != (bsz, n) or b.shape != (bsz, m) or cost_y.shape[0] != bsz:
        raise ValueError(
            f"expected cost_x (B, n, n), cost_y (B, m, m), a (B, n), b (B, m); got "
            f"{tuple(cost_x.shape)}, {tuple(cost_y.shape)}, {tuple(a.shape)}, {tuple(b.shape)}"
        )
    dtype = _compute_dtype(cost_x, cost_y, a, b)
    cost_x, cost_y, a, b = cost_x.to(dtype), cost_y.to(dtype), a.to(dtype), b.to(dtype)
    if not bool((a > 0).all()):  # skipped when nothing is padded: one pass less over (B, n, n)
        cost_x = torch.where(_valid_pairs(a, a), cost_x, torch.zeros_like(cost_x))
    if not bool((b > 0).all()):
        cost_y = torch.where(_valid_pairs(b, b), cost_y, torch.zeros_like(cost_y))
    return cost_x, cost_y, a, b


def _gw_value(cost_x: Tensor, cost_y: Tensor, const: Tensor, plan: Tensor) -> Tensor:
    """``<const - 2 Cx T Cy^T, T>`` per problem, (B,)."""
    cross = torch.bmm(torch.bmm(cost_x, plan), cost_y.transpose(1, 2))  # (B, n, m)
    return ((const - 2.0 * cross) * plan).sum(dim=(1, 2))


def gromov_wasserstein_value(cost_x: Tensor, cost_y: Tensor, a: Tensor, b: Tensor, plan: Tensor) -> Tensor:
    """Square-loss Gromov-Wasserstein objective of a given plan, ``<C_gamma, gamma>`` per problem, (B,).

    ``C_gamma = (Cx^2 a) 1^T + 1 (Cy^2 b)^T - 2 Cx gamma Cy^T`` is the standard linearisation of
    ``sum_{ijkl} (Cx_ik - Cy_jl)^2 gamma_ij gamma_kl`` (equal to it when gamma has marginals a, b), the
    objective POT's ``gromov_wasserstein2(loss_fun="square_loss")`` reports. Differentiable w.r.t. the cost
    matrices (and the plan); computed in fp32 (fp64 for fp64 inputs) with autocast off.
    """
    with torch.autocast(device_type=cost_x.device.type, enabled=False):
        cost_x, cost_y, a, b = _prepare_gw(cost_x, cost_y, a, b)
        plan = plan.to(cost_x.dtype)
        return _gw_value(cost_x, cost_y, _square_loss_terms(cost_x, cost_y, a, b), plan)


def gromov_wasserstein(
    cost_x: Tensor,
    cost_y: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    beta: float,
    outer_iters: int,
    inner_iters: int,
) -> tuple[Tensor, Tensor]:
    """Square-loss Gromov-Wasserstein between intra-domain costs ``(B, n, n)`` and ``(B, m, m)``: (plan, distance).

    Starting from ``gamma = a b^T``, each of ``outer_iters`` steps linearises the objective at the current plan
    (:func:`gromov_wasserstein_value`'s ``C_gamma``) and replaces the plan by an IPOT solve of that cost
    (``beta``, ``inner_iters`` steps). The returned plan ``(B, n, m)`` is detached; the distance ``(B,)`` is
    ``<C_gamma, gamma>`` at the final plan and is differentiable w.r.t. the cost matrices with the plan held
    fixed. Zero-mass points get zero mass and do not influence the rest. fp32 (fp64 for fp64 inputs), no autocast.
    """
    if beta <= 0 or outer_iters < 1 or inner_iters < 1:
        raise ValueError(f"expected beta > 0 and iterations >= 1, got {beta}, {outer_iters}, {inner_iters}")
    with torch.autocast(device_type=cost_x.device.type, enabled=False):
        cost_x, cost_y, a, b = _prepare_gw(cost_x, cost_y, a, b)
        const = _square_loss_terms(cost_x, cost_y, a, b)  # (B, n, m)
        with torch.no_grad():
            valid = _valid_pairs(a, b)
            cx, cy, c0 = cost_x.detach(), cost_y.detach(), const.detach()
            cy_t = cy.transpose(1, 2)
            plan = a.unsqueeze(-1) * b.unsqueeze(1)  # (B, n, m)
            for _ in range(outer_iters):
                linear = torch.baddbmm(c0, torch.bmm(cx, plan), cy_t, alpha=-2.0)  # (B, n, m)
                kernel = _gibbs_kernel(linear, valid, beta)
                plan = _ipot_iterate(kernel, a, b, inner_iters, steps=None)
        return plan, _gw_value(cost_x, cost_y, const, plan)
