"""Tiny task, batch and config builders shared by the task tests (unit and distributed)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from tests.conftest import REPO
from volta.config import VoltaConfig, load_config
from volta.losses.mlm import mask_tokens

VOCAB = 300
PAD, CLS, SEP, MASK = 1, 0, 2, 4


@dataclass
class FakeBatch:
    """The fields of volta.data.batch.VoltaBatch that the task reads."""

    images1: Tensor
    images2: Tensor
    input_ids1: Tensor
    attention_mask1: Tensor
    special_tokens_mask1: Tensor
    input_ids2: Tensor
    attention_mask2: Tensor
    special_tokens_mask2: Tensor
    mlm_input_ids1: Tensor
    mlm_labels1: Tensor
    mlm_input_ids2: Tensor
    mlm_labels2: Tensor
    image_ids: Tensor

    def to(self, device: Any) -> FakeBatch:
        return FakeBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def double(self) -> FakeBatch:
        """A copy with both image views in float64 (token fields unchanged)."""
        return FakeBatch(
            **{
                f.name: getattr(self, f.name).double()
                if f.name.startswith("images")
                else getattr(self, f.name)
                for f in fields(self)
            }
        )

    def rows(self, idx: slice) -> FakeBatch:
        return FakeBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


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


def make_batch(config: VoltaConfig, b: int = 8, seed: int = 0) -> FakeBatch:
    """A random two-view batch shaped for ``config``."""
    g = torch.Generator().manual_seed(seed)
    size = config.model.image.img_size
    length = config.model.text.max_length
    ids1, attn1, sp1 = _caption(g, b, length)
    ids2, attn2, sp2 = _caption(g, b, length)
    m1, l1 = mask_tokens(ids1, sp1, mask_token_id=MASK, vocab_size=VOCAB, generator=g)
    m2, l2 = mask_tokens(ids2, sp2, mask_token_id=MASK, vocab_size=VOCAB, generator=g)
    return FakeBatch(
        images1=torch.randn(b, 3, size, size, generator=g),
        images2=torch.randn(b, 3, size, size, generator=g),
        input_ids1=ids1,
        attention_mask1=attn1,
        special_tokens_mask1=sp1,
        input_ids2=ids2,
        attention_mask2=attn2,
        special_tokens_mask2=sp2,
        mlm_input_ids1=m1,
        mlm_labels1=l1,
        mlm_input_ids2=m2,
        mlm_labels2=l2,
        image_ids=torch.arange(b, dtype=torch.long) * 7919,
    )
