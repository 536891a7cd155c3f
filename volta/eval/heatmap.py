"""Word-to-region heat maps from GOT transport plans (the paper's Figure 1), drawn as a PNG grid.

One row per image: the image itself (with its phrase boxes, when given) and, for each content word of its caption
(stop words skipped), the transport mass of the word's tokens over the patches, upsampled bilinearly to the image
and overlaid in colour. Each map is scaled to its own [min, max], so it shows where a word's mass goes, not how
much mass it has.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from volta.config import VoltaConfig
from volta.data.batch import EvalBatch, EvalCollate
from volta.data.views import IMAGENET_MEAN, IMAGENET_STD, eval_image_transform
from volta.eval.features import evaluating, forward_dual
from volta.eval.grounding import got_text_mask, grid_shape, phrase_token_mask, transport_plans
from volta.models.volta_model import VoLTAModel

__all__ = [
    "STOP_WORDS",
    "HeatmapRow",
    "batch_heatmap_rows",
    "content_words",
    "draw_heatmap_grid",
    "render_heatmaps",
    "tensor_to_image",
    "word_maps",
]

log = logging.getLogger(__name__)

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "and",
        "or",
        "to",
        "on",
        "in",
        "at",
        "is",
        "are",
        "was",
        "were",
        "be",
        "there",
        "with",
        "by",
        "for",
        "from",
        "as",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "into",
        "onto",
        "over",
        "under",
        "near",
        "next",
        "one",
        "some",
    ]
)
_WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")
_LABEL_HEIGHT = 22
_ALPHA = 0.5
_COLORMAP = "jet"


def content_words(caption: str) -> list[tuple[str, int, int]]:
    """The caption's words that are not stop words, as (word, start, end) character spans, in order."""
    return [
        (m.group(0), m.start(), m.end())
        for m in _WORD.finditer(caption)
        if m.group(0).lower() not in STOP_WORDS
    ]


def word_maps(
    plan: Tensor, offsets: Tensor, valid: Tensor, words: Sequence[tuple[str, int, int]]
) -> list[tuple[str, Tensor]]:
    """Per word, the transport mass of its tokens over the patch grid, ``(h, w)`` each.

    ``plan (P, T)`` is one sample's transport plan, ``offsets (T, 2)`` the tokens' character spans and
    ``valid (T,)`` the tokens that carry mass; words whose tokens were all truncated away are left out.
    """
    grid = grid_shape(plan.shape[0])
    out = []
    for word, start, end in words:
        tokens = phrase_token_mask(offsets, valid, [(start, end)])  # (T,)
        if bool(tokens.any()):
            out.append((word, plan[:, tokens].sum(dim=-1).reshape(grid)))  # (h, w)
    return out


