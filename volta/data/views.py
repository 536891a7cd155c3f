"""The two augmented views of every sample (docs/method.md section 3): image views and EDA-style caption views.

Image views (parameters and pixels in :mod:`volta.data.augment`): RandomResizedCrop to the model's input size,
horizontal flip, colour jitter with probability, grayscale with probability, then per view a Gaussian blur
(p 1.0 / 0.1) and solarisation (p 0 / 0.2); they stay uint8 and are ImageNet-normalised on the training device
(:func:`normalize_images`). Caption views apply one random EDA operation (random
insertion, random swap or random deletion of 10-20% of the words) to every view (``text_aug_p`` 1.0); synonym
replacement is left out because WordNet is not available offline. Both are deterministic given a seed, so the pipeline can
reproduce a batch exactly.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from volta.data.augment import ViewParams, ViewRecipe, draft_scale, render_view

ViewPair = tuple[ViewParams, ViewParams]

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageViews",
    "TextViews",
    "eda_augment",
    "eval_image_transform",
    "normalize_images",
    "swap_words",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> float32 ImageNet-normalised, on the images' device (the last step of
    the training views: workers ship uint8, a quarter of the bytes, and the device does this)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


class ImageViews:
    """Two independently augmented views of an image, as uint8 tensors of shape (3, S, S).

    The two views' recipes differ only in their blur and solarize probabilities (``blur_p[i]``,
    ``solarize_p[i]``). Parameters come from :class:`~volta.data.augment.ViewRecipe` with a ``random.Random``
    seeded by the sample's seed, so a view is a pure function of (image, seed). :meth:`from_bytes` decodes JPEGs
    at a reduced scale when both crops are at least twice the output size (libjpeg DCT scaling), which the
    full-resolution decode would have thrown away by downsampling anyway.
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
        self.recipes = tuple(
            ViewRecipe(
                image_size,
                crop_scale=crop_scale,
                hflip_p=hflip_p,
                color_jitter=color_jitter,
                color_jitter_p=color_jitter_p,
                grayscale_p=grayscale_p,
                blur_p=blur_p[i],
                solarize_p=solarize_p[i],
            )
            for i in (0, 1)
        )

    def plan(self, width: int, height: int, seed: int) -> tuple[ViewParams, ViewParams]:
        """Both views' parameters for a ``width x height`` image, drawn from ``random.Random(seed)``."""
        rng = random.Random(seed)
        return self.recipes[0].sample(width, height, rng), self.recipes[1].sample(width, height, rng)

    def decode(self, image_bytes: bytes, plan: tuple[ViewParams, ViewParams]) -> tuple[np.ndarray, ViewPair]:
        """Decode to RGB uint8 (H, W, 3), at the reduced JPEG scale the plan allows; returns the array and the
        plan mapped onto it. Raises on a corrupt body."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(image_bytes))
            width, height = img.size
            scale = draft_scale(plan, self.image_size)
            if scale > 1 and img.format == "JPEG":
                img.draft("RGB", (-(-width // scale), -(-height // scale)))
            img.load()
        array = np.asarray(img.convert("RGB"))  # (h, w, 3) uint8
        fx, fy = width / array.shape[1], height / array.shape[0]
        return array, (plan[0].scaled(fx, fy), plan[1].scaled(fx, fy))

    def render(self, image: np.ndarray, plan: tuple[ViewParams, ViewParams]) -> tuple[Tensor, Tensor]:
        """The two views of an RGB uint8 (H, W, 3) array as uint8 (3, S, S) tensors (OpenCV on this CPU)."""
        views = (render_view(image, p, self.image_size) for p in plan)
        return tuple(torch.from_numpy(v).permute(2, 0, 1).contiguous() for v in views)  # type: ignore[return-value]

    def from_bytes(self, image_bytes: bytes, size: tuple[int, int], seed: int) -> tuple[Tensor, Tensor]:
        """Decode and render both views of an encoded image whose (width, height) is ``size``."""
        array, plan = self.decode(image_bytes, self.plan(*size, seed))
        return self.render(array, plan)

    def __call__(self, image: Image.Image, seed: int) -> tuple[Tensor, Tensor]:
        """Return (view1, view2) of a decoded image, each uint8 (3, S, S); a pure function of (image, seed)."""
        array = np.asarray(image.convert("RGB"))
        return self.render(array, self.plan(image.width, image.height, seed))


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


def _random_deletion(words: list[str], n: int, rng: random.Random) -> list[str]:
    if len(words) < 2:
        return list(words)
    # Delete n distinct words, never all of them: a caption view keeps at least one word.
    drop = set(rng.sample(range(len(words)), min(n, len(words) - 1)))
    return [w for i, w in enumerate(words) if i not in drop]


def swap_words(caption: str, rng: random.Random) -> str | None:
    """``caption`` with two of its words swapped: a negative caption with the same words (whitespace words, two
    positions drawn uniformly among the pairs whose words differ). None when no two words differ."""
    words = caption.split()
    pairs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words)) if words[i] != words[j]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def eda_augment(caption: str, rng: random.Random, *, rate: float = 0.1) -> str:
    """Apply one EDA operation chosen at random (insertion, swap or deletion) to ``max(1, round(rate x words))``
    words; never returns ''. A caption without words is returned unchanged."""
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
        out = _random_deletion(words, n, rng)
    return " ".join(out)


class TextViews:
    """Two caption views (docs/method.md section 3): each is, with probability ``aug_p`` (1.0 in the method:
    every view), one EDA operation touching a share of the words drawn uniformly from ``rate``."""

    def __init__(self, aug_p: float = 1.0, *, rate: tuple[float, float] = (0.1, 0.2)) -> None:
        self.aug_p = aug_p
        self.rate = rate

    def view(self, caption: str, rng: random.Random) -> str:
        """One caption view drawn with ``rng``."""
        if rng.random() < self.aug_p:
            return eda_augment(caption, rng, rate=rng.uniform(*self.rate))
        return caption

    def __call__(self, caption: str, rng: random.Random) -> tuple[str, str]:
        """Return (view1, view2) of ``caption``, deterministic under ``rng``'s state."""
        return self.view(caption, rng), self.view(caption, rng)
