"""Image-text matching on held-out pairs: does the fused model tell a caption's own image from another one?

Each evaluation batch is paired as in training (``sample_itm_pairs``, uniform negatives): half of the captions
keep their image (label 1), the other half get another picture of the batch (label 0), drawn from a generator
seeded once per pass, so the pairs of a set are fixed. The ITM head's argmax is compared with the labels.
The summary reports the balanced accuracy (mean of the accuracy on matching and on non-matching pairs: 0.5 for
a head that always answers the same, whatever the share of negatives), the two parts, and the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from volta.data.batch import EvalBatch
from volta.eval.features import model_dtype
from volta.losses.itm import sample_itm_pairs
from volta.models.volta_model import VoLTAModel

__all__ = ["ItmTally", "itm_batch"]


def itm_batch(
    model: VoLTAModel, batch: EvalBatch, device: torch.device | str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """ITM logits ``(B, 2)`` and labels ``(B,)`` of one evaluation batch (call in eval mode, without grad)."""
    image_index, labels = sample_itm_pairs(batch.image_ids.cpu(), generator=generator, mode="uniform")
    images = batch.images.to(device=device, dtype=model_dtype(model))[image_index.to(device)]  # (B, 3, S, S)
    prefix_i = model.image_prefix(images)
    prefix_t = model.text_prefix(batch.input_ids.to(device), batch.attention_mask.to(device))
    logits = model.itm_logits(model.encode(prefix_i, prefix_t, fusion=True)).float().cpu()  # (B, 2)
    return logits, labels.cpu()


@dataclass
class ItmTally:
    """Correct answers on matching (positive) and non-matching (negative) held-out pairs."""

    correct_pos: int = 0
    n_pos: int = 0
    correct_neg: int = 0
    n_neg: int = 0

    def add(self, logits: Tensor, labels: Tensor) -> None:
        right = logits.argmax(-1) == labels
        pos = labels == 1
        self.correct_pos += int(right[pos].sum())
        self.n_pos += int(pos.sum())
        self.correct_neg += int(right[~pos].sum())
        self.n_neg += int((~pos).sum())

    def summary(self) -> dict[str, float]:
        """``acc`` (balanced), ``acc_pos``, ``acc_neg``, ``chance`` (0.5) and ``n``; {} when nothing was paired."""
        if not self.n_pos or not self.n_neg:
            return {}
        acc_pos, acc_neg = self.correct_pos / self.n_pos, self.correct_neg / self.n_neg
        return {
            "acc": (acc_pos + acc_neg) / 2,
            "acc_pos": acc_pos,
            "acc_neg": acc_neg,
            "chance": 0.5,
            "n": float(self.n_pos + self.n_neg),
        }
