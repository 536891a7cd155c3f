"""The per-worker training stream and the evaluation reader over WebDataset shards.

Training stream of one DataLoader worker (all stages are plain, picklable objects, safe under spawn and Ray):

1. **Shards.** Epoch ``e``'s shard order is the shard list shuffled with ``(seed, e)``; the orders of epochs
   ``e, e+1, ...`` are concatenated into one endless sequence of positions. Split by node, then by worker: stream
   ``g = rank + world_size x worker`` reads positions ``g, g + W*N, g + 2*W*N, ...``, so within an epoch every
   shard goes to exactly one stream, and a stream that runs dry continues into the next epoch's order
   (resampling) instead of stopping, so every rank yields the same number of batches.
2. **Read and check** (webdataset's tar iterator and key grouping): samples with a missing or unreadable part are
   skipped and counted by reason (:data:`SKIP_REASONS`); a truncated or unreadable shard stops at the break,
   is counted, and the stream goes on with its next shard. Every sample read whole before the break is kept
   (:func:`iter_shard_samples`), and as each shard belongs to one stream, the loss shifts no other stream. The
   checks here are cheap: the image header is parsed, the pixels are not decoded.
3. **Shuffle** in a seeded buffer of ``shuffle_buffer`` samples (raw bytes, before decoding).
4. **Fast-forward** (resume only): draw and drop the first ``c`` shuffled samples without decoding them, where
   ``c`` is how many this worker role had drawn by the end of its last batch before the resume point.
5. **Decode** the image (a corrupt body is skipped and counted), build two image views and two caption views,
   each seeded from ``(seed, epoch, rank, worker, sample index)``.
6. **Batch**: tokenise, MLM-mask, and attach the skip counts and the resume position (:class:`TrainCollate`):
   ``{"epoch", "next_batch", "consumed": {role: c}}``, ``c`` counting the shuffled samples drawn so far,
   corrupt bodies included.

Batch ``i`` of a rank's epoch comes from worker ``i mod N`` (the DataLoader's round-robin order). Resuming at
``(epoch, start_batch=k, consumed)``, ``consumed`` being the ``"consumed"`` maps of batches ``0..k-1`` merged,
gives DataLoader worker ``j`` the role of worker ``(k + j) mod N`` starting at its batch ``(k + j) // N``, and
fast-forwards as in step 4. Steps 1-3 are a pure function of the shards' bytes and the seed, so the replay
rebuilds the shuffle buffer exactly as the interrupted run had it: **the resumed batches are the uninterrupted
run's batches k, k+1, ...** (samples, order, views, masks, positions), with any shuffle buffer and with corrupt
image bodies before the resume point. So over an interruption every sample is delivered as often as without
one (once per epoch when the shards split evenly over the streams), and the skip counts of the replayed prefix
are not reported again. This holds for the same
shards, seed, world size and ``num_workers``; a shard cut short stays cut at the same place, and an S3 body that
breaks off mid-stream is resumed byte-exactly (:mod:`volta.data.s3_opener`). A resume costs reading and
checking, not decoding, the worker's samples before the resume point. A position without ``consumed`` (older
checkpoints) assumes ``B`` drawn samples per batch: exact unless an image body before the resume point was
corrupt, each of which then shifts that role's stream by one sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain, groupby, islice
from typing import IO, Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase
from webdataset.filters import _shuffle
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from volta.data.batch import EvalBatch, EvalCollate, TrainCollate, VoltaBatch, image_id
from volta.data.s3 import S3Location
from volta.data.shards import open_shard
from volta.data.views import ImageViews, TextViews, eval_image_transform, swap_words
from volta.errors import DataError

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
    off (truncated tar, read error after retries) as ``truncated_shard``, and every sample read whole before the
    break is kept. A member is either read whole or not at all, so the sample being assembled at the break is
    complete when the break fell inside a member of the next sample; when the break fell in a tar header (the
    member's name unknown), it is kept only if it has the same files as the sample before it.
    """
    errors: list[BaseException] = []
    in_flight = _MemberInFlight()
    yielded = 0
    previous: frozenset[str] | None = None
    pending: dict[str, Any] | None = None
    try:
        with open_shard(url, s3=s3) as stream:
            for sample in group_by_keys(_files_until_error(stream, url, errors, in_flight)):
                if pending is not None:
                    yielded += 1
                    previous = _parts(pending)
                    yield pending
                pending = sample
    except Exception as exc:  # data errors of any kind must not kill a training run
        errors.append(exc)
        pending = None
    if pending is not None and (not errors or _is_whole(pending, previous, in_flight.name)):
        yielded += 1
        yield pending
    if errors:
        first = errors[0]
        reason = "unreadable_shard" if yielded == 0 and _is_open_error(first) else "truncated_shard"
        counter.add(reason)
        log.warning("%s: %s after %d sample(s) (%s: %s)", url, reason, yielded, type(first).__name__, first)


