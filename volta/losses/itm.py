"""Image-text matching: in-batch negative sampling (uniform or hard) and the two-way classification loss.

The authors swapped images uniformly at random within the batch, which can pair a caption with its own image
(another caption of the same picture) and call it a negative (docs/method.md defect 9). Here a negative always uses a
different image (by id), and hard negatives can be sampled from the global-feature similarity.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["itm_loss", "sample_itm_pairs"]

logger = logging.getLogger(__name__)


def sample_itm_pairs(
    image_ids: Tensor,
    *,
    generator: torch.Generator | None,
    mode: Literal["uniform", "hard"] = "uniform",
    similarity: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose which image each caption of the batch is paired with: ``(image_index (B,), labels (B,))``.

    ``image_ids (B,)`` identifies the picture of each row (rows with equal ids show the same image). Exactly
    ``floor(B / 2)`` rows, chosen at random among the rows that have some row with a different id (all of
    them when there are fewer), become negatives (label 0): their image is that of another row ``j`` with a
    different id, drawn uniformly (``mode="uniform"``) or with probability ``softmax(similarity[i])`` over
    those rows (``mode="hard"``, ``similarity (B, B)`` e.g. caption-to-image cosine of global features). The
    other rows keep their own image (label 1). Deterministic given the state of ``generator`` (a CPU generator:
    the draws run on the CPU wherever the batch lives, so the pairs do not depend on the device).
    """
    if image_ids.dim() != 1:
        raise ValueError(f"expected image_ids of shape (B,), got {tuple(image_ids.shape)}")
    if mode not in ("uniform", "hard"):
        raise ValueError(f"mode must be 'uniform' or 'hard', got {mode!r}")
    bsz = image_ids.shape[0]
    device = image_ids.device
    if mode == "hard" and (similarity is None or similarity.shape != (bsz, bsz)):
        raise ValueError(
            f"mode='hard' needs a (B, B) similarity, got {None if similarity is None else tuple(similarity.shape)}"
        )
    different = image_ids.unsqueeze(0) != image_ids.unsqueeze(1)  # (B, B): row i may take row j's image
    eligible = torch.nonzero(different.any(dim=1)).squeeze(1)  # rows that can have a negative
    order = torch.randperm(eligible.numel(), generator=generator, device="cpu").to(device)
    negatives = eligible[order[: min(bsz // 2, eligible.numel())]]  # (k,)

    image_index = torch.arange(bsz, device=device)
    labels = torch.ones(bsz, dtype=torch.long, device=device)
    if negatives.numel() > 0:
        allowed = different[negatives]  # (k, B)
        if mode == "uniform":
            weights = allowed.float()
        else:
            assert similarity is not None
            logits = similarity.detach().float()[negatives].masked_fill(~allowed, float("-inf"))  # (k, B)
            weights = torch.softmax(logits, dim=1)
            weights = torch.where(allowed, weights, torch.zeros_like(weights))
        # multinomial runs on CPU so the same generator gives the same draw wherever the batch lives
        picks = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(device)  # (k,)
        image_index[negatives] = picks
        labels[negatives] = 0
    return image_index, labels


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the ITM head's logits ``(B, 2)`` against labels ``(B,)`` (1 = matching pair), fp32."""
    if logits.dim() != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (B, 2) and labels (B,), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    return F.cross_entropy(logits.float(), labels.long())
