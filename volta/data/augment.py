"""Image views: one parameter sampler, two executors that apply the same parameters.

The sampler (:class:`ViewRecipe`) draws a view's parameters exactly as torchvision's transforms do (the
``RandomResizedCrop.get_params`` algorithm with its 10 tries and centre-crop fallback, ``ColorJitter``'s factor
ranges and random order, and the RandomApply / RandomGrayscale / RandomHorizontalFlip / RandomSolarize coin
flips), from a ``random.Random`` that the caller seeds, so a view is a pure function of (image, seed).

The executors turn parameters into pixels:

- :func:`render_view` (CPU, DataLoader workers): OpenCV on uint8 ``(H, W, 3)`` arrays. Every step stays uint8 and
  the result is uint8; normalisation happens on the training device (:func:`normalize_images`), so workers ship a
  quarter of the bytes a float32 view needs.
- :func:`render_views_batched` (any torch device, meant for the GPU): the same operations on a batch of uint8
  tensors with per-sample parameters, for hosts whose CPUs cannot keep up. The workers then only decode.

Both executors implement the same operations with the same conventions (uint8 hue wheel of 256 steps, ITU-R 601
luma, Gaussian kernel of radius 3 sigma with reflected borders, threshold-128 solarisation); they differ only by
interpolation rounding, which the tests bound. The parameter distributions are identical by construction.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BRIGHTNESS",
    "CONTRAST",
    "HUE",
    "SATURATION",
    "ViewParams",
    "ViewRecipe",
    "draft_scale",
    "render_view",
    "render_views_batched",
]

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L" mode and OpenCV's RGB2GRAY


@dataclass(frozen=True)
class ViewParams:
    """The random choices of one view, in source-image pixels."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: tuple[tuple[int, float], ...]  # (op, factor) in application order; () = colour jitter not applied
    grayscale: bool
    blur_sigma: float  # 0.0 = no blur
    solarize: bool

    def scaled(self, fx: float, fy: float) -> ViewParams:
        """The same view on the image downscaled by ``fx`` x ``fy`` (a JPEG draft decode): the crop box shrinks."""
        if fx == 1.0 and fy == 1.0:
            return self
        top, left = int(self.top / fy), int(self.left / fx)
        bottom = max(top + 1, round((self.top + self.height) / fy))
        right = max(left + 1, round((self.left + self.width) / fx))
        return ViewParams(
            top, left, bottom - top, right - left, self.flip, self.jitter, self.grayscale, self.blur_sigma,
            self.solarize,
        )  # fmt: skip


