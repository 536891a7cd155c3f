"""The VoLTA model: Swin and RoBERTa encoders (thin adapters over timm and transformers), gated cross-modal
attention fusion in their last N blocks, VoLTA's heads, weight loading, export and parameter counting."""

from volta.models.factory import build_model, load_pretrained_weights
from volta.models.volta_model import (
    BTProjections,
    GOTProjections,
    ImagePrefix,
    TextPrefix,
    VoLTAModel,
    VoLTAOutputs,
)

__all__ = [
    "BTProjections",
    "GOTProjections",
    "ImagePrefix",
    "TextPrefix",
    "VoLTAModel",
    "VoLTAOutputs",
    "build_model",
    "load_pretrained_weights",
]
