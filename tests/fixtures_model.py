"""Tiny VoLTA model configs and batches for the model tests (CPU, milliseconds per forward)."""

from __future__ import annotations

from typing import Any

import torch

from tests.conftest import REPO
from volta.config import ModelConfig, load_config
from volta.models import VoLTAModel, build_model

VOCAB = 300  # a small vocabulary keeps the MLM decoder tiny
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

# Two tiny Swin variants with different widths, depths, heads, window sizes and input sizes.
SWIN_VARIANTS: dict[str, dict[str, Any]] = {
    # configs/debug.yaml's image encoder: 5 blocks (1-1-2-1), 64 px -> 2x2 final tokens of 256 channels.
    "debug": {},
    # 8 blocks (2-2-2-2), window 3, 48 px -> 2x2 final tokens of 192 channels.
    "w3": {
        "img_size": 48,
        "timm_kwargs": {"embed_dim": 24, "depths": [2, 2, 2, 2], "num_heads": [2, 2, 4, 8], "window_size": 3},
    },
}


def model_config(
    *, variant: str = "debug", fusion_depth: int | None = None, text_layers: int | None = None, **text: Any
) -> ModelConfig:
    """configs/debug.yaml's model section with a Swin variant, a fusion depth and text config overrides."""
    cfg = load_config(REPO / "configs" / "debug.yaml").model.model_copy(deep=True)
    image = cfg.image.model_dump()
    image.update(SWIN_VARIANTS[variant])
    overrides = dict(cfg.text.config_overrides)
    if text_layers is not None:
        overrides["num_hidden_layers"] = text_layers
    overrides.update(text)
    data = cfg.model_dump()
    data["image"] = image
    data["text"]["config_overrides"] = overrides
    if fusion_depth is not None:
        data["fusion_depth"] = fusion_depth
    return ModelConfig.model_validate(data)


def tiny_model(seed: int = 0, **kwargs: Any) -> VoLTAModel:
    """A randomly initialised tiny model (see :func:`model_config` for the arguments)."""
    torch.manual_seed(seed)
    return build_model(model_config(**kwargs), vocab_size=VOCAB)


def set_gates(model: VoLTAModel, value: float) -> None:
    """Set every fusion gate (so that the cross-attention actually changes the outputs)."""
    with torch.no_grad():
        for gate in model.fusion.gates():
            gate.fill_(value)


def make_batch(
    model: VoLTAModel, *, batch: int = 4, length: int = 12, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``(B, 3, S, S)`` and right-padded captions ``<s> ... </s> <pad>...`` of different lengths."""
    g = torch.Generator().manual_seed(seed)
    size = model.image_encoder.swin.patch_embed.img_size[0]
    images = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length - (b * 3) % (length - 3)  # lengths differ; the first sample is unpadded
        mask[b, :n] = 1
        ids[b, 0], ids[b, n - 1] = 0, 2  # <s>, </s>
    ids[mask == 0] = 1  # <pad>
    return images, ids, mask
