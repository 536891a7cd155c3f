"""Caption tokenizers: any Hugging Face tokenizer by name or folder, and an offline byte-level BPE trainer.

The trained tokenizer is a RoBERTa-style byte-level BPE with RoBERTa's specials (``<s> <pad> </s> <unk> <mask>``),
saved with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(folder)`` loads it like any hub tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, RobertaTokenizer

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a fast Hugging Face tokenizer from a hub name or a local folder; it must define a mask and pad token."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {name_or_path!r}: needs a mask token and a pad token for MLM and batching"
        )
    return tokenizer


def train_bpe_tokenizer(
    captions: Iterable[str], out_dir: str | Path, *, vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """Fit a byte-level BPE with RoBERTa specials on ``captions``, save it to ``out_dir`` and return it loaded."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        (c for c in captions if c),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    # Persist through transformers' own RoBERTa tokenizer class so the folder loads with AutoTokenizer.
    vocab = bpe.get_vocab()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(out))  # vocab.json + merges.txt
    merges = [ln for ln in (out / "merges.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])  # type: ignore[arg-type,misc]
    tokenizer.save_pretrained(str(out))
    log.info("trained a byte-level BPE tokenizer with %d tokens into %s", len(tokenizer), out)
    return load_tokenizer(str(out))
