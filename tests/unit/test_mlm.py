"""MLM masking: tokenizer's mask id, 80/10/10, specials and padding never chosen; loss over selected positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from volta.data.masking import IGNORE_INDEX, mask_tokens
from volta.losses.mlm import mlm_loss

MASK_ID = 50264  # RoBERTa's <mask>, not BERT's 103


def _batch(b: int = 64, length: int = 30, vocab: int = 50265) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 1, (b, length), generator=g)
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    pos = torch.arange(length)[None, :]
    pad = pos >= lengths[:, None]
    ids[:, 0] = 0
    ids[torch.arange(b), lengths - 1] = 2
    ids[pad] = 1
    special = pad | (ids == 0) | (ids == 2)
    return ids, special


def test_specials_and_padding_never_selected_and_labels_match() -> None:
    ids, special = _batch()
    g = torch.Generator().manual_seed(1)
    masked, labels = mask_tokens(ids, special, mask_token_id=MASK_ID, vocab_size=50265, generator=g)
    assert torch.equal(masked[special], ids[special])
    assert (labels[special] == IGNORE_INDEX).all()
    sel = labels != IGNORE_INDEX
    assert torch.equal(labels[sel], ids[sel])
    assert torch.equal(masked[~sel], ids[~sel])  # unselected positions untouched
    assert not (masked == 103).any() or (ids == 103).any()


def test_80_10_10_split_and_rate() -> None:
    ids, special = _batch(b=2000)
    g = torch.Generator().manual_seed(2)
    masked, labels = mask_tokens(
        ids, special, mask_token_id=MASK_ID, vocab_size=50265, probability=0.15, generator=g
    )
    sel = labels != IGNORE_INDEX
    rate = sel.sum().item() / (~special).sum().item()
    assert 0.14 < rate < 0.17  # 15% plus the forced one-per-row minimum on short captions
    n = sel.sum().item()
    frac_mask = (masked[sel] == MASK_ID).sum().item() / n
    frac_keep = (masked[sel] == ids[sel]).sum().item() / n
    frac_rand = 1 - frac_mask - frac_keep
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_keep - 0.1) < 0.02 and abs(frac_rand - 0.1) < 0.02


def test_every_row_with_content_gets_a_target() -> None:
    ids, special = _batch(b=256, length=8)
    g = torch.Generator().manual_seed(3)
    _, labels = mask_tokens(
        ids, special, mask_token_id=MASK_ID, vocab_size=50265, probability=0.01, generator=g
    )
    has_content = (~special).any(dim=1)
    assert ((labels != IGNORE_INDEX).any(dim=1) == has_content).all()


def test_deterministic_given_generator() -> None:
    ids, special = _batch()
    a = mask_tokens(
        ids, special, mask_token_id=MASK_ID, vocab_size=50265, generator=torch.Generator().manual_seed(7)
    )
    b = mask_tokens(
        ids, special, mask_token_id=MASK_ID, vocab_size=50265, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mlm_loss_matches_naive_mean_and_handles_no_targets() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 1], labels[2, 4] = 3, 7
    expected = (-F.log_softmax(logits[0, 1], -1)[3] - F.log_softmax(logits[2, 4], -1)[7]) / 2
    assert torch.allclose(mlm_loss(logits, labels), expected)
    zero = mlm_loss(logits, torch.full((3, 5), IGNORE_INDEX))
    assert zero.item() == 0.0
    zero.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
