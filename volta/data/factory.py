"""Build the training and evaluation loaders from the config: the one place that reads ``data.*`` settings.

``build_train_loader`` returns a ``torch.utils.data.DataLoader`` over :class:`~volta.data.pipeline.TrainStream`
that yields exactly :func:`batches_per_epoch` micro-batches per rank per epoch (minus ``start_batch`` when
resuming), so all ranks step together. ``build_eval_loader`` returns an in-process iterable of
:class:`~volta.data.batch.EvalBatch` in shard order.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterable, Mapping, Sequence

from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from volta.config import StorageConfig, VoltaConfig
from volta.data.batch import EvalBatch, VoltaBatch
from volta.data.pipeline import EvalReader, TrainStream
from volta.data.s3 import S3Location
from volta.data.shards import DatasetSizeError, count_samples, resolve_shards
from volta.data.views import ImageViews, TextViews

__all__ = [
    "batches_per_epoch",
    "build_eval_loader",
    "build_train_loader",
    "dataset_size",
    "samples_per_epoch",
]

log = logging.getLogger(__name__)

# Workers start with "spawn": a fresh interpreter that inherits nothing from a parent holding threads, CUDA
# contexts or boto3 clients (Ray workers have all three), and that sees the environment (AWS credentials) as it
# is when the loader starts; forkserver would freeze the environment of the moment its server started.
_WORKER_START_METHOD = "spawn"


def dataset_size(shards: str | Sequence[str], storage: StorageConfig) -> int:
    """Number of samples in the shards according to their ``sizes.json`` manifests (local or S3).

    Raises :class:`~volta.data.shards.DatasetSizeError` naming ``data.samples_per_epoch`` when there is none.
    """
    s3 = S3Location.from_storage(storage)
    return count_samples(resolve_shards(shards, s3=s3), s3=s3)


def samples_per_epoch(config: VoltaConfig) -> int:
    """Samples in one training epoch: ``data.samples_per_epoch`` when set, else the train shards' manifest."""
    if config.data.samples_per_epoch is not None:
        return config.data.samples_per_epoch
    return dataset_size(config.data.train_shards, config.storage)


def batches_per_epoch(config: VoltaConfig, world_size: int) -> int:
    """Micro-batches each rank reads per epoch: ``samples // global_batch`` optimizer steps x accumulation.

    The same on every rank, so no rank waits in a collective for a batch another rank never gets.
    """
    global_batch, micro = config.train.global_batch_size, config.train.micro_batch_size
    if global_batch % (world_size * micro):
        raise ValueError(
            f"train.global_batch_size={global_batch} is not divisible by world_size x train.micro_batch_size "
            f"= {world_size} x {micro}"
        )
    samples = samples_per_epoch(config)
    steps = samples // global_batch
    if steps == 0:
        raise DatasetSizeError(
            f"data.samples_per_epoch: {samples} samples is less than one global batch ({global_batch})"
        )
    return steps * (global_batch // (world_size * micro))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def build_train_loader(
    config: VoltaConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    epoch: int,
    start_batch: int = 0,
    consumed: Mapping[int, int] | Mapping[str, int] | None = None,
    pin_memory: bool = False,
) -> DataLoader[VoltaBatch]:
    """The training DataLoader of one rank for one epoch, resuming at ``start_batch`` (a batch's ``position``).

    ``consumed`` is the ``position["consumed"]`` maps of the epoch's batches read so far, merged; with it the
    resumed batches are those of the uninterrupted run, corrupt images before the resume point included.

    Each batch holds ``train.micro_batch_size`` samples; ``data.num_workers`` worker processes (forkserver, not
    persistent) read disjoint shard streams. ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE``
    environment variables (0 and 1 when unset). The order is a pure function of (train.seed, epoch, rank,
    world_size, data.num_workers); see :mod:`volta.data.pipeline` for the resume guarantee.
    """
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    data, views = config.data, config.data.views
    s3 = S3Location.from_storage(config.storage)
    shards = resolve_shards(data.train_shards, s3=s3)
    stream = TrainStream(
        shards,
        tokenizer=tokenizer,
        image_views=ImageViews(
            config.model.image.img_size,
            crop_scale=views.crop_scale,
            hflip_p=views.hflip_p,
            color_jitter=views.color_jitter,
            color_jitter_p=views.color_jitter_p,
            grayscale_p=views.grayscale_p,
            blur_p=views.blur_p,
            solarize_p=views.solarize_p,
        ),
        text_views=TextViews(views.text_aug_p, rate=views.text_aug_rate),
        batch_size=config.train.micro_batch_size,
        batches_per_epoch=batches_per_epoch(config, world_size),
        max_length=config.model.text.max_length,
        mlm_probability=config.loss.mlm.probability,
        seed=config.train.seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        num_workers=data.num_workers,
        start_batch=start_batch,
        consumed=consumed,
        shuffle_buffer=data.shuffle_buffer,
        max_image_pixels=data.max_image_pixels,
        s3=s3,
        render_on=views.render_on,
        swap_negatives=config.loss.got.swap_negatives_on,
    )
    log.info(
        "train loader: rank %d/%d epoch %d, %d shards, %d batches of %d from batch %d, %d workers",
        rank,
        world_size,
        epoch,
        len(shards),
        stream.batches_per_epoch,
        stream.batch_size,
        start_batch,
        data.num_workers,
    )
    context = None
    if data.num_workers > 0:
        context = multiprocessing.get_context(_WORKER_START_METHOD)
    return DataLoader(
        stream,
        batch_size=None,  # the stream batches itself (per-worker collate)
        num_workers=data.num_workers,
        multiprocessing_context=context,
        persistent_workers=False,
        pin_memory=pin_memory,
    )


def build_eval_loader(
    shards: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    image_size: int,
    max_length: int,
    batch_size: int,
    max_samples: int | None = None,
    s3: S3Location | None = None,
    max_image_pixels: int = 50_000_000,
) -> Iterable[EvalBatch]:
    """Evaluation batches over ``shards`` (any form :func:`~volta.data.shards.resolve_shards` takes).

    Deterministic order (shards in list order, samples in tar order), each usable sample exactly once, capped at
    ``max_samples``; images resized whole to ``image_size`` squares, captions with token character offsets.
    Iterating it again reads the shards again.
    """
    urls = resolve_shards(shards, s3=s3)
    return EvalReader(
        urls,
        tokenizer,
        image_size=image_size,
        max_length=max_length,
        batch_size=batch_size,
        max_samples=max_samples,
        max_image_pixels=max_image_pixels,
        s3=s3,
    )


def build_config_eval_loader(
    config: VoltaConfig,
    tokenizer: PreTrainedTokenizerBase,
    shards: str | Sequence[str],
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> Iterable[EvalBatch]:
    """:func:`build_eval_loader` with everything else from the config: image size, caption length, storage, limits.

    The one way validation, heat maps and the evaluation CLI read evaluation shards (``batch_size`` defaults to
    ``eval.batch_size``).
    """
    return build_eval_loader(
        shards,
        tokenizer,
        image_size=config.model.image.img_size,
        max_length=config.model.text.max_length,
        batch_size=batch_size or config.eval.batch_size,
        max_samples=max_samples,
        s3=S3Location.from_storage(config.storage),
        max_image_pixels=config.data.max_image_pixels,
    )
