"""Image and caption views: shapes, normalisation, per-view settings, determinism, non-empty captions.

The augmentation parameters and pixels themselves are checked in test_augment.py."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from tests.fixtures_data import draw_image
from volta.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageViews,
    TextViews,
    eda_augment,
    eval_image_transform,
    normalize_images,
    swap_words,
)

_OFF = {
    "hflip_p": 0.0,
    "color_jitter_p": 0.0,
    "grayscale_p": 0.0,
    "blur_p": (0.0, 0.0),
    "solarize_p": (0.0, 0.0),
}


def _picture(size: tuple[int, int] = (64, 48)) -> Image.Image:
    import io

    return Image.open(io.BytesIO(draw_image(3, size))).convert("RGB")


def test_views_have_the_model_size_and_differ() -> None:
    views = ImageViews(32)
    v1, v2 = views(_picture(), seed=1)
    assert v1.shape == v2.shape == (3, 32, 32)
    assert v1.dtype == torch.uint8  # normalised on the training device (normalize_images)
    assert not torch.equal(v1, v2)


def test_normalisation_uses_imagenet_statistics() -> None:
    # A solid image of the ImageNet mean colour normalises to ~0; white to (1 - mean) / std.
    views = ImageViews(32, crop_scale=(1.0, 1.0), **_OFF)  # type: ignore[arg-type]
    mean_rgb = tuple(round(m * 255) for m in IMAGENET_MEAN)
    v1, _ = views(Image.new("RGB", (40, 40), mean_rgb), seed=0)
    assert normalize_images(v1).abs().max() < 0.02
    w1, _ = views(Image.new("RGB", (40, 40), (255, 255, 255)), seed=0)
    w1 = normalize_images(w1)
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(w1.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)


def test_views_are_deterministic_under_a_seed_and_leave_the_global_rng_alone() -> None:
    views = ImageViews(32)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = views(_picture(), seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = views(_picture(), seed=5)
    c = views(_picture(), seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_solarize_and_blur_are_set_per_view() -> None:
    # Only view 2 solarises: its bright pixels come out inverted (dark), view 1's stay bright.
    settings = {**_OFF, "solarize_p": (0.0, 1.0)}
    views = ImageViews(32, crop_scale=(1.0, 1.0), **settings)  # type: ignore[arg-type]
    v1, v2 = views(Image.new("RGB", (40, 40), (250, 250, 250)), seed=0)
    assert v1.float().mean() > 240 and v2.float().mean() < 10
    # Only view 1 blurs: a sharp edge is smoothed in view 1 and kept in view 2.
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 40))
    views = ImageViews(32, crop_scale=(1.0, 1.0), **{**_OFF, "blur_p": (1.0, 0.0)})  # type: ignore[arg-type]
    b1, b2 = views(img, seed=0)
    assert b1[0, 16].float().diff().abs().max() < b2[0, 16].float().diff().abs().max()


def test_eval_transform_resizes_whole_image_to_a_square() -> None:
    out = eval_image_transform(32)(_picture((80, 40)))
    assert out.shape == (3, 32, 32)


@pytest.mark.parametrize("caption", ["cat", "a cat", "a red square on a plain background number 4"])
def test_eda_never_returns_an_empty_caption(caption: str) -> None:
    for seed in range(200):
        out = eda_augment(caption, random.Random(seed), rate=0.1)
        assert out.strip()
        assert set(out.split()) <= set(caption.split())  # insertion copies words of the caption


def test_eda_is_deterministic_and_uses_all_three_operations() -> None:
    caption = "one two three four five six seven eight nine ten"
    outs = [eda_augment(caption, random.Random(s)) for s in range(60)]
    assert outs == [eda_augment(caption, random.Random(s)) for s in range(60)]
    lengths = {len(o.split()) for o in outs}
    assert any(n > 10 for n in lengths)  # insertion
    assert any(n < 10 for n in lengths)  # deletion
    assert any(len(o.split()) == 10 and o != caption for o in outs)  # swap


def test_text_views_apply_augmentation_with_probability() -> None:
    caption = "one two three four five six seven eight nine ten"
    assert TextViews(0.0)(caption, random.Random(0)) == (caption, caption)
    rate = sum(TextViews(0.3).view(caption, random.Random(s)) != caption for s in range(2000)) / 2000
    assert 0.25 < rate < 0.35


# Captions of COCO-like lengths (8-14 words), with a repeated word so that a swap can be a no-op.
_CAPTIONS = [
    "a man riding a wave on top of a surfboard",
    "two dogs playing with a frisbee in the park",
    "a red bus parked next to a tall building on a street",
    "a plate of food with broccoli and rice on a wooden table",
    "the cat is sleeping on the couch next to a remote",
]


def test_every_caption_view_is_changed_as_the_method_does() -> None:
    # The method applies one EDA op to every view: nearly every view differs from the caption, and the two
    # views of a pair are rarely equal (before: p 0.1 per view, so ~81% of pairs were identical).
    views = TextViews()
    pairs = [views(c, random.Random(s)) for s in range(400) for c in _CAPTIONS]
    changed = sum(v1 != c for (v1, _), c in zip(pairs, _CAPTIONS * 400, strict=False)) / len(pairs)
    identical = sum(v1 == v2 for v1, v2 in pairs) / len(pairs)
    assert changed > 0.95
    assert identical < 0.1


@pytest.mark.parametrize("rate", [0.1, 0.2])
def test_each_op_touches_the_share_of_words_it_is_given(rate: float) -> None:
    words = [f"w{i}" for i in range(20)]  # distinct words: every touched word is visible
    caption = " ".join(words)
    n = round(rate * 20)
    for seed in range(300):
        out = eda_augment(caption, random.Random(seed), rate=rate).split()
        if len(out) > 20:  # insertion
            assert len(out) == 20 + n
        elif len(out) < 20:  # deletion
            assert len(out) == 20 - n and out == [w for w in words if w in out]
        else:  # swap: n swaps move at most 2n words
            assert sorted(out) == sorted(words) and 0 < sum(a != b for a, b in zip(out, words)) <= 2 * n


@pytest.mark.parametrize(
    "caption", ["a red triangle left of a blue circle", "two words", "x x y", "w1 w2 w3 w4 w5"]
)
def test_swap_words_exchanges_two_different_words(caption: str) -> None:
    words = caption.split()
    seen = set()
    for seed in range(40):
        out = swap_words(caption, random.Random(seed))
        assert out is not None and out == swap_words(caption, random.Random(seed))  # deterministic
        new = out.split()
        assert sorted(new) == sorted(words) and out != caption  # the same words, another caption
        moved = [k for k, (u, v) in enumerate(zip(words, new, strict=True)) if u != v]
        assert len(moved) == 2 and new[moved[0]] == words[moved[1]]
        seen.add(tuple(moved))
    pairs = {(i, j) for i in range(len(words)) for j in range(i + 1, len(words)) if words[i] != words[j]}
    assert seen == pairs or len(seen) >= min(len(pairs), 8)  # any pair of different words can be drawn


@pytest.mark.parametrize("caption", ["", "one", "same same same"])
def test_swap_words_without_two_different_words_is_none(caption: str) -> None:
    assert swap_words(caption, random.Random(0)) is None
