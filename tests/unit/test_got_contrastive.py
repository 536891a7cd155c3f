"""In-batch contrast of Wasserstein distances: a naive per-pair reference, gradients, padding, a known answer."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_got import _batch
from volta.losses.got import got_contrastive_loss

KW = {"temperature": 0.1, "ipot_beta": 0.5, "ipot_iters": 3}


def _naive_ipot(cost: torch.Tensor, iters: int, beta: float) -> torch.Tensor:
    """IPOT on one unpadded problem with uniform marginals, written out element by element."""
    n, m = cost.shape
    kernel = torch.exp(-cost / beta)
    plan = torch.ones(n, m, dtype=cost.dtype)
    sigma = [1.0] * m
    for _ in range(iters):
        q = kernel * plan
        delta = [(1.0 / n) / sum(q[i, j] * sigma[j] for j in range(m)) for i in range(n)]
        sigma = [(1.0 / m) / sum(q[i, j] * delta[i] for i in range(n)) for j in range(m)]
        plan = torch.stack([torch.stack([delta[i] * q[i, j] * sigma[j] for j in range(m)]) for i in range(n)])
    return plan


def _naive_wd(x: torch.Tensor, y: torch.Tensor, iters: int, beta: float) -> torch.Tensor:
    """WD of the IPOT plan between unpadded patches ``x`` and tokens ``y`` under the cosine cost, pair by pair."""
    cost = torch.stack([torch.stack([1 - torch.dot(u, v) / (u.norm() * v.norm()) for v in y]) for u in x])
    return (cost * _naive_ipot(cost, iters, beta)).sum()


def _naive_loss(image, text, image_mask, text_mask, temperature, ipot_beta, ipot_iters):
    keep = [k for k in range(image.shape[0]) if image_mask[k].any() and text_mask[k].any()]
    wd = {}
    for i in keep:
        x = image[i][image_mask[i]]
        for j in keep:
            wd[i, j] = _naive_wd(x, text[j][text_mask[j]], ipot_iters, ipot_beta)
    i2t = t2i = 0.0
    for i in keep:
        row = [-wd[i, j] / temperature for j in keep]
        col = [-wd[j, i] / temperature for j in keep]
        i2t += -row[keep.index(i)] + torch.logsumexp(torch.stack(row), 0)
        t2i += -col[keep.index(i)] + torch.logsumexp(torch.stack(col), 0)
    return 0.5 * (i2t + t2i) / len(keep), wd


def test_matches_a_naive_per_pair_reference_with_padding() -> None:
    image, text, image_mask, text_mask = _batch(torch.float64)
    out = got_contrastive_loss(image, text, image_mask, text_mask, **KW)
    ref, wd = _naive_loss(image, text, image_mask, text_mask, **KW)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-10, atol=1e-12)
    for (i, j), value in wd.items():
        torch.testing.assert_close(out["wd"][i, j], value, rtol=1e-10, atol=1e-12)


def test_gradients_match_finite_differences() -> None:
    image, text, image_mask, text_mask = _batch(torch.float64, bsz=3, patches=5, tokens=4)
    image.requires_grad_(True)
    text.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: got_contrastive_loss(x, y, image_mask, text_mask, **KW)["loss"], (image, text)
    )


def test_known_answer_captions_made_of_their_own_patches() -> None:
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(6, 10, 16, generator=gen, dtype=torch.float64)
    text = image[:, :4].clone()  # each caption's tokens are four of its own image's patches
    masks = torch.ones(6, 10, dtype=torch.bool), torch.ones(6, 4, dtype=torch.bool)
    matched = got_contrastive_loss(image, text, *masks, **KW)
    assert matched["acc"] == 1.0
    assert (
        matched["wd"].diagonal()[:, None] < matched["wd"]
    ).sum() == 6 * 5  # diagonal is each row's minimum
    shuffled = got_contrastive_loss(image, text[torch.tensor([1, 2, 3, 4, 5, 0])], *masks, **KW)
    assert shuffled["acc"] == 0.0 and shuffled["loss"] > matched["loss"] + 1.0
    assert matched["loss"] < math.log(6) < shuffled["loss"]


def test_padding_and_empty_samples_have_no_influence() -> None:
    image, text, image_mask, text_mask = _batch(torch.float64)
    ref = got_contrastive_loss(image[:3], text[:3], image_mask[:3], text_mask[:3], **KW)
    text_mask[3] = False  # sample 3 has no token: left out as a positive and as a negative
    padded = torch.cat([text, torch.randn(4, 5, 16, dtype=torch.float64)], dim=1)
    padded_mask = torch.cat([text_mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    out = got_contrastive_loss(image, padded, image_mask, padded_mask, **KW)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-10, atol=1e-12)
    text_mask[1:] = False  # one sample left: nothing to contrast
    alone = got_contrastive_loss(image.requires_grad_(True), text, image_mask, text_mask, **KW)
    assert alone["loss"] == 0
    alone["loss"].backward()
    assert image.grad is not None and (image.grad == 0).all()


def _naive_swap_loss(image, text, swap, image_mask, text_mask, swap_mask, temperature, ipot_beta, ipot_iters):
    """The contrast with one swap negative per image, from the naive per-pair WDs (image-to-text only)."""
    _, wd = _naive_loss(image, text, image_mask, text_mask, temperature, ipot_beta, ipot_iters)
    keep = [k for k in range(image.shape[0]) if image_mask[k].any() and text_mask[k].any()]
    i2t = t2i = 0.0
    swap_wd = {}
    for i in keep:
        row = [-wd[i, j] / temperature for j in keep]
        if swap_mask[i].any():
            swap_wd[i] = _naive_wd(image[i][image_mask[i]], swap[i][swap_mask[i]], ipot_iters, ipot_beta)
            row.append(-swap_wd[i] / temperature)
        col = [-wd[j, i] / temperature for j in keep]
        i2t += -row[keep.index(i)] + torch.logsumexp(torch.stack(row), 0)
        t2i += -col[keep.index(i)] + torch.logsumexp(torch.stack(col), 0)
    return 0.5 * (i2t + t2i) / len(keep), swap_wd


def test_swap_negatives_match_a_naive_reference_with_padding_and_rows_without_one() -> None:
    image, text, image_mask, text_mask = _batch(torch.float64)
    gen = torch.Generator().manual_seed(7)
    swap = torch.randn(4, 7, 16, generator=gen, dtype=torch.float64)  # other lengths than the captions
    swap_mask = torch.zeros(4, 7, dtype=torch.bool)
    swap_mask[0, 1:6] = True
    swap_mask[1, 0:7] = True
    swap_mask[3, 2:4] = True  # row 2: no swap negative
    out = got_contrastive_loss(
        image, text, image_mask, text_mask, **KW, swap_tokens=swap, swap_mask=swap_mask
    )
    ref, swap_wd = _naive_swap_loss(image, text, swap, image_mask, text_mask, swap_mask, **KW)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-10, atol=1e-12)
    for i, value in swap_wd.items():
        torch.testing.assert_close(out["swap_wd"][i], value, rtol=1e-10, atol=1e-12)
    wins = [bool(out["wd"][i, i] < swap_wd[i]) for i in swap_wd]
    assert out["swap_acc"] == sum(wins) / len(wins)
    # garbage under the swap padding changes nothing; without swap rows the loss is the plain contrast
    garbage = swap.masked_fill(~swap_mask.unsqueeze(-1), 1e6)
    again = got_contrastive_loss(
        image, text, image_mask, text_mask, **KW, swap_tokens=garbage, swap_mask=swap_mask
    )
    torch.testing.assert_close(again["loss"], out["loss"], rtol=1e-10, atol=1e-12)
    none = got_contrastive_loss(
        image, text, image_mask, text_mask, **KW, swap_tokens=swap, swap_mask=swap_mask & False
    )
    torch.testing.assert_close(
        none["loss"], got_contrastive_loss(image, text, image_mask, text_mask, **KW)["loss"]
    )
    assert none["swap_acc"] == 0


def test_a_swap_negative_with_the_same_tokens_in_another_order_is_no_easier_than_a_tie() -> None:
    # Without context, a caption with two words swapped is the same set of tokens: same WD, so the contrast
    # cannot be lowered by the swap column; only tokens that depend on their order can win it.
    image, text, image_mask, text_mask = _batch(torch.float64)
    order = torch.tensor([1, 0, *range(2, text.shape[1])])
    plain = got_contrastive_loss(image, text, image_mask, text_mask, **KW)
    out = got_contrastive_loss(
        image, text, image_mask, text_mask, **KW, swap_tokens=text[:, order], swap_mask=text_mask[:, order]
    )
    torch.testing.assert_close(out["swap_wd"], plain["wd"].diagonal(), rtol=1e-10, atol=1e-12)
    assert out["loss"] > plain["loss"]
    image.requires_grad_(True)
    grad = torch.autograd.grad(
        got_contrastive_loss(
            image,
            text,
            image_mask,
            text_mask,
            **KW,
            swap_tokens=text[:, order],
            swap_mask=text_mask[:, order],
        )["loss"],
        image,
    )[0]
    assert torch.isfinite(grad).all()


def test_swap_tokens_of_another_batch_size_are_rejected() -> None:
    image, text, image_mask, text_mask = _batch(torch.float64)
    with pytest.raises(ValueError, match="swap tokens"):
        got_contrastive_loss(
            image, text, image_mask, text_mask, **KW, swap_tokens=text[:2], swap_mask=text_mask[:2]
        )
