"""bench.got's POT baseline (b): the differentiable (torch backend) and numpy paths solve the same problems."""

from __future__ import annotations

import pytest
import torch

from bench.got import make_batch, pot_exact, pot_exact_differentiable

pytestmark = pytest.mark.unit


def test_pot_baseline_gives_the_same_values_with_and_without_gradients() -> None:
    image, text, image_mask, text_mask = make_batch(batch=3, patches=16, tokens=8, dim=32, seed=1)
    image, text = image.double(), text.double()  # float64 end to end, so finite differences are meaningful
    text_mask[:, :4] = True  # make_batch draws 12-20 real tokens; 8 slots here, at least 4 real
    plain = pot_exact(image, text, image_mask, text_mask)
    image.requires_grad_(True)
    text.requires_grad_(True)
    diff = pot_exact_differentiable(image, text, image_mask, text_mask)
    torch.testing.assert_close(diff["wd"].detach(), plain["wd"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(diff["gwd"].detach(), plain["gwd"], rtol=1e-9, atol=1e-12)
    diff["loss"].backward()
    assert image.grad is not None and text.grad is not None
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    # POT's gradients (EMD plan, GW envelope) pushed through the costs, against central finite differences
    eps = 1e-5
    with torch.no_grad():
        direction = torch.randn(text.shape, generator=torch.Generator().manual_seed(0), dtype=text.dtype)
        up = pot_exact(image, text + eps * direction, image_mask, text_mask)["loss"]
        down = pot_exact(image, text - eps * direction, image_mask, text_mask)["loss"]
    numeric = float((up - down) / (2 * eps))
    analytic = float((text.grad * direction).sum())
    assert analytic == pytest.approx(numeric, rel=0.05, abs=1e-4)
