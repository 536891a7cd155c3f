"""IPOT, Sinkhorn and Gromov-Wasserstein against POT's exact solvers, a naive loop and gradcheck."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from volta.losses.ot import gromov_wasserstein, gromov_wasserstein_value, ipot, sinkhorn

F64 = torch.float64


def _problem(seed: int, bsz: int = 3, n: int = 7, m: int = 5, dtype: torch.dtype = F64):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(bsz, n, m, generator=gen, dtype=dtype)
    a = torch.rand(bsz, n, generator=gen, dtype=dtype) + 0.1
    b = torch.rand(bsz, m, generator=gen, dtype=dtype) + 0.1
    a[0, 4:] = 0.0  # padding rows
    b[1, 3:] = 0.0  # padding columns
    a[2, 0] = 0.0  # a zero-mass point in the middle
    return cost, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


def _naive_ipot(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, iters: int, rho: float | None = None
) -> torch.Tensor:
    """Xie et al.'s IPOT written plainly for one unpadded problem (independent reference); with ``rho`` the row
    marginal is KL-relaxed (row scaling raised to ``rho / (rho + beta)``)."""
    power = 1.0 if rho is None else rho / (rho + beta)
    kernel = torch.exp(-cost / beta)
    plan = torch.ones_like(cost)
    sigma = torch.ones(cost.shape[1], dtype=cost.dtype)
    for _ in range(iters):
        q = kernel * plan
        delta = (a / (q @ sigma)) ** power
        sigma = b / (q.T @ delta)
        plan = delta[:, None] * q * sigma[None, :]
    return plan


def test_ipot_equals_naive_loop_on_each_unpadded_problem() -> None:
    cost, a, b = _problem(0)
    cost[0, 4:] = 1e9  # garbage under padding must not matter
    cost[1, :, 3:] = float("nan")
    plan = ipot(cost, a, b, beta=0.3, num_iters=25)
    assert torch.isfinite(plan).all()
    for i in range(cost.shape[0]):
        rows, cols = a[i] > 0, b[i] > 0
        ref = _naive_ipot(cost[i][rows][:, cols], a[i][rows], b[i][cols], 0.3, 25)
        torch.testing.assert_close(plan[i][rows][:, cols], ref, rtol=1e-10, atol=1e-13)
        assert (plan[i][~rows] == 0).all() and (plan[i][:, ~cols] == 0).all()


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_plan_marginals_and_exact_zeros(solver: str) -> None:
    cost, a, b = _problem(1, dtype=torch.float32)
    if solver == "ipot":
        plan = ipot(cost, a, b, beta=0.2, num_iters=300)
    else:
        plan = sinkhorn(cost, a, b, epsilon=0.05, num_iters=300)
    assert plan.dtype == torch.float32
    torch.testing.assert_close(plan.sum(1), b, atol=1e-6, rtol=0)  # the last update is the column scaling
    torch.testing.assert_close(plan.sum(2), a, atol=1e-4, rtol=0)
    assert (plan[a == 0] == 0).all()
    assert (plan.transpose(1, 2)[b == 0] == 0).all()


def test_ipot_converges_to_pot_emd_as_beta_shrinks() -> None:
    cost, a, b = _problem(2)
    exact = np.array([ot.emd2(a[i].numpy(), b[i].numpy(), cost[i].numpy()) for i in range(3)])
    gaps = []
    for beta, iters in [(2.0, 20), (0.5, 200), (0.1, 2000)]:
        value = (ipot(cost, a, b, beta=beta, num_iters=iters) * cost).sum((1, 2)).numpy()
        gaps.append(np.abs(value - exact).max())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-6, gaps


def test_sinkhorn_converges_to_pot_emd_as_epsilon_shrinks() -> None:
    cost, a, b = _problem(3)
    exact = np.array([ot.emd2(a[i].numpy(), b[i].numpy(), cost[i].numpy()) for i in range(3)])
    gaps = []
    for eps, iters in [(0.1, 500), (0.01, 3000), (0.001, 20000)]:
        value = (sinkhorn(cost, a, b, epsilon=eps, num_iters=iters) * cost).sum((1, 2)).numpy()
        gaps.append(np.abs(value - exact).max())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-4, gaps


def test_sinkhorn_padding_has_no_influence() -> None:
    cost, a, b = _problem(4)
    cost[0, 4:] = 1e9
    plan = sinkhorn(cost, a, b, epsilon=0.1, num_iters=50)
    for i in range(3):
        rows, cols = a[i] > 0, b[i] > 0
        alone = sinkhorn(
            cost[i : i + 1][:, rows][:, :, cols],
            a[i : i + 1, rows],
            b[i : i + 1, cols],
            epsilon=0.1,
            num_iters=50,
        )
        torch.testing.assert_close(plan[i][rows][:, cols], alone[0], rtol=1e-10, atol=1e-13)


def test_ipot_gradcheck() -> None:
    cost, a, b = _problem(5, bsz=3, n=5, m=4)
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: ipot(c, a, b, beta=0.3, num_iters=8), (cost,))


def test_sinkhorn_gradcheck() -> None:
    cost, a, b = _problem(6, bsz=3, n=5, m=4)
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, a, b, epsilon=0.3, num_iters=8), (cost,))


def test_half_precision_and_autocast_compute_in_fp32() -> None:
    cost, a, b = _problem(7, dtype=torch.float32)
    cost = cost * 10  # exp(-C / 0.1) would underflow in fp16 / bf16
    reference = ipot(cost, a, b, beta=0.1, num_iters=30)
    for dtype in (torch.bfloat16, torch.float16):
        plan = ipot(cost.to(dtype), a.to(dtype), b.to(dtype), beta=0.1, num_iters=30)
        assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = ipot(cost, a, b, beta=0.1, num_iters=30)
        _, dist = gromov_wasserstein(
            cost[:, :, :4] @ cost[:, :, :4].transpose(1, 2),
            cost[:, :4, :].transpose(1, 2) @ cost[:, :4, :],
            a,
            b,
            beta=0.1,
            outer_iters=2,
            inner_iters=5,
        )
    assert plan.dtype == torch.float32 and dist.dtype == torch.float32
    torch.testing.assert_close(plan, reference)


def test_extreme_costs_stay_finite() -> None:
    cost, a, b = _problem(8, dtype=torch.float32)
    cost = (cost * 1e4).requires_grad_(True)
    plan = ipot(cost, a, b, beta=0.01, num_iters=30)
    (plan * cost).sum().backward()
    assert torch.isfinite(plan).all() and torch.isfinite(cost.grad).all()
    plan = sinkhorn(cost, a, b, epsilon=0.01, num_iters=30)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(1), b, atol=2e-2, rtol=0)  # fp32 log domain at C / eps = 1e6


def test_empty_problem_gives_zero_plan_and_finite_gradient() -> None:
    cost, a, b = _problem(9, dtype=torch.float32)
    b[0] = 0.0  # sample 0 has no valid column at all
    cost.requires_grad_(True)
    for plan in (ipot(cost, a, b, beta=0.5, num_iters=10), sinkhorn(cost, a, b, epsilon=0.5, num_iters=10)):
        (plan * cost).sum().backward()
        assert (plan[0] == 0).all() and torch.isfinite(plan).all() and torch.isfinite(cost.grad).all()
        cost.grad = None


# ------------------------------------------------------------------------------------ Gromov-Wasserstein
def _metric_problem(seed: int, n: int = 8, m: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 2, generator=gen, dtype=F64), torch.rand(m, 2, generator=gen, dtype=F64)
    return torch.cdist(x, x), torch.cdist(y, y)


def _naive_gw(cx: torch.Tensor, cy: torch.Tensor, plan: torch.Tensor) -> float:
    loss = (cx[:, None, :, None] - cy[None, :, None, :]) ** 2  # (i, j, k, l)
    return float(torch.einsum("ijkl,ij,kl->", loss, plan, plan))


def test_gw_distance_matches_naive_formula_and_pot_on_metric_problems() -> None:
    ours, pot = [], []
    for seed in range(8):
        cx, cy = _metric_problem(seed)
        p, q = torch.full((1, 8), 1 / 8, dtype=F64), torch.full((1, 6), 1 / 6, dtype=F64)
        plan, dist = gromov_wasserstein(cx[None], cy[None], p, q, beta=0.1, outer_iters=20, inner_iters=200)
        assert not plan.requires_grad
        torch.testing.assert_close(plan.sum(2), p, atol=1e-5, rtol=0)
        assert abs(float(dist) - _naive_gw(cx, cy, plan[0])) < 1e-6
        reference = ot.gromov.gromov_wasserstein2(
            cx.numpy(), cy.numpy(), p[0].numpy(), q[0].numpy(), loss_fun="square_loss"
        )
        ours.append(float(dist))
        pot.append(float(reference))
    # Both are local solvers: per problem either may win; on average ours must not be worse than POT's.
    assert np.mean(ours) <= np.mean(pot) * 1.05, (ours, pot)
    assert np.max(np.abs(np.array(ours) - np.array(pot))) < 0.05


def test_gw_finds_the_isometry() -> None:
    for seed in range(3):
        cx, _ = _metric_problem(seed, n=7)
        perm = torch.randperm(7, generator=torch.Generator().manual_seed(seed))
        cy = cx[perm][:, perm]
        p = torch.full((1, 7), 1 / 7, dtype=F64)
        plan, dist = gromov_wasserstein(cx[None], cy[None], p, p, beta=0.1, outer_iters=20, inner_iters=200)
        assert abs(float(dist)) < 1e-5  # the global optimum is 0
        torch.testing.assert_close(
            plan[0][perm, torch.arange(7)], torch.full((7,), 1 / 7, dtype=F64), atol=1e-3, rtol=0
        )


def test_gw_padding_has_no_influence() -> None:
    cx, cy = _metric_problem(10, n=6, m=5)
    big_x, big_y = torch.full((1, 9, 9), 7.0, dtype=F64), torch.full((1, 8, 8), -3.0, dtype=F64)
    ix, iy = torch.tensor([0, 2, 3, 5, 6, 8]), torch.tensor([1, 2, 4, 6, 7])
    big_x[0, ix[:, None], ix[None, :]] = cx
    big_y[0, iy[:, None], iy[None, :]] = cy
    a, b = torch.zeros(1, 9, dtype=F64), torch.zeros(1, 8, dtype=F64)
    a[0, ix], b[0, iy] = 1 / 6, 1 / 5
    plan, dist = gromov_wasserstein(big_x, big_y, a, b, beta=0.1, outer_iters=5, inner_iters=20)
    alone_plan, alone = gromov_wasserstein(
        cx[None], cy[None], a[:, ix], b[:, iy], beta=0.1, outer_iters=5, inner_iters=20
    )
    torch.testing.assert_close(dist, alone, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plan[0][ix][:, iy], alone_plan[0], rtol=1e-10, atol=1e-14)
    assert plan.sum() == pytest.approx(1.0) and plan[0][ix][:, iy].sum() == pytest.approx(1.0)


def test_gw_distance_gradient_holds_the_plan_fixed() -> None:
    cx, cy = _metric_problem(11, n=5, m=4)
    p, q = torch.full((1, 5), 0.2, dtype=F64), torch.full((1, 4), 0.25, dtype=F64)
    cx, cy = cx[None].requires_grad_(True), cy[None].requires_grad_(True)
    plan, dist = gromov_wasserstein(cx, cy, p, q, beta=0.1, outer_iters=5, inner_iters=20)
    assert torch.autograd.gradcheck(lambda x, y: gromov_wasserstein_value(x, y, p, q, plan), (cx, cy))
    got = torch.autograd.grad(dist.sum(), (cx, cy))
    want = torch.autograd.grad(gromov_wasserstein_value(cx, cy, p, q, plan).sum(), (cx, cy))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------ KL-relaxed rows (semi-relaxed unbalanced OT)
def test_relaxed_ipot_equals_naive_loop_and_keeps_padding_out() -> None:
    cost, a, b = _problem(7)
    cost = cost * 2.0  # cosine costs span [0, 2]
    plan = ipot(cost, a, b, beta=0.3, num_iters=25, row_kl=0.2)
    for i in range(cost.shape[0]):
        rows, cols = a[i] > 0, b[i] > 0
        ref = _naive_ipot(cost[i][rows][:, cols], a[i][rows], b[i][cols], 0.3, 25, rho=0.2)
        torch.testing.assert_close(plan[i][rows][:, cols], ref, rtol=1e-10, atol=1e-13)
        assert (plan[i][~rows] == 0).all() and (plan[i][:, ~cols] == 0).all()
    torch.testing.assert_close(plan.sum(1), b, rtol=0, atol=1e-12)  # columns stay exact
    assert (plan.sum(2) - a).abs().max() > 1e-2  # rows do not


def test_free_rows_have_a_closed_form() -> None:
    # row_kl = 0: each step multiplies by the kernel and rescales the columns only, T_ij = b_j softmax_i(-t C_ij / beta)
    cost, a, b = _problem(8)
    for steps in (1, 4):
        plan = ipot(cost, a, b, beta=0.4, num_iters=steps, row_kl=0.0)
        logits = (-steps * cost / 0.4).masked_fill(a.unsqueeze(-1) == 0, float("-inf"))
        ref = b.unsqueeze(1) * torch.softmax(logits, dim=1)
        torch.testing.assert_close(plan, ref, rtol=1e-10, atol=1e-14)


def test_relaxed_ipot_converges_to_the_semi_relaxed_optimum() -> None:
    # min <C, T> + rho KL(T 1 | a) with T^T 1 = b, solved independently: columns as softmaxes, L-BFGS on the logits
    gen = torch.Generator().manual_seed(9)
    cost = 2.0 * torch.rand(3, 7, 4, generator=gen, dtype=F64)
    a, b = torch.full((3, 7), 1 / 7, dtype=F64), torch.full((3, 4), 1 / 4, dtype=F64)
    rho = 0.3

    def objective(plan: torch.Tensor) -> torch.Tensor:
        rows = plan.sum(2)
        return (plan * cost).sum((1, 2)) + rho * (rows * torch.log(rows / a) - rows + a).sum(1)

    logits = torch.zeros(3, 7, 4, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [logits], max_iter=5000, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective(b.unsqueeze(1) * torch.softmax(logits, dim=1)).sum()
        value.backward()
        return value

    opt.step(closure)
    best = objective(b.unsqueeze(1) * torch.softmax(logits.detach(), dim=1))
    plan = ipot(cost, a, b, beta=0.05, num_iters=3000, row_kl=rho)
    torch.testing.assert_close(objective(plan), best, rtol=0, atol=2e-4)
    balanced = ipot(cost, a, b, beta=0.05, num_iters=3000)
    assert (objective(balanced) > best + 1e-2).all()  # the relaxation is used: the balanced plan is worse


def test_relaxed_ipot_gradcheck_and_shift_invariance() -> None:
    cost, a, b = _problem(10, bsz=3, n=5, m=4)
    cost.requires_grad_(True)
    for rho in (0.0, 0.2):
        assert torch.autograd.gradcheck(
            lambda c, rho=rho: ipot(c, a, b, beta=0.3, num_iters=6, row_kl=rho), (cost,)
        )
    # a constant added to a whole problem's costs leaves the plan unchanged (the kernel's shift is per problem)
    base = ipot(cost.detach(), a, b, beta=0.3, num_iters=6, row_kl=0.2)
    torch.testing.assert_close(
        ipot(cost.detach() + 0.7, a, b, beta=0.3, num_iters=6, row_kl=0.2), base, rtol=1e-10, atol=1e-13
    )
    with pytest.raises(ValueError, match="row_kl"):
        ipot(cost.detach(), a, b, beta=0.3, num_iters=6, row_kl=-1.0)