def tensor_to_image(image: Tensor) -> Image.Image:
    """An ImageNet-normalised ``(3, H, W)`` tensor back to an RGB picture."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)  # (3, H, W)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@dataclass
class HeatmapRow:
    """One row of the grid: the picture (its pixel frame is the boxes' frame), caption, word maps, boxes."""

    image: Image.Image
    caption: str
    maps: list[tuple[str, Tensor]]
    boxes: list[Mapping[str, Any]] = field(default_factory=list)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(size: tuple[int, int], tile: int) -> tuple[int, int]:
    w, h = size
    scale = tile / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _overlay(picture: Image.Image, heat: Tensor) -> Image.Image:
    """Blend a colour-mapped ``(h, w)`` map, upsampled bilinearly to the picture, over the picture."""
    width, height = picture.size
    up = F.interpolate(heat[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[
        0, 0
    ]
    low, high = float(up.min()), float(up.max())
    norm = (up - low) / (high - low) if high > low else torch.zeros_like(up)  # (H, W) in [0, 1]
    colours = colormaps[_COLORMAP](norm.numpy())[..., :3]  # (H, W, 3) in [0, 1]
    base = np.asarray(picture.convert("RGB"), dtype=np.float64) / 255.0
    blended = (1 - _ALPHA) * base + _ALPHA * colours
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def _draw_boxes(picture: Image.Image, boxes: Sequence[Mapping[str, Any]], scale: tuple[float, float]) -> None:
    draw = ImageDraw.Draw(picture)
    for box in boxes:
        bbox = box.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            continue
        x, y, w, h = (float(v) for v in bbox)
        sx, sy = scale
        draw.rectangle([x * sx, y * sy, (x + w) * sx, (y + h) * sy], outline=(255, 255, 255), width=2)
        if box.get("phrase"):
            draw.text((x * sx + 3, y * sy + 2), str(box["phrase"]), fill=(255, 255, 255), font=_font(11))


def draw_heatmap_grid(rows: Sequence[HeatmapRow], *, tile: int = 192, max_words: int = 8) -> Image.Image:
    """Compose the grid: one row per :class:`HeatmapRow`, cells of ``tile x (tile + 22)`` pixels.

    The first cell shows the picture with its boxes, the next ones (at most ``max_words``) the word maps; every
    picture is scaled to fit the ``tile x tile`` square (aspect kept) and labelled above.
    """
    if not rows:
        raise ValueError("no rows to draw")
    cols = 1 + max(min(len(r.maps), max_words) for r in rows)
    cell_h = tile + _LABEL_HEIGHT
    canvas = Image.new("RGB", (cols * tile, len(rows) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for r, row in enumerate(rows):
        size = _fit(row.image.size, tile)
        picture = row.image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        scale = (size[0] / row.image.size[0], size[1] / row.image.size[1])
        top = r * cell_h
        pad = ((tile - size[0]) // 2, (tile - size[1]) // 2)
        framed = picture.copy()
        _draw_boxes(framed, row.boxes, scale)
        canvas.paste(framed, (pad[0], top + _LABEL_HEIGHT + pad[1]))
        draw.text((4, top + 3), row.caption[: tile // 7], fill=(0, 0, 0), font=font)
        for c, (word, heat) in enumerate(row.maps[:max_words], start=1):
            canvas.paste(_overlay(picture, heat), (c * tile + pad[0], top + _LABEL_HEIGHT + pad[1]))
            draw.text((c * tile + 4, top + 3), word, fill=(0, 0, 0), font=font)
    return canvas


def batch_heatmap_rows(
    model: VoLTAModel,
    cfg: VoltaConfig,
    batch: EvalBatch,
    *,
    device: torch.device | str,
    pictures: Sequence[Image.Image] | None = None,
    boxes: Sequence[Sequence[Mapping[str, Any]]] | None = None,
) -> list[HeatmapRow]:
    """Heat-map rows of an evaluation batch: GOT plans of the dual encoder (eval mode, no grad) per content word.

    ``pictures`` are shown instead of the model inputs (default: the inputs de-normalised and stretched back to
    ``batch.orig_sizes``); ``boxes`` default to the samples' JSON boxes, in the pictures' pixel frame.
    """
    text_mask = got_text_mask(
        batch.attention_mask, batch.special_tokens_mask, include_special=cfg.loss.got.include_special_tokens
    )
    with evaluating(model):
        out = forward_dual(model, batch, device)
        plans = transport_plans(
            model, out, text_mask, cfg.eval.grounding_got(cfg.loss.got)
        ).cpu()  # (B, P, T)
    rows = []
    for i in range(batch.batch_size):
        if pictures is not None:
            picture = pictures[i]
        else:
            width, height = (int(v) for v in batch.orig_sizes[i].tolist())
            picture = tensor_to_image(batch.images[i]).resize((width, height), Image.Resampling.BICUBIC)
        sample_boxes = list(boxes[i]) if boxes is not None else list(batch.metas[i].get("boxes") or [])
        words = content_words(batch.captions[i])
        maps = word_maps(plans[i], batch.offsets[i], text_mask[i], words)
        rows.append(HeatmapRow(picture, batch.captions[i], maps, sample_boxes))
    return rows


def render_heatmaps(
    model: VoLTAModel,
    cfg: VoltaConfig,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Image.Image | Tensor],
    captions: Sequence[str],
    out_path: str | Path,
    boxes: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    *,
    image_sizes: Sequence[tuple[int, int] | None] | None = None,
    device: torch.device | str | None = None,
    tile: int = 192,
    max_words: int = 8,
) -> Path:
    """Render word-to-region heat maps of image-caption pairs into the PNG ``out_path``; returns the path.

    ``images`` are PIL pictures (any size; resized whole to the model's input) or ImageNet-normalised tensors
    ``(3, S, S)`` as in an :class:`~volta.data.batch.EvalBatch`. ``boxes`` (optional, per image a list of
    ``{"phrase", "bbox": [x, y, w, h]}``) are in the picture's pixels, or for tensors in the ``image_sizes``
    ``(width, height)`` frame (default or None: the tensor's own size). ``device`` defaults to the model's. The model's
    train/eval mode is left as it was.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(
            f"need as many captions as images (at least one), got {len(images)} and {len(captions)}"
        )
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"need one box list per image, got {len(boxes)} for {len(images)} images")
    device = device if device is not None else next(model.parameters()).device
    transform = eval_image_transform(cfg.model.image.img_size)
    samples, pictures = [], []
    for i, (image, caption) in enumerate(zip(images, captions)):
        if isinstance(image, Image.Image):
            picture = image.convert("RGB")
            tensor = transform(picture)  # (3, S, S)
        else:
            tensor = image.detach().float().cpu()
            if tensor.shape[-2:] != (cfg.model.image.img_size,) * 2:
                tensor = F.interpolate(
                    tensor[None], size=(cfg.model.image.img_size,) * 2, mode="bicubic", align_corners=False
                )[0]
            size = image_sizes[i] if image_sizes is not None else None
            size = size or (int(image.shape[-1]), int(image.shape[-2]))
            picture = tensor_to_image(image).resize((int(size[0]), int(size[1])), Image.Resampling.BICUBIC)
        pictures.append(picture)
        samples.append(
            {
                "key": f"{i:04d}",
                "image": tensor,
                "caption": caption,
                "meta": {"boxes": list(boxes[i])} if boxes is not None else {},
                "orig_size": picture.size,
                "image_id": i,
            }
        )
    batch = EvalCollate(tokenizer, max_length=cfg.model.text.max_length)(samples)
    rows = batch_heatmap_rows(model, cfg, batch, device=device, pictures=pictures, boxes=boxes)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_heatmap_grid(rows, tile=tile, max_words=max_words).save(out, format="PNG")
    log.info("wrote heat maps of %d image(s) to %s", len(rows), out)
    return out
