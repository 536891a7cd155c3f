"""Batches as the task module sees them, and the collate functions that build them from decoded samples.

:class:`VoltaBatch` carries two views (an image view, a tokenised caption view and its MLM corruption), an image id
per sample (a hash of the image bytes, so ITM never uses the same picture as a negative), the sample keys, the
skip counters of the worker that made it and the data position to resume after it. :class:`EvalBatch` carries
un-augmented, un-cropped images with the token character offsets grounding evaluation needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from volta.data.augment import ViewParams, render_views_batched
from volta.data.masking import mask_tokens

__all__ = [
    "EvalBatch",
    "EvalCollate",
    "PendingViews",
    "TrainCollate",
    "View",
    "VoltaBatch",
    "image_id",
    "num_special_ids",
]

_B = TypeVar("_B", bound="_TensorBatch")


def image_id(image_bytes: bytes) -> int:
    """A stable signed 64-bit id of an image: the first 8 bytes of its BLAKE2b digest (same bytes, same id)."""
    return int.from_bytes(hashlib.blake2b(image_bytes, digest_size=8).digest(), "little", signed=True)


def num_special_ids(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many ids from 0 up are special tokens: random MLM replacements are drawn above them."""
    specials = set(tokenizer.all_special_ids)
    n = 0
    while n in specials:
        n += 1
    return n


def _map_value(value: Any, fn: Any) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, _TensorBatch):
        return value._map_tensors(fn)
    if isinstance(value, tuple):
        return tuple(_map_value(v, fn) for v in value)
    return value


class _TensorBatch:
    """Device moves and pinning over every tensor of a dataclass batch (nested views included); others kept."""

    def _map_tensors(self: _B, fn: Any) -> _B:
        changes = {
            f.name: _map_value(getattr(self, f.name), fn)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to(self: _B, device: torch.device | str, non_blocking: bool = False) -> _B:
        """A copy with every tensor moved to ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: _B) -> _B:
        """A copy with every tensor in pinned memory (called by DataLoader(pin_memory=True))."""
        return self._map_tensors(lambda t: t.pin_memory())


@dataclass
class View(_TensorBatch):
    """One augmented view of every sample: an image view and a caption view with its MLM corruption."""

    images: Tensor  # (B, 3, H, W) uint8 (normalised on the device by the task) or float32 ImageNet-normalised
    input_ids: Tensor  # (B, L) int64
    attention_mask: Tensor  # (B, L) int64, 1 = real token
    special_tokens_mask: Tensor  # (B, L) bool, True = special token or padding
    mlm_input_ids: Tensor  # (B, L) input_ids with 15% of the real tokens corrupted (80/10/10)
    mlm_labels: Tensor  # (B, L) original ids at corrupted positions, -100 elsewhere
    # The caption with two words swapped (loss.got.contrastive.swap_negatives; None when off), tokenised like
    # input_ids; swap_valid (B,) is False where the caption has no two different words (no negative).
    swap_input_ids: Tensor | None = None  # (B, L)
    swap_attention_mask: Tensor | None = None  # (B, L)
    swap_special_tokens_mask: Tensor | None = None  # (B, L) bool
    swap_valid: Tensor | None = None  # (B,) bool


@dataclass
class PendingViews(_TensorBatch):
    """Decoded images whose two views are still to be rendered on the training device (``render_on: device``)."""

    images: tuple[Tensor, ...]  # B tensors (H_i, W_i, 3) uint8, as decoded
    plans: tuple[tuple[ViewParams, ViewParams], ...]  # both views' parameters, mapped onto each decoded image
    size: int  # output side S

    def render(self) -> tuple[Tensor, Tensor]:
        """Both views as uint8 (B, 3, S, S) on the images' device."""
        chw = [img.permute(2, 0, 1) for img in self.images]
        return (
            render_views_batched(chw, [p[0] for p in self.plans], self.size),
            render_views_batched(chw, [p[1] for p in self.plans], self.size),
        )


@dataclass
class VoltaBatch(_TensorBatch):
    """One training micro-batch: two views (image, caption, MLM corruption) of every sample.

    With ``pending`` set, the views' images are empty (B, 3, 0, 0) placeholders until :meth:`rendered`.
    """

    views: tuple[View, View]
    image_ids: Tensor  # (B,) int64 hash of the image bytes
    keys: list[str]
    # Samples skipped by reason in this worker since its previous batch (summed over workers by the trainer).
    stats: dict[str, int] = field(default_factory=dict)
    # {"epoch": e, "next_batch": k, "consumed": {role: n}}: this worker role had read n shuffled raw samples
    # (corrupt ones included) by the end of this batch. build_train_loader(epoch=e, start_batch=k, consumed=c)
    # continues after this batch, c being the "consumed" maps of the epoch's batches so far merged (dict.update).
    position: dict[str, Any] = field(default_factory=dict)
    pending: PendingViews | None = None

    @property
    def batch_size(self) -> int:
        """Number of samples B."""
        return int(self.views[0].images.shape[0])

    def rendered(self) -> VoltaBatch:
        """This batch with pending image views rendered where its tensors are (a no-op when none are pending)."""
        if self.pending is None:
            return self
        images = self.pending.render()
        first, second = (dataclasses.replace(v, images=im) for v, im in zip(self.views, images, strict=True))
        return dataclasses.replace(self, views=(first, second), pending=None)


@dataclass
class EvalBatch(_TensorBatch):
    """One evaluation batch: whole images resized to a square (no crop) and the tokenised original captions."""

    images: Tensor  # (B, 3, S, S) float32, ImageNet-normalised
    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    special_tokens_mask: Tensor  # (B, L) bool, True = special token or padding
    offsets: Tensor  # (B, L, 2) int64 character span [start, end) of each token in its caption
    orig_sizes: Tensor  # (B, 2) int64 (width, height) of the stored image
    image_ids: Tensor  # (B,) int64
    captions: list[str]
    metas: list[dict[str, Any]]
    keys: list[str]

    @property
    def batch_size(self) -> int:
        """Number of samples B."""
        return int(self.images.shape[0])


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, offsets: bool = False
) -> dict[str, Tensor]:
    enc = tokenizer(
        list(texts),
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_special_tokens_mask=True,
        return_offsets_mapping=offsets,
        return_tensors="pt",
    )
    out = dict(enc)
    # Padding must count as special so that MLM never selects it and GOT gives it no mass.
    out["special_tokens_mask"] = enc["special_tokens_mask"].bool() | (enc["attention_mask"] == 0)  # (B, L)
    return out


