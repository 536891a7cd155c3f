"""GOT loss: padding has no influence, pruning scopes, a plain reference implementation, adversarial inputs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from bench.got import SETTINGS, baseline_got
from volta.losses.got import (
    _CosineSimilarities,
    cosine_cost,
    got_contrastive_loss,
    got_loss,
    prune_cost,
    salience_marginal,
)


def _batch(
    dtype: torch.dtype = torch.float64, seed: int = 0, bsz: int = 4, patches: int = 12, tokens: int = 9
):
    gen = torch.Generator().manual_seed(seed)
    concepts = torch.randn(6, 16, generator=gen, dtype=dtype)
    image = torch.randn(bsz, patches, 6, generator=gen, dtype=dtype).softmax(-1) @ concepts
    text = torch.randn(bsz, tokens, 6, generator=gen, dtype=dtype).softmax(-1) @ concepts
    image = image + 0.3 * torch.randn(image.shape, generator=gen, dtype=dtype)
    text = text + 0.3 * torch.randn(text.shape, generator=gen, dtype=dtype)
    image_mask = torch.ones(bsz, patches, dtype=torch.bool)
    image_mask[1, 9:] = False
    image_mask[2, 0] = False
    text_mask = torch.zeros(bsz, tokens, dtype=torch.bool)
    for i, (start, stop) in enumerate([(1, 5), (0, 9), (1, 3), (2, 8)][:bsz]):
        text_mask[i, start:stop] = True  # position 0 excluded in some rows, like a special token
    return image, text, image_mask, text_mask


@pytest.mark.parametrize(
    ("dtype", "wd_tol", "gwd_tol"), [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-5, 1e-3)]
)
def test_padding_has_no_influence(dtype: torch.dtype, wd_tol: float, gwd_tol: float) -> None:
    image, text, image_mask, text_mask = _batch(dtype)
    image[~image_mask] = 1e6  # garbage under padding
    text[~text_mask] = -3.0
    out = got_loss(image, text, image_mask, text_mask, **SETTINGS)
    assert out["plan"].shape == (4, 12, 9) and not out["plan"].requires_grad
    for i in range(4):
        v, t = image[i : i + 1][:, image_mask[i]], text[i : i + 1][:, text_mask[i]]
        alone = got_loss(
            v,
            t,
            torch.ones(v.shape[:2], dtype=torch.bool),
            torch.ones(t.shape[:2], dtype=torch.bool),
            **SETTINGS,
        )
        torch.testing.assert_close(out["wd"][i], alone["wd"][0], rtol=wd_tol, atol=0)
        torch.testing.assert_close(out["gwd"][i], alone["gwd"][0], rtol=gwd_tol, atol=0)
        plan = out["plan"][i]
        torch.testing.assert_close(
            plan[image_mask[i]][:, text_mask[i]], alone["plan"][0], rtol=wd_tol * 100, atol=1e-9
        )
        assert (plan[~image_mask[i]] == 0).all() and (plan[:, ~text_mask[i]] == 0).all()


def test_matches_plain_reference_values_and_gradients() -> None:
    image, text, image_mask, text_mask = _batch(torch.float64)
    grads = []
    for fn in (lambda *x: got_loss(*x, **SETTINGS), baseline_got):
        v, t = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        out = fn(v, t, image_mask, text_mask)
        out["loss"].backward()
        grads.append((out["wd"].detach(), out["gwd"].detach(), v.grad, t.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_prune_threshold_per_sample_and_per_batch() -> None:
    cost = torch.rand(3, 5, 4, dtype=torch.float64)
    cost[1] = cost[1] * 3 + 1  # samples with different ranges
    valid = torch.rand(3, 5, 4) > 0.3
    per_sample = prune_cost(cost, valid, fraction=0.2)
    per_batch = prune_cost(cost, valid, fraction=0.2, scope="batch")
    for i in range(3):
        values = cost[i][valid[i]]
        thr = values.min() + 0.2 * (values.max() - values.min())
        torch.testing.assert_close(per_sample[i], torch.relu(cost[i] - thr))
    values = cost[valid]
    torch.testing.assert_close(
        per_batch, torch.relu(cost - values.min() - 0.2 * (values.max() - values.min()))
    )
    assert not torch.allclose(per_sample, per_batch)
    torch.testing.assert_close(
        prune_cost(cost[:1], valid[:1], fraction=0.2),
        prune_cost(cost[:1], valid[:1], fraction=0.2, scope="batch"),
    )
    everything = torch.ones_like(valid)
    for scope in ("sample", "batch"):  # valid=None is the all-valid fast path: same values and gradients
        pruned = [cost.clone().requires_grad_(True) for _ in range(2)]
        fast = prune_cost(pruned[0], None, fraction=0.2, scope=scope)
        slow = prune_cost(pruned[1], everything, fraction=0.2, scope=scope)
        torch.testing.assert_close(fast, slow)
        weights = torch.rand(cost.shape, dtype=torch.float64)
        (fast * weights).sum().backward()
        (slow * weights).sum().backward()
        torch.testing.assert_close(pruned[0].grad, pruned[1].grad)


def test_detached_threshold_gives_the_gradient_of_a_constant_threshold() -> None:
    cost = torch.rand(2, 6, 5, dtype=torch.float64)
    weights = torch.rand(cost.shape, dtype=torch.float64)
    grads = {}
    for detach in (False, True):
        c = cost.clone().requires_grad_(True)
        (prune_cost(c, None, fraction=0.3, detach=detach) * weights).sum().backward()
        grads[detach] = c.grad
    low = cost.amin(dim=(1, 2), keepdim=True)
    thr = low + 0.3 * (cost.amax(dim=(1, 2), keepdim=True) - low)
    torch.testing.assert_close(grads[True], weights * (cost > thr))  # only the relu, as for a fixed threshold
    # the authors' differentiable threshold: the min entry also gets -0.7 * sum(w above thr), the max -0.3 * that
    assert not torch.allclose(grads[False], grads[True])
    above = (weights * (cost > thr)).sum(dim=(1, 2))  # (B,)
    for i in range(2):
        flat = grads[False][i].flatten() - grads[True][i].flatten()
        torch.testing.assert_close(flat[cost[i].flatten().argmin()], -0.7 * above[i])
        torch.testing.assert_close(flat[cost[i].flatten().argmax()], -0.3 * above[i])


def test_prune_scope_changes_got_only_across_samples() -> None:
    image, text, image_mask, text_mask = _batch(torch.float64)
    text[1] = text[1] * 0.01 + image[1, :9]  # a sample whose cost range differs from the others
    sample = got_loss(image, text, image_mask, text_mask, **SETTINGS, prune_scope="sample")
    batch = got_loss(image, text, image_mask, text_mask, **SETTINGS, prune_scope="batch")
    assert not torch.allclose(sample["wd"], batch["wd"])
    one = [
        got_loss(image[:1], text[:1], image_mask[:1], text_mask[:1], **SETTINGS, prune_scope=s)
        for s in ("sample", "batch")
    ]
    torch.testing.assert_close(one[0]["loss"], one[1]["loss"])


def test_cosine_cost_is_one_minus_cosine() -> None:
    x, y = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    want = 1 - torch.nn.functional.cosine_similarity(x[:, :, None], y[:, None], dim=-1)
    torch.testing.assert_close(cosine_cost(x, y), want)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: cosine_cost(z), (xg,))


def _plain_similarities(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    return xn @ xn.transpose(1, 2), xn @ yn.transpose(1, 2), yn @ yn.transpose(1, 2)


def test_fused_similarities_match_plain_autograd_values_and_gradients() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    x[1, 2] = 0.0  # an all-zero row: the norm is clamped, F.normalize's derivative is x / eps there
    y[0, 3] = 0.0
    weights = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in _plain_similarities(x, y)]
    grads = []
    for fn in (lambda a, b: _CosineSimilarities.apply(a, b, 1e-12), _plain_similarities):
        xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        outs = fn(xg, yg)
        sum((w * o).sum() for w, o in zip(weights, outs)).backward()
        grads.append((*[o.detach() for o in outs], xg.grad, yg.grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    sxx, _, syy = grads[0][:3]
    assert torch.equal(sxx, sxx.transpose(1, 2)) and torch.equal(syy, syy.transpose(1, 2))  # bit for bit
    xs, ys = x[:, 3:].clone().requires_grad_(True), y[1:2].expand(3, -1, -1).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _CosineSimilarities.apply(a, b, 1e-12), (xs, ys))


def _finite_run(image: torch.Tensor, text: torch.Tensor, image_mask: torch.Tensor, text_mask: torch.Tensor):
    v, t = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    out = got_loss(v, t, image_mask, text_mask, **SETTINGS)
    out["loss"].backward()
    assert (
        torch.isfinite(out["loss"]) and torch.isfinite(out["wd"]).all() and torch.isfinite(out["gwd"]).all()
    )
    assert v.grad is not None and t.grad is not None
    assert torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()
    assert out["loss"].dtype == torch.float32
    return out


@pytest.mark.parametrize("case", ["identical", "zeros", "huge", "bf16", "one_token"])
def test_adversarial_inputs_give_finite_loss_and_gradients(case: str) -> None:
    image, text, image_mask, text_mask = _batch(torch.float32)
    if case == "identical":
        image[:] = 1.0
        text[:] = 1.0
    elif case == "zeros":
        image[0] = 0.0
        text[:] = 0.0
    elif case == "huge":
        image, text = image * 1e4, text * -1e4
    elif case == "bf16":
        image, text = image.bfloat16(), text.bfloat16()
    elif case == "one_token":
        text_mask[:] = False
        text_mask[:, 2] = True
    out = _finite_run(image, text, image_mask, text_mask)
    if case == "identical":
        torch.testing.assert_close(out["wd"], torch.zeros(4))
    if case == "one_token":  # every patch sends all its mass to the one token: WD = mean pruned cost
        assert torch.allclose(
            out["plan"].sum(2)[image_mask], (1 / image_mask.sum(1, keepdim=True)).expand(-1, 12)[image_mask]
        )


def test_sample_without_tokens_contributes_zero_and_is_left_out_of_the_mean() -> None:
    image, text, image_mask, text_mask = _batch(torch.float32)
    text_mask[3] = False
    out = _finite_run(image, text, image_mask, text_mask)
    assert out["wd"][3] == 0 and out["gwd"][3] == 0 and (out["plan"][3] == 0).all()
    rest = got_loss(image[:3], text[:3], image_mask[:3], text_mask[:3], **SETTINGS)
    torch.testing.assert_close(out["loss"], rest["loss"])
    text_mask[:] = False
    out = _finite_run(image, text, image_mask, text_mask)
    assert out["loss"] == 0


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda *t: got_loss(*t, **SETTINGS),
        lambda *t: got_contrastive_loss(*t, temperature=0.1, ipot_beta=0.5, ipot_iters=3),
    ],
    ids=["got_loss", "got_contrastive_loss"],
)
def test_autocast_does_not_change_the_result(loss_fn: Any) -> None:
    image, text, image_mask, text_mask = _batch(torch.float32)
    plain = loss_fn(image, text, image_mask, text_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_fn(image, text, image_mask, text_mask)
    assert mixed["loss"].dtype == torch.float32
    torch.testing.assert_close(mixed["loss"], plain["loss"])


def test_relaxed_image_marginal_lets_two_words_share_one_small_object() -> None:
    # 2 object patches of 16; both words name the object ("red triangle"). Balanced transport can give the object
    # at most 2/16 of the words' mass, so most of it (and the WD gradient) lands on the background; with the
    # relaxed patch marginal both words keep their mass on the object.
    gen = torch.Generator().manual_seed(3)
    obj, bg = torch.randn(2, 32, generator=gen, dtype=torch.float64)
    image = torch.stack([obj] * 2 + [bg] * 14) + 0.05 * torch.randn(
        16, 32, generator=gen, dtype=torch.float64
    )
    text = torch.stack([obj + 0.3 * bg, obj - 0.3 * bg])  # both closer to the object than to the background
    masks = torch.ones(1, 16, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    settings = SETTINGS | {"prune_fraction": 0.0}
    on_object = {}
    for kl in (None, 0.05):
        out = got_loss(image[None], text[None], *masks, **settings, image_marginal_kl=kl)
        plan = out["plan"][0]  # (16, 2)
        on_object[kl] = plan[:2].sum(0) / plan.sum(0)  # each word's share of its mass on the object
        torch.testing.assert_close(plan.sum(0), torch.full((2,), 0.5, dtype=torch.float64))  # words keep 1/T
    assert (
        on_object[None].mean() <= 2 / 16 + 1e-6
    )  # both words together: at most the object's 2/16 of the mass
    assert on_object[None].min() < 0.01  # here one word gets the object and the other only background
    assert (on_object[0.05] > 0.9).all()
    # padding still has no influence with the relaxed marginal
    image_p = torch.cat([image, torch.full((3, 32), 1e6, dtype=torch.float64)])[None]
    padded = got_loss(
        image_p, text[None], torch.arange(19)[None] < 16, masks[1], **settings, image_marginal_kl=0.05
    )
    alone = got_loss(image[None], text[None], *masks, **settings, image_marginal_kl=0.05)
    torch.testing.assert_close(padded["wd"], alone["wd"], rtol=1e-10, atol=0)
    torch.testing.assert_close(padded["plan"][0, :16], alone["plan"][0], rtol=1e-9, atol=1e-12)


def _naive_salience(x: torch.Tensor, valid: int, temperature: float) -> torch.Tensor:
    # one image, a loop over its first ``valid`` patches: the definition written out with plain Python numbers
    rows = [x[j] / x[j].norm() for j in range(valid)]
    mean = sum(rows) / valid
    mean = mean / mean.norm()
    sal = [1.0 - float(r @ mean) for r in rows]
    mu = sum(sal) / valid
    sd = (sum((s - mu) ** 2 for s in sal) / valid) ** 0.5
    e = [math.exp((s - mu) / sd / temperature) for s in sal]
    return torch.tensor([v / sum(e) for v in e] + [0.0] * (x.shape[0] - valid), dtype=torch.float64)


def test_salience_marginal_matches_a_plain_loop_and_ignores_padding() -> None:
    image, _, image_mask, _ = _batch(torch.float64)
    image[~image_mask] = 1e6  # garbage under padding
    for temperature in (0.5, 2.0):
        got = salience_marginal(image, image_mask, temperature=temperature)
        for i in range(image.shape[0]):
            order = torch.argsort((~image_mask[i]).to(torch.uint8), stable=True)  # valid first
            want = _naive_salience(image[i, order], int(image_mask[i].sum()), temperature)
            torch.testing.assert_close(got[i, order], want, rtol=1e-9, atol=1e-12)
    assert (got[~image_mask] == 0).all()
    torch.testing.assert_close(got.sum(1), torch.ones(image.shape[0], dtype=torch.float64))


def test_salience_marginal_edge_cases() -> None:
    same = torch.ones(2, 5, 3)  # every patch alike: uniform
    torch.testing.assert_close(
        salience_marginal(same, torch.ones(2, 5, dtype=torch.bool), temperature=1.0), torch.full((2, 5), 0.2)
    )
    empty = salience_marginal(torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.bool), temperature=1.0)
    assert (empty == 0).all()
    x = torch.randn(1, 6, 4, requires_grad=True)
    assert not salience_marginal(x, torch.ones(1, 6, dtype=torch.bool), temperature=1.0).requires_grad
    with pytest.raises(ValueError, match="temperature"):
        salience_marginal(x, torch.ones(1, 6, dtype=torch.bool), temperature=0.0)


def test_salience_marginal_moves_the_words_mass_onto_the_object() -> None:
    # 2 object patches of 16 and a caption of two object words: with the uniform patch marginal at most 2/16 of
    # the words' mass can be on the object; with the salience marginal most of it is, in both the WD plan and
    # the contrast (whose plan is not returned: its WD falls because the words' mass goes to the near patches)
    gen = torch.Generator().manual_seed(3)
    obj, bg = torch.randn(2, 32, generator=gen, dtype=torch.float64)
    image = torch.stack([obj] * 2 + [bg] * 14) + 0.05 * torch.randn(
        16, 32, generator=gen, dtype=torch.float64
    )
    text = torch.stack([obj + 0.3 * bg, obj - 0.3 * bg])
    masks = torch.ones(1, 16, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    settings = SETTINGS | {"prune_fraction": 0.0}
    uniform = got_loss(image[None], text[None], *masks, **settings)
    salient = got_loss(image[None], text[None], *masks, **settings, image_salience=1.0)
    a = salience_marginal(image[None], masks[0], temperature=1.0)[0]
    assert a[:2].sum() > 0.7  # the object's two patches hold most of the patch mass
    torch.testing.assert_close(
        salient["plan"][0].sum(1), a, rtol=1e-4, atol=1e-6
    )  # the plan's patch marginal
    assert uniform["plan"][0, :2].sum() <= 2 / 16 + 1e-6
    assert salient["plan"][0, :2].sum() > 0.7
    assert salient["wd"] < uniform["wd"]
    pair = torch.stack([image, image.flip(0)]), torch.stack([text, text])
    two = (torch.ones(2, 16, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))
    kw = {"temperature": 0.05, "ipot_beta": 0.5, "ipot_iters": 30}
    plain = got_contrastive_loss(*pair, *two, **kw)
    sal = got_contrastive_loss(*pair, *two, **kw, image_salience=1.0)
    assert (sal["wd"].diagonal() < plain["wd"].diagonal()).all()
