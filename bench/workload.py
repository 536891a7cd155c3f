"""The benchmark workload: a recipe's VoLTA task and random two-view batches shaped for it.

Step, memory and GPU benchmarks time the task module itself, so they feed it batches made here instead of the
data pipeline (which ``bench.data`` measures on its own) and need no tokenizer files: only a vocabulary size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from volta.config import VoltaConfig
from volta.data.batch import View, VoltaBatch
from volta.data.masking import mask_tokens

# RoBERTa's special ids: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> at the end of the vocabulary (volta's BPE
# tokenizers put it at 4; only the id's value differs, never the cost).
CLS, PAD, SEP = 0, 1, 2
FIRST_WORD_ID = 5
# Dropout and stochastic depth off: a variant that recomputes activations (prefix sharing off) would draw other
# masks, and the losses of two variants could not be compared; their cost is negligible either way.
NO_DROPOUT = [
    "model.text.config_overrides.hidden_dropout_prob=0.0",
    "model.text.config_overrides.attention_probs_dropout_prob=0.0",
    "model.image.drop_path_rate=0.0",
]


def recipe_vocab_size(config: VoltaConfig) -> int:
    """The vocabulary the recipe trains with: its tokenizer's size when the tokenizer folder exists locally,
    otherwise the text encoder config's (50,265 for RoBERTa), read without any download."""
    name = config.tokenizer_name
    if Path(name).is_dir():
        from volta.data.tokenizer import load_tokenizer

        return len(load_tokenizer(name))
    from volta.models.factory import text_config_for

    return int(text_config_for(config.model).vocab_size)


def _swapped(
    gen: torch.Generator, ids: torch.Tensor, attn: torch.Tensor, special: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Swap-negative fields for random captions: two real tokens of every caption exchanged."""
    swapped = ids.clone()
    for row, real in enumerate(~special):
        positions = torch.nonzero(real).squeeze(1)
        i, j = positions[torch.randperm(positions.numel(), generator=gen)[:2]].tolist()
        swapped[row, i], swapped[row, j] = ids[row, j], ids[row, i]
    return {
        "swap_input_ids": swapped,
        "swap_attention_mask": attn.clone(),
        "swap_special_tokens_mask": special.clone(),
        "swap_valid": torch.ones(ids.shape[0], dtype=torch.bool),
    }


def _captions(gen: torch.Generator, batch: int, length: int, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``<s> words </s> <pad>...`` captions of 60-100% of ``length`` tokens: ids, mask, specials."""
    lengths = torch.randint(max(3, int(0.6 * length)), length + 1, (batch,), generator=gen)  # (B,)
    ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch, length), generator=gen)  # (B, L)
    pad = torch.arange(length)[None] >= lengths[:, None]  # (B, L)
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[pad] = PAD
    special = pad | (ids == CLS) | (ids == SEP)  # (B, L)
    return ids, (~pad).long(), special


def random_batch(config: VoltaConfig, batch_size: int, vocab_size: int, seed: int = 0) -> VoltaBatch:
    """A ``VoltaBatch`` of ``batch_size`` samples at the recipe's image size and caption length (random content).

    Images ``(B, 3, S, S)`` are standard normal (what ImageNet-normalised pixels look like to the model); both
    caption views are MLM-masked at ``loss.mlm.probability``; every sample has its own image id.
    """
    gen = torch.Generator().manual_seed(seed)
    size, length = config.model.image.img_size, config.model.text.max_length
    views = []
    for _ in range(2):
        ids, attn, special = _captions(gen, batch_size, length, vocab_size)
        masked, labels = mask_tokens(
            ids,
            special,
            mask_token_id=vocab_size - 1,
            vocab_size=vocab_size,
            probability=config.loss.mlm.probability,
            generator=gen,
            num_special_ids=FIRST_WORD_ID,
        )
        images = torch.randn(batch_size, 3, size, size, generator=gen)
        view = View(images, ids, attn, special, masked, labels)
        if config.loss.got.swap_negatives_on:  # the swapped captions the train loader would add
            view = dataclasses.replace(view, **_swapped(gen, ids, attn, special))
        views.append(view)
    return VoltaBatch(
        views=(views[0], views[1]),
        image_ids=torch.arange(batch_size, dtype=torch.long) + 1_000 * seed,  # (B,) all distinct
        keys=[f"bench-{seed}-{i}" for i in range(batch_size)],
    )