class TrainCollate:
    """Turn a list of decoded two-view samples into a :class:`VoltaBatch` (tokenise both views, MLM-mask them).

    Each sample is a dict with ``key``, ``image_id``, ``image1``/``image2`` (3, H, W) (or, for views rendered
    on the device, ``raw`` (H, W, 3) uint8 and ``plan``), ``caption1``/``caption2`` and ``mlm_seed`` (and, for swap negatives, ``swap1``/``swap2``: a
    caption or None); the MLM corruption of a sample is drawn from its own generator seeded with ``mlm_seed``, so
    it does not depend on which other samples share the batch.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int,
        mlm_probability: float,
        image_size: int = 0,
    ) -> None:
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token, which MLM needs")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mlm_probability = mlm_probability
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.vocab_size = len(tokenizer)
        self.num_special_ids = num_special_ids(tokenizer)
        self.image_size = image_size

    def _mask(self, ids: Tensor, special: Tensor, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        rows = [
            mask_tokens(
                ids[i : i + 1],
                special[i : i + 1],
                mask_token_id=self.mask_token_id,
                vocab_size=self.vocab_size,
                probability=self.mlm_probability,
                generator=torch.Generator().manual_seed(seed),
                num_special_ids=self.num_special_ids,
            )
            for i, seed in enumerate(seeds)
        ]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])  # (B, L) each

    def __call__(
        self, samples: Sequence[dict[str, Any]], stats: dict[str, int], position: dict[str, Any]
    ) -> VoltaBatch:
        """Build the batch; ``stats`` and ``position`` are attached unchanged."""
        seeds = [int(s["mlm_seed"]) for s in samples]
        # The two views get different streams from one per-sample seed (second view: seed + 1, mod 2**63).
        view_seeds = (seeds, [(s + 1) % (1 << 63) for s in seeds])
        pending = None
        if samples and "raw" in samples[0]:
            pending = PendingViews(
                images=tuple(s["raw"] for s in samples),
                plans=tuple(s["plan"] for s in samples),
                size=self.image_size,
            )
        views = []
        for v, mlm_seeds in zip((1, 2), view_seeds, strict=True):
            tok = _tokenize(self.tokenizer, [s[f"caption{v}"] for s in samples], self.max_length)
            mlm_ids, mlm_labels = self._mask(tok["input_ids"], tok["special_tokens_mask"], mlm_seeds)
            swap: dict[str, Tensor] = {}
            if samples and f"swap{v}" in samples[0]:
                swapped = [s[f"swap{v}"] for s in samples]  # None: no two different words
                stok = _tokenize(
                    self.tokenizer,
                    [c if c is not None else s[f"caption{v}"] for c, s in zip(swapped, samples, strict=True)],
                    self.max_length,
                )
                swap = {
                    "swap_input_ids": stok["input_ids"],
                    "swap_attention_mask": stok["attention_mask"],
                    "swap_special_tokens_mask": stok["special_tokens_mask"],
                    "swap_valid": torch.tensor([c is not None for c in swapped], dtype=torch.bool),
                }
            views.append(
                View(
                    images=(
                        torch.stack([s[f"image{v}"] for s in samples])  # (B, 3, H, W)
                        if pending is None
                        else torch.empty((len(samples), 3, 0, 0), dtype=torch.uint8)
                    ),
                    input_ids=tok["input_ids"],
                    attention_mask=tok["attention_mask"],
                    special_tokens_mask=tok["special_tokens_mask"],
                    mlm_input_ids=mlm_ids,
                    mlm_labels=mlm_labels,
                    **swap,
                )
            )
        return VoltaBatch(
            views=(views[0], views[1]),
            image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),  # (B,)
            keys=[s["key"] for s in samples],
            stats=dict(stats),
            position=dict(position),
            pending=pending,
        )


class EvalCollate:
    """Turn a list of decoded evaluation samples into an :class:`EvalBatch` (original captions, with offsets)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[dict[str, Any]]) -> EvalBatch:
        """Build the batch from dicts with ``key``, ``image``, ``caption``, ``meta``, ``orig_size``, ``image_id``."""
        tok = _tokenize(self.tokenizer, [s["caption"] for s in samples], self.max_length, offsets=True)
        return EvalBatch(
            images=torch.stack([s["image"] for s in samples]),  # (B, 3, S, S)
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            special_tokens_mask=tok["special_tokens_mask"],
            offsets=tok["offset_mapping"].to(torch.int64),  # (B, L, 2)
            orig_sizes=torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),  # (B, 2)
            image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),  # (B,)
            captions=[s["caption"] for s in samples],
            metas=[s["meta"] for s in samples],
            keys=[s["key"] for s in samples],
        )
