"""Image view augmentation: the sampler draws torchvision's distributions, and both executors (OpenCV on the
CPU, batched torch for the device) compute what torchvision's reference functions compute for the same
parameters.

References are independent of the code under test: torchvision's own ``get_params`` for the distributions
(compared with two-sample Kolmogorov-Smirnov tests and binomial bounds), torchvision's PIL/tensor functionals
for the pixel operations.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from scipy import stats

from tests.fixtures_data import draw_image
from volta.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    ViewParams,
    ViewRecipe,
    draft_scale,
    render_view,
    render_views_batched,
)
from volta.data.views import ImageViews

pytestmark = pytest.mark.unit

N = 4000  # draws per distribution test: KS at alpha 1e-3 detects a 0.05 shift in a CDF


def _photo(width: int = 96, height: int = 72, seed: int = 0) -> np.ndarray:
    """A textured RGB uint8 picture (smooth colour field + edges + grain), (H, W, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)).astype(float)
    img[height // 3 : height // 2, width // 4 : width // 2] = rng.integers(0, 256, 3)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _no_aug(**changes: object) -> ViewParams:
    base = {
        "top": 0,
        "left": 0,
        "height": 72,
        "width": 96,
        "flip": False,
        "jitter": (),
        "grayscale": False,
        "blur_sigma": 0.0,
        "solarize": False,
    }
    return ViewParams(**{**base, **changes})  # type: ignore[arg-type]


def _mad(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean absolute difference in grey levels."""
    a_t = torch.as_tensor(np.array(a)).float()
    b_t = torch.as_tensor(np.array(b)).float()
    return float((a_t - b_t).abs().mean())


# ------------------------------------------------------------------------------------- parameter distributions
def _ks(a: list[float], b: list[float]) -> float:
    return float(stats.ks_2samp(a, b).pvalue)


@pytest.mark.parametrize("size", [(640, 480), (200, 900), (64, 64)])
def test_crop_scale_and_ratio_follow_torchvision(size: tuple[int, int]) -> None:
    width, height = size
    recipe = ViewRecipe(32)
    rng = random.Random(0)
    ours = [recipe.crop(width, height, rng) for _ in range(N)]
    torch.manual_seed(0)
    blank = torch.zeros(1, height, width)
    theirs = [T.RandomResizedCrop.get_params(blank, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(N)]
    for pick in (
        lambda c: c[2] * c[3] / (width * height),  # scale
        lambda c: math.log(c[3] / c[2]),  # aspect ratio
        lambda c: (c[0] + c[2] / 2) / height,  # vertical centre
        lambda c: (c[1] + c[3] / 2) / width,  # horizontal centre
    ):
        assert _ks([pick(c) for c in ours], [pick(c) for c in theirs]) > 1e-3
    for top, left, h, w in ours:
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width


def test_crop_fallback_is_torchvisions_centre_crop() -> None:
    # No crop of scale >= 0.99 with ratio in [3/4, 4/3] fits a 1000x100 image: both fall back identically.
    recipe = ViewRecipe(32, crop_scale=(0.99, 1.0))
    expected = T.RandomResizedCrop.get_params(torch.zeros(1, 100, 1000), [0.99, 1.0], [3 / 4, 4 / 3])
    assert recipe.crop(1000, 100, random.Random(0)) == tuple(expected)


def test_jitter_factors_and_order_follow_torchvision() -> None:
    recipe = ViewRecipe(32, color_jitter=(0.4, 0.4, 0.2, 0.1))
    rng = random.Random(1)
    ours = [dict(recipe.jitter(rng)) for _ in range(N)]
    orders = [tuple(op for op, _ in recipe.jitter(rng)) for _ in range(N)]
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    torch.manual_seed(1)
    theirs = [
        T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        for _ in range(N)
    ]
    for op, index in ((BRIGHTNESS, 1), (CONTRAST, 2), (SATURATION, 3), (HUE, 4)):
        assert _ks([d[op] for d in ours], [float(t[index]) for t in theirs]) > 1e-3
    # Every op first equally often (1/4 each), as torch.randperm(4).
    firsts = np.bincount([o[0] for o in orders], minlength=4) / N
    assert np.all(np.abs(firsts - 0.25) < 4 * math.sqrt(0.25 * 0.75 / N))
    # A zero strength leaves the op out, as torchvision does.
    assert all(op != HUE for op, _ in ViewRecipe(32, color_jitter=(0.4, 0.4, 0.2, 0.0)).jitter(rng))


def test_coin_flips_have_the_configured_probabilities() -> None:
    recipe = ViewRecipe(
        32,
        hflip_p=0.5,
        color_jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.1,
        solarize_p=0.2,
        blur_sigma=(0.1, 2.0),
    )
    rng = random.Random(2)
    draws = [recipe.sample(64, 48, rng) for _ in range(N)]
    for share, p in (
        (np.mean([d.flip for d in draws]), 0.5),
        (np.mean([bool(d.jitter) for d in draws]), 0.8),
        (np.mean([d.grayscale for d in draws]), 0.2),
        (np.mean([d.blur_sigma > 0 for d in draws]), 0.1),
        (np.mean([d.solarize for d in draws]), 0.2),
    ):
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / N)
    sigmas = [d.blur_sigma for d in draws if d.blur_sigma > 0]
    assert _ks(sigmas, list(np.random.default_rng(0).uniform(0.1, 2.0, 2000))) > 1e-3


def test_views_are_pure_functions_of_the_seed() -> None:
    views = ImageViews(24)
    assert views.plan(64, 48, 7) == views.plan(64, 48, 7)
    assert views.plan(64, 48, 7) != views.plan(64, 48, 8)


# ---------------------------------------------------------------------------------- CPU executor vs torchvision
def test_crop_and_resize_match_torchvision() -> None:
    img = _photo()
    pil = Image.fromarray(img)
    for top, left, h, w in ((5, 10, 50, 60), (0, 0, 72, 96), (30, 40, 12, 20)):  # shrink, shrink, enlarge
        out = render_view(img, _no_aug(top=top, left=left, height=h, width=w), 32)
        ref = TF.resized_crop(pil, top, left, h, w, [32, 32], T.InterpolationMode.BICUBIC, antialias=True)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert _mad(out, np.asarray(ref)) < 3.0


@pytest.mark.parametrize(
    ("op", "factor", "reference", "tolerance"),
    [
        (BRIGHTNESS, 1.3, TF.adjust_brightness, 0.6),
        (BRIGHTNESS, 0.6, TF.adjust_brightness, 0.6),
        (CONTRAST, 1.4, TF.adjust_contrast, 1.0),
        (CONTRAST, 0.6, TF.adjust_contrast, 1.0),
        (SATURATION, 1.2, TF.adjust_saturation, 1.0),
        (SATURATION, 0.0, TF.adjust_saturation, 1.0),
        (HUE, 0.1, TF.adjust_hue, 2.0),
        (HUE, -0.07, TF.adjust_hue, 2.0),
    ],
)
def test_colour_jitter_ops_match_torchvision(
    op: int, factor: float, reference: object, tolerance: float
) -> None:
    img = _photo(80, 80)
    out = render_view(img, _no_aug(height=80, width=80, jitter=((op, factor),)), 80)
    ref = np.asarray(reference(Image.fromarray(img), factor))  # type: ignore[operator]
    assert _mad(out, ref) < tolerance


def test_grayscale_blur_solarize_flip_match_torchvision() -> None:
    img = _photo(80, 80)
    pil = Image.fromarray(img)
    full = {"height": 80, "width": 80}
    gray = render_view(img, _no_aug(grayscale=True, **full), 80)
    assert _mad(gray, np.asarray(TF.to_grayscale(pil, 3))) < 0.6
    for sigma in (0.5, 1.3, 2.0):
        blurred = render_view(img, _no_aug(blur_sigma=sigma, **full), 80)
        k = 2 * math.ceil(3 * sigma) + 1
        ref = TF.gaussian_blur(torch.from_numpy(img).permute(2, 0, 1), [k, k], [sigma, sigma])
        assert _mad(blurred, ref.permute(1, 2, 0)) < 0.6
    sol = render_view(img, _no_aug(solarize=True, **full), 80)
    assert np.array_equal(sol, np.asarray(TF.solarize(pil, 128)))
    flipped = render_view(img, _no_aug(flip=True, **full), 80)
    assert np.array_equal(flipped, img[:, ::-1])


# --------------------------------------------------------------------------------- device executor vs CPU
def test_batched_executor_matches_the_cpu_executor_op_by_op() -> None:
    img = _photo()
    chw = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    cases = [
        _no_aug(top=5, left=10, height=50, width=60),
        _no_aug(top=30, left=40, height=12, width=20),
        _no_aug(flip=True),
        _no_aug(jitter=((BRIGHTNESS, 1.3),)),
        _no_aug(jitter=((CONTRAST, 0.6),)),
        _no_aug(jitter=((SATURATION, 1.2),)),
        _no_aug(jitter=((HUE, 0.1),)),
        _no_aug(jitter=((HUE, -0.07), (SATURATION, 0.7), (BRIGHTNESS, 1.1), (CONTRAST, 1.3))),
        _no_aug(grayscale=True),
        _no_aug(blur_sigma=1.7),
        _no_aug(blur_sigma=0.3),
        _no_aug(solarize=True),
    ]
    batched = render_views_batched([chw] * len(cases), cases, 48)  # one batch, per-sample parameters
    assert batched.shape == (len(cases), 3, 48, 48) and batched.dtype == torch.uint8
    for params, out in zip(cases, batched, strict=True):
        cpu = render_view(img, params, 48)
        assert _mad(out.permute(1, 2, 0), cpu) < 3.0, params


def test_batched_executor_matches_on_random_full_views() -> None:
    views = ImageViews(40)
    images = [_photo(seed=s) for s in range(6)]
    plans = [views.plan(96, 72, seed) for seed in range(6)]
    for v in (0, 1):
        params = [p[v] for p in plans]
        batched = render_views_batched(
            [torch.from_numpy(i).permute(2, 0, 1) for i in images], params, 40
        )  # (6, 3, 40, 40)
        for img, p, out in zip(images, params, batched, strict=True):
            assert _mad(out.permute(1, 2, 0), render_view(img, p, 40)) < 3.0


# ------------------------------------------------------------------------------------------- reduced decoding
def test_draft_scale_keeps_every_crop_at_least_the_output_size() -> None:
    # Every crop keeps >= 2 x size (the reducing gap) after the reduction.
    assert draft_scale([_no_aug(height=800, width=500), _no_aug(height=900, width=900)], 100) == 2
    assert draft_scale([_no_aug(height=399, width=500)], 100) == 1
    assert draft_scale([_no_aug(height=5000, width=5000)], 100) == 8
    assert draft_scale([_no_aug(height=800, width=800)], 100, reducing_gap=1.0) == 8


def test_reduced_scale_decode_gives_nearly_the_same_views() -> None:
    views = ImageViews(32, crop_scale=(0.5, 1.0))
    big = np.asarray(Image.fromarray(_photo(seed=3)).resize((512, 384), Image.Resampling.BICUBIC))
    big = np.asarray(Image.fromarray(big).filter(ImageFilter.GaussianBlur(1.0)))  # a photo's soft detail
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=95)
    plan = views.plan(512, 384, 11)
    assert draft_scale(plan, 32) >= 2
    array, scaled = views.decode(buf.getvalue(), plan)
    assert array.shape[1] < 512  # decoded at a reduced scale
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    for full_p, small_p in zip(plan, scaled, strict=True):
        assert _mad(render_view(array, small_p, 32), render_view(full, full_p, 32)) < 2.5


def test_from_bytes_equals_decode_then_render() -> None:
    views = ImageViews(24)
    data = draw_image(5, (64, 48))
    a = views.from_bytes(data, (64, 48), 9)
    array, plan = views.decode(data, views.plan(64, 48, 9))
    b = views.render(array, plan)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
