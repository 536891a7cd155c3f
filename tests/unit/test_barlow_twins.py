"""Barlow Twins against a naive per-element loop; the injected all-reduce path; precision handling."""

from __future__ import annotations

import torch

from volta.dist import differentiable_all_reduce_sum
from volta.losses.barlow_twins import barlow_twins_loss


def _naive(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> float:
    n, d = z1.shape
    rows1, rows2 = z1.double().tolist(), z2.double().tolist()

    def standardise(z: list[list[float]]) -> list[list[float]]:
        cols = []
        for k in range(d):
            col = [z[i][k] for i in range(n)]
            mean = sum(col) / n
            var = sum((c - mean) ** 2 for c in col) / n
            cols.append([(c - mean) / (var + eps) ** 0.5 for c in col])
        return cols  # (d, n)

    s1, s2 = standardise(rows1), standardise(rows2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(s1[i][k] * s2[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def test_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(12, 6, generator=gen, dtype=torch.float64)
    for lambd in (0.005, 1.0):
        assert abs(float(barlow_twins_loss(z1, z2, lambd=lambd)) - _naive(z1, z2, lambd)) < 1e-10


def test_fp32_and_bf16_inputs_compute_in_fp32() -> None:
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(16, 8, generator=gen) * 100 + 50, torch.randn(16, 8, generator=gen)
    want = _naive(z1, z2, 0.005)
    assert abs(float(barlow_twins_loss(z1, z2, lambd=0.005)) - want) < 1e-4 * want
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = barlow_twins_loss(z1.bfloat16(), z2.bfloat16(), lambd=0.005)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_constant_embedding_is_finite() -> None:
    z = torch.ones(8, 4, requires_grad=True)
    loss = barlow_twins_loss(z, z, lambd=0.005)
    loss.backward()
    assert z.grad is not None and torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert float(loss.detach()) == 4.0  # zero variance: C = 0, every diagonal term is 1


def test_all_reduce_hook_receives_global_sums_and_identity_when_not_distributed() -> None:
    z1, z2 = torch.randn(10, 5, dtype=torch.float64), torch.randn(10, 5, dtype=torch.float64)
    calls: list[tuple[int, ...]] = []

    def doubling(x: torch.Tensor) -> torch.Tensor:  # two identical ranks
        calls.append(tuple(x.shape))
        return 2 * x

    torch.testing.assert_close(
        barlow_twins_loss(z1, z2, lambd=0.01, all_reduce=doubling),
        barlow_twins_loss(torch.cat([z1, z1]), torch.cat([z2, z2]), lambd=0.01),
    )
    assert calls == [(), (2, 5), (2, 5), (5, 5)]
    x = torch.randn(3)
    assert differentiable_all_reduce_sum(x) is x
