"""VoLTA model: timm Swin + Hugging Face RoBERTa encoders composed through thin adapters, gated cross-modal
attention fusion in their last N blocks, VoLTA's heads, weight loading, export and parameter counting.

Names are imported on first use (PEP 562) so that light users (the ``volta`` CLI's parser) do not pay for
importing torch, timm and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "volta.models.factory",
    "load_pretrained_weights": "volta.models.factory",
    "BTProjections": "volta.models.volta_model",
    "GOTProjections": "volta.models.volta_model",
    "ImagePrefix": "volta.models.volta_model",
    "TextPrefix": "volta.models.volta_model",
    "VoLTAModel": "volta.models.volta_model",
    "VoLTAOutputs": "volta.models.volta_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'volta.models' has no attribute {name!r}")
