"""Tiny task, batch and config builders shared by the task tests (unit and distributed)."""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from tests.conftest import REPO
from volta.config import VoltaConfig, load_config
from volta.data.batch import View, VoltaBatch
from volta.data.masking import mask_tokens

VOCAB = 300
PAD, CLS, SEP, MASK = 1, 0, 2, 4


def batch_rows(batch: VoltaBatch, idx: slice) -> VoltaBatch:
    """The samples ``idx`` of a batch (both views, ids and keys)."""
    views = tuple(
        View(**{f.name: None if (x := getattr(v, f.name)) is None else x[idx] for f in fields(v)})
        for v in batch.views
    )
    return VoltaBatch(views=views, image_ids=batch.image_ids[idx], keys=batch.keys[idx])  # type: ignore[arg-type]


def batch_double(batch: VoltaBatch) -> VoltaBatch:
    """A copy with both image views in float64 (token fields unchanged)."""
    views = tuple(replace(v, images=v.images.double()) for v in batch.views)
    return replace(batch, views=views)


def tiny_config(*overrides: str) -> VoltaConfig:
    """The debug recipe with dropout off, so that two computations of the same thing are bit-comparable."""
    return load_config(
        REPO / "configs" / "debug.yaml",
        [
            "model.text.config_overrides.hidden_dropout_prob=0.0",
            "model.text.config_overrides.attention_probs_dropout_prob=0.0",
            "model.image.drop_path_rate=0.0",
            *overrides,
        ],
    )


def _caption(g: torch.Generator, b: int, length: int) -> tuple[Tensor, Tensor, Tensor]:
    lengths = torch.randint(4, length + 1, (b,), generator=g)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    pos = torch.arange(length)[None]
    pad = pos >= lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[pad] = PAD
    attn = (~pad).long()
    special = pad | (ids == CLS) | (ids == SEP)
    return ids, attn, special


def with_swaps(batch: VoltaBatch, seed: int = 1) -> VoltaBatch:
    """A copy whose views carry swapped captions (two real tokens of each caption exchanged; the last sample
    marked as having none)."""
    g = torch.Generator().manual_seed(seed)
    views = []
    for v in batch.views:
        ids = v.input_ids.clone()
        for row, real in enumerate(~v.special_tokens_mask):
            i, j = torch.nonzero(real).squeeze(1)[torch.randperm(int(real.sum()), generator=g)[:2]].tolist()
            ids[row, i], ids[row, j] = ids[row, j], ids[row, i]
        valid = torch.ones(ids.shape[0], dtype=torch.bool)
        valid[-1] = False
        views.append(
            replace(
                v,
                swap_input_ids=ids,
                swap_attention_mask=v.attention_mask.clone(),
                swap_special_tokens_mask=v.special_tokens_mask.clone(),
                swap_valid=valid,
            )
        )
    return replace(batch, views=tuple(views))


def make_batch(config: VoltaConfig, b: int = 8, seed: int = 0) -> VoltaBatch:
    """A random two-view batch shaped for ``config``."""
    g = torch.Generator().manual_seed(seed)
    size = config.model.image.img_size
    length = config.model.text.max_length
    ids1, attn1, sp1 = _caption(g, b, length)
    ids2, attn2, sp2 = _caption(g, b, length)
    m1, l1 = mask_tokens(ids1, sp1, mask_token_id=MASK, vocab_size=VOCAB, generator=g)
    m2, l2 = mask_tokens(ids2, sp2, mask_token_id=MASK, vocab_size=VOCAB, generator=g)
    images1 = torch.randn(b, 3, size, size, generator=g)
    images2 = torch.randn(b, 3, size, size, generator=g)
    views = (
        View(images1, ids1, attn1, sp1, m1, l1),
        View(images2, ids2, attn2, sp2, m2, l2),
    )
    return VoltaBatch(
        views=views, image_ids=torch.arange(b, dtype=torch.long) * 7919, keys=[str(i) for i in range(b)]
    )
