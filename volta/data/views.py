"""The two augmented views of every sample (docs/method.md section 3): image views and EDA-style caption views.

Image views compose torchvision v2 transforms: RandomResizedCrop (bicubic) to the model's input size, horizontal
flip, colour jitter with probability, grayscale with probability, then per view a Gaussian blur (p 1.0 / 0.1) and
solarisation (p 0 / 0.2), and ImageNet normalisation. Caption views apply one random EDA operation (random
insertion, random swap or random deletion at rate 0.1) with probability ``text_aug_p``; synonym replacement is
left out because WordNet is not available offline. Both are deterministic given a seed, so the pipeline can
reproduce a batch exactly.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GaussianBlur",
    "ImageViews",
    "TextViews",
    "eda_augment",
    "eval_image_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """Gaussian blur of a uint8 (C, H, W) tensor with sigma drawn uniformly from ``sigma`` (torch RNG).

    Runs PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` (extended box blurs, constant cost per pixel, as in
    the BYOL/Barlow Twins recipes): at 224 px it is several times cheaper than torchvision's full 2-D kernel of
    side 23, which dominated the cost of a view.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Tensor) -> Tensor:
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())  # (H, W, C) uint8
        blurred = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=sigma)))
        return torch.from_numpy(blurred.copy()).permute(2, 0, 1).contiguous()  # (C, H, W)


class ImageViews:
    """Two independently augmented views of an image, as normalised float tensors of shape (3, S, S).

    The transforms of the two views differ only in their blur and solarize probabilities (``blur_p[i]``,
    ``solarize_p[i]``). Calling with a seed makes the result a pure function of (image, seed) without touching
    the caller's global torch RNG state.
    """

    def __init__(
        self,
        image_size: int,
        *,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip_p: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float] = (1.0, 0.1),
        solarize_p: tuple[float, float] = (0.0, 0.2),
    ) -> None:
        self.image_size = image_size
        self.transforms = [
            v2.Compose(
                [
                    # uint8 tensors first: torchvision's tensor kernels are faster than PIL for the colour ops.
                    v2.PILToTensor(),
                    v2.RandomResizedCrop(
                        image_size, scale=crop_scale, interpolation=InterpolationMode.BICUBIC, antialias=True
                    ),
                    v2.RandomHorizontalFlip(hflip_p),
                    v2.RandomApply([v2.ColorJitter(*color_jitter)], p=color_jitter_p),
                    v2.RandomGrayscale(grayscale_p),
                    v2.RandomApply([GaussianBlur(sigma=(0.1, 2.0))], p=blur_p[i]),
                    v2.RandomSolarize(threshold=128, p=solarize_p[i]),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ]
            )
            for i in (0, 1)
        ]

    def __call__(self, image: Image.Image, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """Return (view1, view2), each (3, S, S) float32; deterministic when ``seed`` is given."""
        if seed is None:
            return self.transforms[0](image), self.transforms[1](image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transforms[0](image), self.transforms[1](image)  # (3, S, S) each


def eval_image_transform(image_size: int) -> v2.Compose:
    """Resize the whole image to ``image_size x image_size`` (no crop, so boxes map linearly) and normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    # EDA inserts a synonym of a random word; without WordNet we insert a copy of a random word of the caption.
    out = list(words)
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), rng.choice(words))
    return out


def _random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def _random_deletion(words: list[str], rate: float, rng: random.Random) -> list[str]:
    if len(words) < 2:
        return list(words)
    kept = [w for w in words if rng.random() >= rate]
    # Never return an empty caption: keep one random word when every word was drawn for deletion.
    return kept or [rng.choice(words)]


def eda_augment(caption: str, rng: random.Random, *, rate: float = 0.1) -> str:
    """Apply one EDA operation chosen at random (insertion, swap or deletion) at ``rate``; never returns ''.

    Insertion and swap act on ``max(1, round(rate x words))`` words; deletion drops each word with probability
    ``rate`` but keeps at least one. A caption without words is returned unchanged.
    """
    words = caption.split()
    if not words:
        return caption
    n = max(1, round(rate * len(words)))
    op = rng.randrange(3)
    if op == 0:
        out = _random_insertion(words, n, rng)
    elif op == 1:
        out = _random_swap(words, n, rng)
    else:
        out = _random_deletion(words, rate, rng)
    return " ".join(out)


class TextViews:
    """Two caption views: each is ``eda_augment(caption)`` with probability ``aug_p``, else the caption itself."""

    def __init__(self, aug_p: float = 0.1, *, rate: float = 0.1) -> None:
        self.aug_p = aug_p
        self.rate = rate

    def view(self, caption: str, rng: random.Random) -> str:
        """One caption view drawn with ``rng``."""
        if rng.random() < self.aug_p:
            return eda_augment(caption, rng, rate=self.rate)
        return caption

    def __call__(self, caption: str, rng: random.Random) -> tuple[str, str]:
        """Return (view1, view2) of ``caption``, deterministic under ``rng``'s state."""
        return self.view(caption, rng), self.view(caption, rng)
