"""``volta data``: make shards (from a folder, from COCO, synthetic), upload them to S3, inspect them.

Heavy imports happen inside the command functions so that ``volta --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from volta.commands import non_negative_int, positive_int
from volta.data.s3 import S3Location
from volta.errors import UsageError


@contextmanager
def _progress(total: int | None, unit: str, desc: str) -> Iterator[Callable[[int], None]]:
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence when stderr is a file or a pipe (CI logs, tests).
    with tqdm(
        total=total, unit=unit, desc=desc, file=sys.stderr, disable=None, unit_scale=unit == "B"
    ) as bar:
        yield bar.update


def _write_records(args: argparse.Namespace, records: Iterator[Any], desc: str) -> int:
    from volta.data.sources import encode_record
    from volta.data.writers import ShardWriter

    with _progress(None, "sample", desc) as step, ShardWriter(args.out, args.samples_per_shard) as writer:

        def encode(record: Any) -> Any:
            step(1)
            try:
                return encode_record(record, args.max_size)
            except ValueError as err:
                raise UsageError(str(err)) from err

        writer.write_all(records, encode)
        sizes = writer.close()
    print(
        f"{args.out}: {sum(sizes.values())} samples in {len(sizes)} shards "
        f"({writer.shards_written} written, {writer.shards_skipped} already complete)",
        file=sys.stderr,
    )
    return 0


def _cmd_from_folder(args: argparse.Namespace) -> int:
    from volta.data.sources import SourceError, folder_records

    try:
        records = folder_records(args.images, args.captions)
        return _write_records(args, records, "from-folder")
    except SourceError as err:
        raise UsageError(str(err)) from err


def _cmd_from_coco(args: argparse.Namespace) -> int:
    from volta.data.sources import SourceError, coco_records

    try:
        records = coco_records(args.captions, args.images, args.instances)
        return _write_records(args, records, "from-coco")
    except SourceError as err:
        raise UsageError(str(err)) from err


def _cmd_synth(args: argparse.Namespace) -> int:
    from volta.data.synth import write_synth_dataset

    if args.image_size < 32:
        raise UsageError(f"--image-size must be >= 32, got {args.image_size}")
    total = args.train_samples + args.val_samples
    with _progress(total, "img", "synth") as step:
        sizes = write_synth_dataset(
            args.out,
            train_samples=args.train_samples,
            val_samples=args.val_samples,
            image_size=args.image_size,
            seed=args.seed,
            samples_per_shard=args.samples_per_shard,
            tokenizer_vocab_size=None if args.no_tokenizer else args.vocab_size,
            workers=args.workers,
            progress=step,
        )
    for split, manifest in sizes.items():
        print(
            f"{Path(args.out) / split}: {sum(manifest.values())} samples in {len(manifest)} shards",
            file=sys.stderr,
        )
    if not args.no_tokenizer:
        print(f"{Path(args.out) / 'tokenizer'}: tokenizer trained on the train captions", file=sys.stderr)
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    from volta.data.upload import upload_dataset

    if not args.url.startswith("s3://"):
        raise UsageError(f"destination must be s3://bucket/prefix, got {args.url!r}")
    folder = Path(args.local_dir)
    if not folder.is_dir():
        raise UsageError(f"no such folder: {folder}")
    total = sum(p.stat().st_size for p in folder.glob("*.tar")) + sum(
        p.stat().st_size for p in folder.glob("sizes.json")
    )
    try:
        with _progress(total, "B", "upload") as step:
            report = upload_dataset(
                folder, args.url, s3=S3Location(args.endpoint_url, args.region), progress=step
            )
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    summary = {
        "uploaded": report.uploaded,
        "replaced": report.replaced,
        "skipped": report.skipped,
        "bytes_sent": report.bytes_sent,
    }
    print(json.dumps(summary, indent=1))
    print(
        f"{len(report.uploaded)} uploaded, {len(report.replaced)} replaced (remote differed), "
        f"{len(report.skipped)} already present and intact",
        file=sys.stderr,
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from volta.data.inspect import format_report, inspect_shards

    try:
        with _progress(args.limit, "sample", "inspect") as step:
            summary = inspect_shards(
                args.path,
                limit=args.limit,
                grid_path=args.grid,
                s3=S3Location(args.endpoint_url),
                progress=step,
            )
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    sys.stderr.write(format_report(summary))
    print(json.dumps(summary, indent=1))
    return 0


def _add_writer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for NNNNN.tar shards and sizes.json")
    parser.add_argument(
        "--samples-per-shard", type=positive_int, default=1000, help="samples per shard (1000)"
    )
    parser.add_argument(
        "--max-size",
        type=positive_int,
        default=None,
        help="resize images whose longer side exceeds this (boxes scale too); default: keep original bytes",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``volta data`` and its subcommands to the ``volta`` parser."""
    data = subparsers.add_parser("data", help="make, upload and inspect WebDataset shards")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("from-folder", help="shards from a folder of images and a captions CSV/JSONL")
    p.add_argument(
        "--images", required=True, help="folder of images (paths in the captions file are relative)"
    )
    p.add_argument(
        "--captions", required=True, help="CSV (header: image|file, caption) or JSONL ({image|file, caption})"
    )
    _add_writer_options(p)
    p.set_defaults(func=_cmd_from_folder)

    p = sub.add_parser("from-coco", help="shards from COCO caption (and optional instance) annotations")
    p.add_argument("--captions", required=True, help="captions_*.json")
    p.add_argument("--images", required=True, help="folder of the images named in the captions file")
    p.add_argument(
        "--instances", default=None, help="instances_*.json: boxes of categories named in captions"
    )
    _add_writer_options(p)
    p.set_defaults(func=_cmd_from_coco)

    p = sub.add_parser("synth", help="synthetic grounding dataset: DIR/train, DIR/val, DIR/tokenizer")
    p.add_argument("--out", required=True, help="output folder (e.g. data/synth)")
    p.add_argument("--train-samples", type=non_negative_int, default=10_000, help="train samples (10000)")
    p.add_argument("--val-samples", type=non_negative_int, default=1_000, help="validation samples (1000)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels (128, at least 32)")
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="dataset seed; the val split derives its own (0)"
    )
    # 500 gives the default val split two shards, so two ranks both get one.
    p.add_argument("--samples-per-shard", type=positive_int, default=500, help="samples per shard (500)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not train DIR/tokenizer")
    p.add_argument("--vocab-size", type=positive_int, default=1024, help="tokenizer vocabulary size (1024)")
    p.add_argument(
        "--workers", type=positive_int, default=1, help="generator processes (1; output is identical)"
    )
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "upload", help="upload shards + sizes.json to S3 with checksums, skipping intact objects"
    )
    p.add_argument("local_dir", help="folder of NNNNN.tar shards and sizes.json")
    p.add_argument("url", help="s3://bucket/prefix")
    p.add_argument(
        "--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)"
    )
    p.add_argument("--region", default=None, help="region (default: AWS_REGION or us-east-1)")
    p.set_defaults(func=_cmd_upload)

    p = sub.add_parser("inspect", help="count samples, check every sample, draw a grid (JSON on stdout)")
    p.add_argument("path", help="shard folder, one .tar, or s3://bucket/prefix")
    p.add_argument("--grid", default=None, help="write a PNG grid of samples with captions and boxes here")
    p.add_argument("--limit", type=positive_int, default=None, help="stop after this many samples")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// paths")
    p.set_defaults(func=_cmd_inspect)
