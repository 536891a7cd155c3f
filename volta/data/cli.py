"""``volta data``: make shards (folder, COCO, Karpathy COCO, Visual Genome, synthetic), upload, inspect.

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


def _names(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated list of names (``train,restval``)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _cmd_from_karpathy(args: argparse.Namespace) -> int:
    from volta.data.sources import SourceError, karpathy_records

    try:
        records = karpathy_records(args.split_file, args.images_root, args.split)
        return _write_records(args, records, "from-karpathy")
    except SourceError as err:
        raise UsageError(str(err)) from err


def _cmd_from_vg(args: argparse.Namespace) -> int:
    from volta.data.sources import SourceError, karpathy_coco_ids, visual_genome_records

    if args.exclude_karpathy and not args.image_data:
        raise UsageError(
            "--exclude-karpathy needs --image-data image_data.json: it holds each VG image's coco_id"
        )
    try:
        exclude = (
            karpathy_coco_ids(args.exclude_karpathy, args.exclude_splits)
            if args.exclude_karpathy
            else frozenset()
        )
        records = visual_genome_records(
            args.regions,
            args.images,
            args.image_data,
            exclude_coco_ids=exclude,
            max_phrases_per_image=args.max_phrases,
        )
        return _write_records(args, records, "from-vg")
    except SourceError as err:
        raise UsageError(str(err)) from err


def _cmd_synth(args: argparse.Namespace) -> int:
    from volta.data.synth import write_synth_dataset
    from volta.data.synth_scenes import write_scenes_dataset

    if args.image_size < 32:
        raise UsageError(f"--image-size must be >= 32, got {args.image_size}")
    total = args.train_samples + args.val_samples
    write = write_scenes_dataset if args.kind == "scenes" else write_synth_dataset
    with _progress(total, "img", f"synth {args.kind}") as step:
        sizes = write(
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

    p = sub.add_parser(
        "from-karpathy",
        help="shards from COCO with the Karpathy split file (dataset_coco.json), one per caption",
    )
    p.add_argument("split_file", help="dataset_coco.json (Karpathy split)")
    p.add_argument(
        "images_root", help="COCO root holding the split file's filepath folders (train2014/, val2014/)"
    )
    p.add_argument(
        "--split",
        type=_names,
        default=("train", "restval"),
        help="comma-separated Karpathy splits to convert: train, restval, val, test (train,restval)",
    )
    _add_writer_options(p)
    p.set_defaults(func=_cmd_from_karpathy)

    p = sub.add_parser(
        "from-vg", help="shards from Visual Genome region descriptions: one per phrase, with its boxes"
    )
    p.add_argument("regions", help="region_descriptions.json")
    p.add_argument("images", help="folder of the VG images ({id}.jpg, or VG_100K/ and VG_100K_2/ inside it)")
    p.add_argument(
        "--image-data", default=None, help="image_data.json: coco_id of each image, recorded sizes, paths"
    )
    p.add_argument(
        "--exclude-karpathy",
        default=None,
        metavar="SPLIT_FILE",
        help="leave out VG images that are COCO images of this Karpathy file's --exclude-splits "
        "(needs --image-data)",
    )
    p.add_argument(
        "--exclude-splits",
        type=_names,
        default=("val", "test"),
        help="Karpathy splits whose images --exclude-karpathy leaves out (val,test)",
    )
    p.add_argument(
        "--max-phrases", type=positive_int, default=None, help="at most this many phrases per image (all)"
    )
    _add_writer_options(p)
    p.set_defaults(func=_cmd_from_vg)

    p = sub.add_parser("synth", help="synthetic grounding dataset: DIR/train, DIR/val, DIR/tokenizer")
    p.add_argument("--out", required=True, help="output folder (e.g. data/synth)")
    p.add_argument(
        "--kind",
        choices=("shapes", "scenes"),
        default="shapes",
        help="shapes: coloured shapes on textures (default); scenes: drawn everyday objects in cluttered "
        "photo-like scenes, a second dataset designed apart from the first",
    )
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
