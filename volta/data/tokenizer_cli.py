"""``volta tokenizer train``: fit a byte-level BPE tokenizer on the captions of a shard set."""

from __future__ import annotations

import argparse
import sys

from volta.data.s3 import S3Location
from volta.errors import UsageError


def _cmd_train(args: argparse.Namespace) -> int:
    from volta.data.inspect import iter_captions, list_shards
    from volta.data.tokenizer import train_bpe_tokenizer

    try:
        list_shards(args.shards, s3=S3Location(args.endpoint_url))
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    captions = list(iter_captions(args.shards, s3=S3Location(args.endpoint_url)))
    if not captions:
        raise UsageError(f"{args.shards}: no readable captions to train on")
    tokenizer = train_bpe_tokenizer(captions, args.out, vocab_size=args.vocab_size)
    print(f"{args.out}: {len(tokenizer)} tokens, trained on {len(captions)} captions", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``volta tokenizer train`` to the ``volta`` parser."""
    tok = subparsers.add_parser("tokenizer", help="train a caption tokenizer")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = sub.add_parser("train", help="byte-level BPE (RoBERTa specials) on the captions of a shard set")
    p.add_argument("--shards", required=True, help="shard folder, one .tar, or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="output folder (loads with AutoTokenizer.from_pretrained)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (4096)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// shards")
    p.set_defaults(func=_cmd_train)
