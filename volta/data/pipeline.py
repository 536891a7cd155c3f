"""The per-worker training stream and the evaluation reader over WebDataset shards.

Training stream of one DataLoader worker (all stages are plain, picklable objects, safe under spawn and Ray):

1. **Shards.** Epoch ``e``'s shard order is the shard list shuffled with ``(seed, e)``; the orders of epochs
   ``e, e+1, ...`` are concatenated into one endless sequence of positions. Split by node, then by worker: stream
   ``g = rank + world_size x worker`` reads positions ``g, g + W*N, g + 2*W*N, ...``, so within an epoch every
   shard goes to exactly one stream, and a stream that runs dry continues into the next epoch's order
   (resampling) instead of stopping, so every rank yields the same number of batches.
2. **Read and check** (webdataset's tar iterator and key grouping): samples with a missing or unreadable part are
   skipped and counted by reason (:data:`SKIP_REASONS`); a truncated or unreadable shard stops at the break,
   is counted, and the stream goes on with its next shard. The checks here are cheap: the image header is
   parsed, the pixels are not decoded.
3. **Fast-forward** (resume only): skip ``b x B`` checked samples without decoding them, where ``b`` is the
   worker's first batch to produce.
4. **Shuffle** in a seeded buffer of ``shuffle_buffer`` samples (raw bytes, before decoding).
5. **Decode** the image (a corrupt body is skipped and counted), build two image views and two caption views,
   each seeded from ``(seed, epoch, rank, worker, sample index)``.
6. **Batch**: tokenise, MLM-mask, and attach the skip counts and the resume position (:class:`TrainCollate`).

Batch ``i`` of a rank's epoch comes from worker ``i mod N`` (the DataLoader's round-robin order). Resuming at
``(epoch, start_batch=k)`` gives DataLoader worker ``j`` the role of worker ``(k + j) mod N`` starting at its
batch ``(k + j) // N``, and fast-forwards raw samples as in step 3. With ``shuffle_buffer=0`` the batches after
a resume are identical to the uninterrupted ones; with a buffer they hold the same samples up to one buffer
window (the buffer restarts empty). Images whose header parses but whose body is corrupt are only detected
when decoding, so each one before the resume point shifts the resumed stream by one sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import warnings
from collections.abc import Iterator, Sequence
from itertools import chain, groupby, islice
from typing import IO, Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_iterator

from volta.data.batch import EvalBatch, EvalCollate, TrainCollate, VoltaBatch, image_id
from volta.data.s3 import S3Location
from volta.data.shards import open_shard
from volta.data.views import ImageViews, TextViews, eval_image_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "EvalReader",
    "SkipCounter",
    "TrainStream",
    "check_sample",
    "decode_image",
    "iter_shard_samples",
    "shard_stream",
    "stable_seed",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = (
    "corrupt_image",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_utf8",
    "oversized_image",
    "bad_json",
    "truncated_shard",
    "unreadable_shard",
)


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (same in every process, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SkipCounter:
    """Counts of skipped samples by reason; :meth:`take` returns the counts since the previous take."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(SKIP_REASONS, 0)

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` samples (or shards) skipped for ``reason`` (one of :data:`SKIP_REASONS`)."""
        self.counts[reason] += n

    def take(self) -> dict[str, int]:
        """The counts since the previous call, then reset to zero."""
        out, self.counts = self.counts, dict.fromkeys(SKIP_REASONS, 0)
        return out


# ------------------------------------------------------------------------------------------------ reading
def iter_shard_samples(
    url: str, counter: SkipCounter, *, s3: S3Location | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one shard (``{"__key__", "__url__", "<ext>": bytes, ...}``) in tar order.

    Never raises for bad data: a shard that cannot be opened counts as ``unreadable_shard``, one that breaks
    off (truncated tar, read error after retries) as ``truncated_shard``, and the samples read before the break
    are kept. The sample being assembled at the break is kept only if it has the same files as the sample
    before it (a member is either read whole or not at all, so this tells a complete sample from a cut one).
    """
    errors: list[BaseException] = []
    yielded = 0
    previous: frozenset[str] | None = None
    pending: dict[str, Any] | None = None
    try:
        with open_shard(url, s3=s3) as stream:
            for sample in group_by_keys(_files_until_error(stream, url, errors)):
                if pending is not None:
                    yielded += 1
                    previous = _parts(pending)
                    yield pending
                pending = sample
    except Exception as exc:  # data errors of any kind must not kill a training run
        errors.append(exc)
        pending = None
    if pending is not None and (not errors or _parts(pending) == previous):
        yielded += 1
        yield pending
    if errors:
        first = errors[0]
        reason = "unreadable_shard" if yielded == 0 and _is_open_error(first) else "truncated_shard"
        counter.add(reason)
        log.warning("%s: %s after %d sample(s) (%s: %s)", url, reason, yielded, type(first).__name__, first)


def _parts(sample: dict[str, Any]) -> frozenset[str]:
    return frozenset(k for k in sample if not k.startswith("__"))


def _files_until_error(stream: IO[bytes], url: str, errors: list[BaseException]) -> Iterator[dict[str, Any]]:
    # Ends the file stream quietly at the first read error, recording it, so the grouping stage can hand over
    # the samples completed so far.
    try:
        for f in tar_file_iterator(stream):
            yield {**f, "__url__": url}
    except Exception as exc:
        errors.append(exc)


def _is_open_error(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, ClientError))


def check_sample(
    raw: dict[str, Any], counter: SkipCounter, *, max_image_pixels: int
) -> dict[str, Any] | None:
    """Validate one raw sample cheaply (no pixel decoding); return its parsed parts or None (counted).

    The result holds ``key``, ``image_bytes``, ``caption`` (stripped), ``meta`` (the JSON object or ``{}``) and
    ``size`` (width, height) read from the image header.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        counter.add("missing_image")
        return None
    if "txt" not in raw:
        counter.add("missing_caption")
        return None
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        counter.add("bad_utf8")
        return None
    if not caption:
        counter.add("empty_caption")
        return None
    meta: Any = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            counter.add("bad_json")
            return None
    image_bytes = raw[ext]
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's warning for large images would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image_bytes)) as img:
                size = img.size
    except Image.DecompressionBombError:
        counter.add("oversized_image")
        return None
    except Exception:
        counter.add("corrupt_image")
        return None
    if size[0] * size[1] > max_image_pixels:
        counter.add("oversized_image")
        return None
    return {"key": raw["__key__"], "image_bytes": image_bytes, "caption": caption, "meta": meta, "size": size}


def decode_image(image_bytes: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode an image fully into RGB (raises on a corrupt body); ``draft_size`` lets JPEG decode at reduced scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(image_bytes))
        if draft_size is not None:
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    return img.convert("RGB")


def shard_stream(
    shards: Sequence[str], *, seed: int, epoch: int, stream: int, num_streams: int
) -> Iterator[str]:
    """The endless shard sequence of one stream: positions ``stream + t x num_streams`` over the concatenated
    per-epoch shuffled orders of epochs ``epoch, epoch + 1, ...`` (see the module docstring)."""
    n = len(shards)
    position = stream
    cycle, order = -1, list(shards)
    while True:
        want = epoch + position // n
        if want != cycle:
            cycle, order = want, list(shards)
            random.Random(stable_seed(seed, "shards", cycle)).shuffle(order)
        yield order[position % n]
        position += num_streams


# ----------------------------------------------------------------------------------------------- training
class TrainStream(IterableDataset[VoltaBatch]):
    """One rank's training batches for one epoch, split over DataLoader workers; use with ``batch_size=None``.

    Yields exactly ``batches_per_epoch - start_batch`` batches of ``batch_size`` samples in total over all
    workers, in an order fixed by (seed, epoch, rank, world_size, num_workers). Constructing it does no I/O.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_views: ImageViews,
        text_views: TextViews,
        batch_size: int,
        batches_per_epoch: int,
        max_length: int,
        mlm_probability: float,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        num_workers: int,
        start_batch: int = 0,
        shuffle_buffer: int = 1000,
        max_image_pixels: int = 50_000_000,
        s3: S3Location | None = None,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not 0 <= start_batch <= batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {batches_per_epoch}], got {start_batch}")
        self.shards = list(shards)
        self.image_views = image_views
        self.text_views = text_views
        self.collate = TrainCollate(tokenizer, max_length=max_length, mlm_probability=mlm_probability)
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.start_batch = start_batch
        self.shuffle_buffer = shuffle_buffer
        self.max_image_pixels = max_image_pixels
        self.s3 = s3

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def _checked_samples(self, urls: Iterator[str], counter: SkipCounter) -> Iterator[dict[str, Any]]:
        empty_in_row = 0
        for url in urls:
            found = 0
            for raw in iter_shard_samples(url, counter, s3=self.s3):
                checked = check_sample(raw, counter, max_image_pixels=self.max_image_pixels)
                if checked is not None:
                    found += 1
                    yield checked
            empty_in_row = 0 if found else empty_in_row + 1
            if empty_in_row >= len(self.shards):
                raise RuntimeError(
                    f"{empty_in_row} shards in a row gave no usable sample; skip counts: {counter.counts}"
                )

    def __iter__(self) -> Iterator[VoltaBatch]:
        info = get_worker_info()
        workers = max(1, self.num_workers)
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != workers:
            raise ValueError(f"built for {workers} DataLoader workers, running under {info.num_workers}")
        # This worker plays the role that produced global batch start_batch + worker in the uninterrupted run.
        role = (self.start_batch + worker) % workers
        first_local = (self.start_batch + worker) // workers
        todo = len(range(self.start_batch + worker, self.batches_per_epoch, workers))
        if todo == 0:
            return
        counter = SkipCounter()
        stream, num_streams = self.rank + self.world_size * role, self.world_size * workers
        urls = shard_stream(
            self.shards, seed=self.seed, epoch=self.epoch, stream=stream, num_streams=num_streams
        )
        own = len(range(stream, len(self.shards), num_streams))  # this stream's shards of this epoch
        # Tag 0: this epoch's shards; tag 1: resampled shards of later epochs, read only if this stream runs dry.
        tagged: Iterator[tuple[int, dict[str, Any]]] = chain(
            ((0, s) for s in self._checked_samples(islice(urls, own), counter)),
            ((1, s) for s in self._checked_samples(urls, counter)),
        )
        skip = first_local * self.batch_size
        if skip:
            tagged = islice(tagged, skip, None)
            head = next(tagged)  # consumes the skipped prefix now, so its counts can be dropped
            counter.take()  # those skips were reported by the interrupted run
            tagged = chain([head], tagged)
        if self.shuffle_buffer > 0:
            rng = random.Random(stable_seed(self.seed, "buffer", self.epoch, self.rank, role))
            samples = _shuffle_segments(tagged, self.shuffle_buffer, rng)
        else:
            samples = (s for _, s in tagged)
        index = skip  # index of the next delivered sample in this worker's stream
        done = 0
        batch: list[dict[str, Any]] = []
        for sample in samples:
            try:
                img = decode_image(sample["image_bytes"])
            except Exception:
                counter.add("corrupt_image")
                continue
            sample_seed = stable_seed(self.seed, self.epoch, self.rank, role, index)
            index += 1
            image1, image2 = self.image_views(img, seed=sample_seed)  # (3, S, S) each
            caption1, caption2 = self.text_views(sample["caption"], random.Random(sample_seed))
            batch.append(
                {
                    "key": sample["key"],
                    "image_id": image_id(sample["image_bytes"]),
                    "image1": image1,
                    "image2": image2,
                    "caption1": caption1,
                    "caption2": caption2,
                    "mlm_seed": stable_seed(sample_seed, "mlm"),
                }
            )
            if len(batch) == self.batch_size:
                global_index = (first_local + done) * workers + role
                position = {"epoch": self.epoch, "next_batch": global_index + 1}
                yield self.collate(batch, counter.take(), position)
                batch = []
                done += 1
                if done == todo:
                    return


def _shuffle_segments(
    tagged: Iterator[tuple[int, dict[str, Any]]], bufsize: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    # Shuffle each run of equal tags on its own: the buffer drains at the end of the epoch's own shards, so
    # every sample of the epoch comes out before any resampled one (exactly-once holds with a buffer too).
    for _, run in groupby(tagged, key=lambda item: item[0]):
        yield from _shuffle((s for _, s in run), bufsize, bufsize, rng=rng)


# --------------------------------------------------------------------------------------------- evaluation
class EvalReader:
    """Evaluation batches over shards in their given order, each usable sample exactly once, in-process.

    Images are resized whole to ``image_size x image_size`` (no crop) so box coordinates scale linearly by
    ``image_size / orig_size``; captions are the stored ones, tokenised with character offsets. Bad samples are
    skipped and counted (:attr:`skipped` after iteration). Constructing it does no I/O.
    """

    def __init__(
        self,
        shards: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_size: int,
        max_length: int,
        batch_size: int,
        max_samples: int | None = None,
        max_image_pixels: int = 50_000_000,
        s3: S3Location | None = None,
    ) -> None:
        self.shards = list(shards)
        self.image_size = image_size
        self.transform = eval_image_transform(image_size)
        self.collate = EvalCollate(tokenizer, max_length=max_length)
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.max_image_pixels = max_image_pixels
        self.s3 = s3
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)

    def _samples(self, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        for url in self.shards:
            for raw in iter_shard_samples(url, counter, s3=self.s3):
                checked = check_sample(raw, counter, max_image_pixels=self.max_image_pixels)
                if checked is None:
                    continue
                try:
                    img = decode_image(checked["image_bytes"], draft_size=self.image_size)
                except Exception:
                    counter.add("corrupt_image")
                    continue
                yield {
                    "key": checked["key"],
                    "image": self.transform(img),  # (3, S, S)
                    "caption": checked["caption"],
                    "meta": checked["meta"],
                    "orig_size": checked["size"],
                    "image_id": image_id(checked["image_bytes"]),
                }

    def __iter__(self) -> Iterator[EvalBatch]:
        counter = SkipCounter()
        samples = self._samples(counter)
        if self.max_samples is not None:
            samples = islice(samples, self.max_samples)
        batch: list[dict[str, Any]] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)
        self.skipped = counter.take()
        if any(self.skipped.values()):
            log.warning("evaluation skipped samples: %s", {k: v for k, v in self.skipped.items() if v})