@dataclass(frozen=True)
class ViewRecipe:
    """The augmentation settings of one view (the defaults are the BYOL / Barlow Twins recipe's first view)."""

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (
        0.4,
        0.4,
        0.2,
        0.1,
    )  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def crop(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop: torchvision's ``RandomResizedCrop.get_params``."""
        area = width * height
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
        ratio = width / height
        if ratio < self.crop_ratio[0]:
            w, h = width, round(width / self.crop_ratio[0])
        elif ratio > self.crop_ratio[1]:
            h, w = height, round(height * self.crop_ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def jitter(self, rng: random.Random) -> tuple[tuple[int, float], ...]:
        """ColorJitter's factors (brightness/contrast/saturation in [1-x, 1+x] clipped at 0, hue in [-x, x]) in a
        random order; ops whose strength is 0 are left out, as torchvision does."""
        b, c, s, h = self.color_jitter
        factors = {
            BRIGHTNESS: rng.uniform(max(0.0, 1 - b), 1 + b) if b > 0 else None,
            CONTRAST: rng.uniform(max(0.0, 1 - c), 1 + c) if c > 0 else None,
            SATURATION: rng.uniform(max(0.0, 1 - s), 1 + s) if s > 0 else None,
            HUE: rng.uniform(-h, h) if h > 0 else None,
        }
        order = [BRIGHTNESS, CONTRAST, SATURATION, HUE]
        rng.shuffle(order)
        return tuple((op, f) for op in order if (f := factors[op]) is not None)

    def sample(self, width: int, height: int, rng: random.Random) -> ViewParams:
        """Draw one view's parameters for a ``width x height`` source image."""
        top, left, h, w = self.crop(width, height, rng)
        flip = rng.random() < self.hflip_p
        jitter = self.jitter(rng) if rng.random() < self.color_jitter_p else ()
        grayscale = rng.random() < self.grayscale_p
        blur = rng.uniform(*self.blur_sigma) if rng.random() < self.blur_p else 0.0
        solarize = rng.random() < self.solarize_p
        return ViewParams(top, left, h, w, flip, jitter, grayscale, blur, solarize)


def draft_scale(
    params: Sequence[ViewParams], size: int, *, reducing_gap: float = 2.0, max_scale: int = 8
) -> int:
    """The largest power-of-two JPEG decode reduction (1, 2, 4, 8) that keeps every crop at least
    ``reducing_gap x size`` pixels on both sides. libjpeg's DCT scaling is a box filter; keeping a gap of 2 before
    the final resize (Pillow's own ``reducing_gap`` advice) makes the result nearly that of a full decode."""
    smallest = min(min(p.height, p.width) for p in params)
    scale = 1
    while scale * 2 <= max_scale and smallest / (scale * 2) >= reducing_gap * size:
        scale *= 2
    return scale


# ------------------------------------------------------------------------------------------ CPU: OpenCV, uint8
_SOLARIZE_LUT = np.array([255 - v if v >= 128 else v for v in range(256)], dtype=np.uint8)


def _cv2():  # type: ignore[no-untyped-def]
    import cv2

    cv2.setNumThreads(1)  # one DataLoader worker per core: OpenCV's own thread pool would oversubscribe
    return cv2


def _gray(cv2, image: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # (H, W) uint8


def _jitter_op(cv2, image: np.ndarray, op: int, factor: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    if op == BRIGHTNESS:  # blend with black
        return cv2.convertScaleAbs(image, alpha=factor)
    if op == CONTRAST:  # blend with the mean grey level
        mean = float(_gray(cv2, image).mean())
        return cv2.addWeighted(image, factor, image, 0.0, (1.0 - factor) * mean)
    if op == SATURATION:  # blend with the grey image
        gray = cv2.cvtColor(_gray(cv2, image), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(image, factor, gray, 1.0 - factor, 0.0)
    # HUE: rotate the hue wheel (256 steps, as PIL's HSV mode) by factor x 255 steps.
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
    shift = np.uint8(round(factor * 255) % 256)
    hsv[..., 0] += shift  # uint8 arithmetic wraps around the wheel
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def render_view(image: np.ndarray, params: ViewParams, size: int) -> np.ndarray:
    """Apply ``params`` to an RGB uint8 ``(H, W, 3)`` array; returns a uint8 ``(size, size, 3)`` array.

    Crop then resize (area averaging when shrinking on both axes, bicubic otherwise), flip, colour jitter in the
    sampled order, grayscale, Gaussian blur, solarisation.
    """
    cv2 = _cv2()
    p = params
    crop = image[p.top : p.top + p.height, p.left : p.left + p.width]
    shrink = p.height >= size and p.width >= size
    out = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    if p.flip:
        out = cv2.flip(out, 1)
    for op, factor in p.jitter:
        out = _jitter_op(cv2, out, op, factor)
    if p.grayscale:
        out = cv2.cvtColor(_gray(cv2, out), cv2.COLOR_GRAY2RGB)
    if p.blur_sigma > 0:
        radius = math.ceil(3 * p.blur_sigma)
        out = cv2.GaussianBlur(
            out, (2 * radius + 1, 2 * radius + 1), p.blur_sigma, borderType=cv2.BORDER_REFLECT_101
        )
    if p.solarize:
        out = cv2.LUT(out, _SOLARIZE_LUT)
    return np.ascontiguousarray(out)


# ------------------------------------------------------------------------- any device: batched torch, uint8 in/out
def _luma(x: Tensor) -> Tensor:
    """(B, 3, H, W) float -> (B, 1, H, W) grey level."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _rotate_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of (B, 3, H, W) float RGB in [0, 255] by ``shift`` (B,) turns (HSV model, V = max)."""
    maxc, _ = x.max(1)  # (B, H, W)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)  # (B, H, W) turns
    s = torch.where(
        maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    choices = (
        torch.stack((v, q, p, p, t, v), 1),
        torch.stack((t, v, v, q, p, p), 1),
        torch.stack((p, p, t, v, v, q), 1),
    )
    idx = i.unsqueeze(1)
    return torch.stack([c.gather(1, idx).squeeze(1) for c in choices], 1)  # (B, 3, H, W)


def _gaussian_kernels(sigmas: Tensor, radius: int) -> Tensor:
    """(B,) sigmas -> (B, 2 radius + 1) normalised 1-D kernels; sigma 0 gives the identity kernel."""
    t = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float32)  # (K,)
    safe = torch.where(sigmas > 0, sigmas, torch.ones_like(sigmas)).unsqueeze(1)  # (B, 1)
    k = torch.exp(-0.5 * (t / safe) ** 2)
    # Each sample's kernel is cut at its own radius ceil(3 sigma), as the CPU path's OpenCV kernel is.
    k = torch.where(t.abs() <= torch.ceil(3 * safe), k, torch.zeros_like(k))
    k = torch.where(sigmas.unsqueeze(1) > 0, k, (t == 0).to(k.dtype).expand_as(k))
    return k / k.sum(1, keepdim=True)  # (B, K)


def _blur(x: Tensor, sigmas: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, 3, H, W) float with one sigma per sample (reflected borders)."""
    radius = max(1, math.ceil(3 * max_sigma))
    b, c, h, w = x.shape
    k = _gaussian_kernels(sigmas, radius).repeat_interleave(c, 0)  # (B*3, K)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def _crop_resize(image: Tensor, p: ViewParams, size: int) -> Tensor:
    """(3, H, W) uint8 -> (3, size, size) float in [0, 255]."""
    crop = image[:, p.top : p.top + p.height, p.left : p.left + p.width].unsqueeze(0).float()
    # Antialiased bicubic (torchvision's RandomResizedCrop); OpenCV's area filter on the CPU path is within a
    # grey level or two of it when shrinking, and both are plain bicubic when enlarging.
    out = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out[0].clamp_(0, 255).round_()


def render_views_batched(
    images: Sequence[Tensor], params: Sequence[ViewParams], size: int, *, max_blur_sigma: float = 2.0
) -> Tensor:
    """Apply per-sample ``params`` to uint8 ``(3, H_i, W_i)`` tensors on one device; returns (B, 3, size, size)
    uint8 on that device. The same operations as :func:`render_view`, batched: crops one by one (their sizes
    differ), everything after them as whole-batch tensor ops with per-sample factors and masks."""
    if len(images) != len(params):
        raise ValueError(f"{len(images)} images but {len(params)} view parameters")
    device = images[0].device
    x = torch.stack([_crop_resize(img, p, size) for img, p in zip(images, params, strict=True)])  # (B,3,S,S)

    def mask(values: Sequence[bool]) -> Tensor:
        return torch.tensor(values, device=device, dtype=torch.bool).view(-1, 1, 1, 1)

    x = torch.where(mask([p.flip for p in params]), x.flip(-1), x)
    steps = max((len(p.jitter) for p in params), default=0)
    for k in range(steps):
        for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
            chosen = [len(p.jitter) > k and p.jitter[k][0] == op for p in params]
            if not any(chosen):
                continue
            f = torch.tensor(
                [p.jitter[k][1] if c else (0.0 if op == HUE else 1.0) for p, c in zip(params, chosen)],
                device=device,
                dtype=torch.float32,
            ).view(-1, 1, 1, 1)
            if op == BRIGHTNESS:
                y = x * f
            elif op == CONTRAST:
                y = f * x + (1 - f) * _luma(x).mean((2, 3), keepdim=True)
            elif op == SATURATION:
                y = f * x + (1 - f) * _luma(x)
            else:
                # The uint8 hue wheel: shifts are whole steps of 1/256 turn, as on the CPU path.
                steps256 = torch.round(f.view(-1) * 255) % 256
                y = _rotate_hue(x, steps256 / 256.0)
            x = torch.where(mask(chosen), y.clamp(0, 255).round(), x)
    gray = mask([p.grayscale for p in params])
    x = torch.where(gray, _luma(x).round().expand_as(x), x)
    sigmas = torch.tensor([p.blur_sigma for p in params], device=device, dtype=torch.float32)
    if bool((sigmas > 0).any()):
        x = _blur(x, sigmas, max(max_blur_sigma, float(sigmas.max()))).clamp(0, 255).round()
    x = torch.where(mask([p.solarize for p in params]) & (x >= 128), 255 - x, x)
    return x.to(torch.uint8)
