"""Activation (gradient) checkpointing of one module call, switched per backbone.

The VoLTA model drives the backbones' blocks itself (the fused blocks interleave two networks), so the libraries'
own checkpointing switches do not apply; each block call goes through :func:`call_checkpointed` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def call_checkpointed(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """Call ``fn(*args)``, recomputing its activations in backward when ``enabled`` and gradients are on.

    Uses the non-reentrant implementation, which preserves the RNG state (dropout, stochastic depth give the same
    masks in the recomputation) and supports inputs that do not require gradients.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