def _parts(sample: dict[str, Any]) -> frozenset[str]:
    return frozenset(k for k in sample if not k.startswith("__"))


def _is_whole(sample: dict[str, Any], previous: frozenset[str] | None, broken_member: str | None) -> bool:
    # The sample assembled when a shard broke off: whole if the member cut belongs to another sample; when the
    # break fell in a header (no member name), judged by having the same files as the sample before it.
    if broken_member is not None:
        return base_plus_ext(broken_member)[0] != sample["__key__"]
    return _parts(sample) == previous


class _MemberInFlight:
    """webdataset's ``select_files`` hook: remembers the name of the tar member whose data is being read."""

    def __init__(self) -> None:
        self.name: str | None = None

    def __call__(self, name: str) -> bool:
        self.name = name
        return True


def _files_until_error(
    stream: IO[bytes], url: str, errors: list[BaseException], in_flight: _MemberInFlight
) -> Iterator[dict[str, Any]]:
    # Ends the file stream quietly at the first read error, recording it, so the grouping stage can hand over
    # the samples completed so far; ``in_flight.name`` is then the member whose data broke off (None: a header).
    try:
        for f in tar_file_iterator(stream, select_files=in_flight):
            in_flight.name = None  # read whole
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
    workers, in an order fixed by (seed, epoch, rank, world_size, num_workers). To resume after a batch, pass
    its ``position``: ``start_batch=position["next_batch"]`` and ``consumed`` merged over the batches read so far
    (without ``consumed``, each worker role skips ``batch_size`` samples per batch it made, exact unless an image
    body was corrupt). Constructing it does no I/O.
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
        consumed: Mapping[int, int] | Mapping[str, int] | None = None,
        shuffle_buffer: int = 1000,
        max_image_pixels: int = 50_000_000,
        s3: S3Location | None = None,
        render_on: str = "cpu",
        swap_negatives: bool = False,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not 0 <= start_batch <= batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {batches_per_epoch}], got {start_batch}")
        workers = max(1, num_workers)
        self.consumed = {int(role): int(n) for role, n in (consumed or {}).items()}
        for worker in range(workers):
            role, first_local = (start_batch + worker) % workers, (start_batch + worker) // workers
            if self.consumed.get(role, first_local * batch_size) < first_local * batch_size:
                raise ValueError(
                    f"consumed[{role}]={self.consumed[role]} is fewer than the {first_local} batches of "
                    f"{batch_size} that worker role {role} made before batch {start_batch}: a position of a "
                    "run with other data settings?"
                )
        self.shards = list(shards)
        self.image_views = image_views
        self.text_views = text_views
        self.collate = TrainCollate(
            tokenizer,
            max_length=max_length,
            mlm_probability=mlm_probability,
            image_size=image_views.image_size,
        )
        self.render_on = render_on
        self.swap_negatives = swap_negatives
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
                raise DataError(
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
        if self.shuffle_buffer > 0:
            rng = random.Random(stable_seed(self.seed, "buffer", self.epoch, self.rank, role))
            samples = _shuffle_segments(tagged, self.shuffle_buffer, rng)
        else:
            samples = (s for _, s in tagged)
        # Fast-forward: replay the stream, shuffle included, up to where this role's next batch began.
        consumed = self.consumed.get(role, first_local * self.batch_size)
        if consumed:
            deque(islice(samples, consumed), maxlen=0)  # read and shuffled, not decoded
            counter.take()  # those skips were reported by the interrupted run
        index = first_local * self.batch_size  # index of the next delivered sample in this worker's stream
        done = 0
        batch: list[dict[str, Any]] = []
        for sample in samples:
            consumed += 1
            sample_seed = stable_seed(self.seed, self.epoch, self.rank, role, index)
            width, height = sample["size"]
            try:
                array, plan = self.image_views.decode(
                    sample["image_bytes"], self.image_views.plan(width, height, sample_seed)
                )
            except Exception:
                counter.add("corrupt_image")
                continue
            index += 1
            item: dict[str, Any] = {"key": sample["key"], "image_id": image_id(sample["image_bytes"])}
            if self.render_on == "device":
                item |= {"raw": torch.from_numpy(array.copy()), "plan": plan}  # (H, W, 3) uint8, writable
            else:
                item["image1"], item["image2"] = self.image_views.render(array, plan)  # (3, S, S) uint8 each
            item["caption1"], item["caption2"] = self.text_views(
                sample["caption"], random.Random(sample_seed)
            )
            item["mlm_seed"] = stable_seed(sample_seed, "mlm")
            if self.swap_negatives:
                swap_rng = random.Random(stable_seed(sample_seed, "swap"))
                item["swap1"] = swap_words(item["caption1"], swap_rng)
                item["swap2"] = swap_words(item["caption2"], swap_rng)
            batch.append(item)
            if len(batch) == self.batch_size:
                global_index = (first_local + done) * workers + role
                position = {"epoch": self.epoch, "next_batch": global_index + 1, "consumed": {role: consumed}}
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
