"""MLM input corruption: RoBERTa-correct masking (80/10/10 with the tokenizer's own mask id).

The authors' code wrote BERT's ``[MASK]`` id 103 into RoBERTa inputs and had no 80/10/10 split (docs/method.md);
here the mask id comes from the tokenizer, special and padding positions are never selected, and the random
replacements are drawn from the non-special vocabulary. The loss is :func:`volta.losses.mlm.mlm_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Label of a position that is not predicted: PyTorch's cross-entropy ignore index, which mlm_loss uses too.
IGNORE_INDEX = -100


def mask_tokens(
    input_ids: Tensor,
    special_tokens_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
    num_special_ids: int = 0,
) -> tuple[Tensor, Tensor]:
    """Select ``probability`` of the maskable positions and corrupt them BERT-style, returning (inputs, labels).

    ``special_tokens_mask`` (bool, True = never select) must cover special tokens AND padding. Of the selected
    positions 80% become ``mask_token_id``, 10% a random token id in ``[num_special_ids, vocab_size)`` and 10% keep
    their token. ``labels`` hold the original ids at selected positions and ``IGNORE_INDEX`` elsewhere. When a row
    has maskable positions but none was drawn, one of them is selected so every caption contributes to the loss.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    ids = input_ids.clone()  # (B, L)
    maskable = ~special_tokens_mask.bool()  # (B, L)
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)  # (B, L)
    selected = (draw < probability) & maskable
    # Rows with maskable tokens but no selection: force the maskable position with the smallest draw.
    empty = maskable.any(dim=1) & ~selected.any(dim=1)  # (B,)
    if bool(empty.any()):
        masked_draw = draw.masked_fill(~maskable, 2.0)
        forced = F.one_hot(masked_draw.argmin(dim=1), ids.shape[1]).bool() & empty[:, None]
        selected |= forced
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    split = torch.rand(ids.shape, generator=generator, device=ids.device)  # (B, L)
    to_mask = selected & (split < 0.8)
    to_random = selected & (split >= 0.8) & (split < 0.9)
    random_ids = torch.randint(num_special_ids, vocab_size, ids.shape, generator=generator, device=ids.device)
    ids = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    ids = torch.where(to_random, random_ids, ids)
    return ids, labels
