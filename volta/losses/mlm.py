"""Masked language modelling loss: cross-entropy over the corrupted positions of the global batch.

The corruption (80/10/10 with the tokenizer's own mask id) is made by the data pipeline,
:func:`volta.data.masking.mask_tokens`, whose labels are the original ids at the selected positions and
``-100`` (PyTorch's ignore index) elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def mlm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Mean cross-entropy over the selected positions (``labels != ignore_index``); zero when none are selected.

    ``logits (..., V)`` and ``labels (...)``. With ``all_reduce`` (a sum over ranks) the mean is over the selected
    positions of the whole global batch and each rank returns its share, so that the mean over ranks of the
    returned values is the global mean (the task's distributed rule). Computed in fp32 so bf16 logits over a
    50k vocabulary do not lose the loss's precision.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    ce_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    local = (flat_labels != ignore_index).sum().to(ce_sum.dtype)
    counts = torch.stack([local, torch.ones_like(local)])  # (selected positions, ranks)
    if all_reduce is not None:
        counts = all_reduce(counts).detach()
    if counts[0] == 0:
        return ce_sum * 0.0
    return ce_sum * counts[1] / counts[0]
