"""Can the data pipeline feed the GPU? Two-view samples/s per CPU core at the paper setting, against what one GPU
consumes, and the answer users need: cores per GPU.

- **Source images:** photo-like JPEGs at COCO sizes (640x480, 480x640, 640x427, 500x375, 612x612, 640x360;
  multi-scale colour texture, shapes with edges, sensor grain; quality 93, ~150 kB on average; COCO's average ~160 kB).
- **Pipelines, per sample, one core** (one process, one thread), measured alternately, best of ``--repeats``:
  - ``baseline``: the paper's pipeline written plainly with torchvision on PIL images (PIL decode; per view
    RandomResizedCrop (bicubic), flip, ColorJitter p 0.8, grayscale p 0.2, Gaussian blur (PIL, as the Barlow
    Twins code), solarize, ToTensor + Normalize), then per-sample tokenisation and MLM masking.
  - ``volta``: ``ImageViews.from_bytes`` (uint8 OpenCV views, reduced-scale JPEG decode when it applies) and
    volta's batched collate (tokenisation of the whole batch, MLM masks) divided by the batch size.
  - ``volta_decode_only``: the CPU cost per sample when the views are rendered on the device
    (``data.views.render_on: device``): decode plus the collate.
  The image views have the same parameter distributions (tests/unit/test_augment.py); captions and masks are
  the same functions.
- **Consumption:** FLOPs of one forward + backward of the base recipe (Swin-B 384 + RoBERTa-base, fusion depth
  6, prefix sharing on, random weights) counted by ``torch.utils.flop_counter`` on this CPU (3 min, 9 GB; cached
  in ``bench/flops-cache.json`` under a hash of the resolved recipe and the library versions); samples/s one
  GPU consumes = MFU x bf16 peak / FLOPs per sample, at 35% and 50% MFU on an H100 SXM (989 TFLOP/s).
- **Device rendering** (``--device cuda``): samples/s of ``render_views_batched`` on the GPU at the recipe's
  batch size, for the record.

``python -m bench.feed [--samples N] [--repeats R] [--device cuda] [--out FILE]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

log = logging.getLogger(__name__)

COCO_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (612, 612), (640, 360))
H100_BF16_TFLOPS = 989.0
MFU_TARGETS = (0.35, 0.50)
RECIPE = "configs/base.yaml"
FLOPS_CACHE = Path(__file__).with_name("flops-cache.json")
_WORDS = [
    "a",
    "the",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "small",
    "large",
    "sits",
    "on",
    "next",
    "to",
    "under",
    "holding",
    "riding",
    "street",
    "table",
    "plate",
    "of",
    "food",
    "with",
    "two",
    "people",
    "standing",
    "near",
    "white",
    "black",
    "green",
    "wooden",
    "bus",
    "train",
]


# --------------------------------------------------------------------------------------------- source images
def photo_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 93) -> bytes:
    """A photo-like JPEG: colour texture at six scales, 5-14 filled shapes with hard edges, and sensor grain."""
    field = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90), (8, 50), (16, 30), (32, 20), (64, 12), (128, 8)):
        coarse = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        for c in range(3):
            up = Image.fromarray(coarse[..., c]).resize((width, height), Image.Resampling.BICUBIC)
            field[..., c] += amplitude * np.asarray(up)
    picture = Image.fromarray(np.clip(field + 120, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(5, 15))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    grain = np.asarray(picture).astype(np.float32) + rng.normal(0, 14, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_samples(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """``n`` (jpeg, caption) pairs; images cycle through 24 distinct pictures (decode cost does not depend on
    content repeats, and making hundreds of pictures would dominate the run)."""
    rng = np.random.default_rng(seed)
    pictures = [photo_jpeg(rng, *COCO_SIZES[i % len(COCO_SIZES)]) for i in range(24)]
    captions = [" ".join(rng.choice(_WORDS, size=int(rng.integers(8, 16)))) for _ in range(n)]
    return [(pictures[i % len(pictures)], captions[i]) for i in range(n)]


# --------------------------------------------------------------------------------------------------- pipelines
class _PILBlur:
    """Gaussian blur on a PIL image with sigma ~ U(0.1, 2.0), as the Barlow Twins reference code does."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class _PILSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, 128) if random.random() < self.p else img


def baseline_views(size: int) -> tuple[Callable[[Image.Image], torch.Tensor], ...]:
    """The two views of the paper's recipe, written plainly with torchvision transforms on PIL images."""
    import torchvision.transforms as T

    from volta.data.views import IMAGENET_MEAN, IMAGENET_STD

    def view(blur_p: float, solarize_p: float) -> Callable[[Image.Image], torch.Tensor]:
        return T.Compose(
            [
                T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                _PILBlur(blur_p),
                _PILSolarize(solarize_p),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    return view(1.0, 0.0), view(0.1, 0.2)


def _run_baseline(samples: list[tuple[bytes, str]], size: int, tokenizer: Any, max_length: int) -> float:
    from volta.data.masking import mask_tokens

    views = baseline_views(size)
    special_ids = set(tokenizer.all_special_ids)
    start = time.perf_counter()
    for image_bytes, caption in samples:
        img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        images = [v(img) for v in views]
        for text in (caption, caption):
            enc = tokenizer(
                text, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt"
            )
            ids = enc["input_ids"]
            special = torch.tensor([[i in special_ids for i in ids[0].tolist()]])
            mask_tokens(
                ids,
                special,
                mask_token_id=int(tokenizer.mask_token_id),
                vocab_size=len(tokenizer),
                probability=0.15,
                generator=torch.Generator().manual_seed(0),
            )
        del images
    return len(samples) / (time.perf_counter() - start)


def _run_volta(
    samples: list[tuple[bytes, str]],
    size: int,
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    *,
    render: bool,
) -> float:
    from volta.data.batch import TrainCollate
    from volta.data.pipeline import stable_seed
    from volta.data.views import ImageViews, TextViews

    views, texts = ImageViews(size), TextViews()
    collate = TrainCollate(tokenizer, max_length=max_length, mlm_probability=0.15, image_size=size)
    start = time.perf_counter()
    batch: list[dict[str, Any]] = []
    for index, (image_bytes, caption) in enumerate(samples):
        seed = stable_seed(0, index)
        with Image.open(io.BytesIO(image_bytes)) as header:
            width, height = header.size
        array, plan = views.decode(image_bytes, views.plan(width, height, seed))
        item: dict[str, Any] = {"key": str(index), "image_id": index, "mlm_seed": seed}
        if render:
            item["image1"], item["image2"] = views.render(array, plan)
        else:
            item |= {"raw": torch.from_numpy(array.copy()), "plan": plan}
        item["caption1"], item["caption2"] = texts(caption, random.Random(seed))
        batch.append(item)
        if len(batch) == batch_size:
            collate(batch, {}, {})
            batch = []
    return len(samples) / (time.perf_counter() - start)


def measure_cpu(samples: int, *, image_size: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Samples/s per core of the baseline, volta, and volta's decode-only path; best of ``repeats`` rounds."""
    import cv2

    from volta.data.tokenizer import train_bpe_tokenizer

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    data = make_samples(samples)
    with tempfile.TemporaryDirectory(prefix="volta-bench-feed-") as tmp:
        tokenizer = train_bpe_tokenizer([c for _, c in data], Path(tmp) / "tok", vocab_size=600)
    max_length = 40
    runs: dict[str, Callable[[], float]] = {
        "baseline": lambda: _run_baseline(data, image_size, tokenizer, max_length),
        "volta": lambda: _run_volta(data, image_size, tokenizer, max_length, batch_size, render=True),
        "volta_decode_only": lambda: _run_volta(
            data, image_size, tokenizer, max_length, batch_size, render=False
        ),
    }
    best: dict[str, float] = {}
    for round_ in range(repeats):
        for name, fn in runs.items():
            rate = fn()
            log.info("round %d %s: %.1f samples/s", round_, name, rate)
            best[name] = max(best.get(name, 0.0), rate)
    return {
        "source_kb_mean": round(float(np.mean([len(b) for b, _ in data[:24]])) / 1000, 1),
        "samples_per_s_per_core": {k: round(v, 1) for k, v in best.items()},
        "volta_over_baseline": round(best["volta"] / best["baseline"], 2),
    }


# ------------------------------------------------------------------------------------------------ consumption
def _versions() -> dict[str, str]:
    import timm
    import transformers

    return {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__}


def count_recipe_flops(recipe: str = RECIPE, *, batch_size: int = 2) -> float:
    """FLOPs of one forward + backward per sample of ``recipe``'s task with random weights, on this CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.workload import random_batch, recipe_vocab_size
    from volta.config import load_config
    from volta.task import build_task

    config = load_config(recipe, ["model.image.pretrained=false", "model.text.pretrained=false"])
    vocab = recipe_vocab_size(config)
    torch.manual_seed(0)
    task = build_task(config, vocab)
    task.train()
    counter = FlopCounterMode(display=False)
    with counter:
        task(random_batch(config, batch_size, vocab))["loss"].backward()
    return float(counter.get_total_flops()) / batch_size


def recipe_flops(recipe: str = RECIPE, *, recount: bool = False) -> dict[str, Any]:
    """The recipe's FLOPs per sample, from the cache when the resolved recipe and library versions match."""
    from volta.config import load_config

    config = load_config(recipe, ["model.image.pretrained=false", "model.text.pretrained=false"])
    key = hashlib.sha256(
        json.dumps(
            {"config": config.model_dump(mode="json"), "versions": _versions()}, sort_keys=True
        ).encode()
    ).hexdigest()
    cache = json.loads(FLOPS_CACHE.read_text()) if FLOPS_CACHE.exists() else {}
    if not recount and key in cache:
        return {**cache[key], "cached": True}
    start = time.perf_counter()
    flops = count_recipe_flops(recipe)
    entry = {
        "recipe": recipe,
        "gflop_per_sample": round(flops / 1e9, 1),
        "counted_in_s": round(time.perf_counter() - start, 1),
        "versions": _versions(),
    }
    cache[key] = entry
    FLOPS_CACHE.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
    return {**entry, "cached": False}


def consumption(
    gflop_per_sample: float, per_core: float, peak_tflops: float = H100_BF16_TFLOPS
) -> dict[str, Any]:
    """Samples/s one GPU consumes at each MFU target, and the cores per GPU that ``per_core`` needs for it."""
    out: dict[str, Any] = {}
    for mfu in MFU_TARGETS:
        gpu_rate = mfu * peak_tflops * 1e12 / (gflop_per_sample * 1e9)
        out[f"mfu_{round(mfu * 100)}"] = {
            "gpu_samples_per_s": round(gpu_rate, 1),
            "cores_per_gpu": round(gpu_rate / per_core, 1),
        }
    return out


# ------------------------------------------------------------------------------------------- device rendering
def measure_device(device: str, *, image_size: int, batch_size: int, steps: int = 10) -> dict[str, Any]:
    """Samples/s of both views rendered by ``render_views_batched`` on ``device`` (decoded images on it)."""
    from volta.data.augment import render_views_batched
    from volta.data.views import ImageViews

    views = ImageViews(image_size)
    data = make_samples(batch_size)
    decoded = []
    for index, (image_bytes, _) in enumerate(data):
        with Image.open(io.BytesIO(image_bytes)) as header:
            size = header.size
        array, plan = views.decode(image_bytes, views.plan(*size, index))
        decoded.append((torch.from_numpy(array.copy()).permute(2, 0, 1).to(device), plan))
    images = [d[0] for d in decoded]

    def step() -> None:
        for v in (0, 1):
            render_views_batched(images, [d[1][v] for d in decoded], image_size)

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "device": device,
        "batch_size": batch_size,
        "samples_per_s": round(steps * batch_size / (time.perf_counter() - start), 1),
    }


def run(
    samples: int = 192,
    *,
    image_size: int = 384,
    batch_size: int = 32,
    repeats: int = 2,
    device: str | None = None,
    recount: bool = False,
) -> dict[str, Any]:
    """The whole benchmark; returns the report (see the module docstring)."""
    report: dict[str, Any] = {"image_size": image_size, "samples": samples, "batch_size": batch_size}
    report["cpu"] = measure_cpu(samples, image_size=image_size, batch_size=batch_size, repeats=repeats)
    report["flops"] = recipe_flops(recount=recount)
    per_core = report["cpu"]["samples_per_s_per_core"]
    gflop = report["flops"]["gflop_per_sample"]
    report["consumption_h100"] = {
        name: consumption(gflop, per_core[name]) for name in ("baseline", "volta", "volta_decode_only")
    }
    if device is not None:
        report["device_render"] = measure_device(device, image_size=image_size, batch_size=batch_size)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=192, help="samples per measured pass")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is kept")
    parser.add_argument("--device", default=None, help="also time rendering the views on this device (cuda)")
    parser.add_argument("--recount", action="store_true", help="count the recipe's FLOPs again")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = run(
        args.samples,
        image_size=args.image_size,
        batch_size=args.batch_size,
        repeats=args.repeats,
        device=args.device,
        recount=args.recount,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    cpu, flops = r["cpu"], r["flops"]
    print(
        f"two-view pipeline at {r['image_size']} px from COCO-sized photo-like JPEGs ({cpu['source_kb_mean']} kB), "
        f"one core, best of {args.repeats}"
    )
    print(f"base recipe: {flops['gflop_per_sample']} GFLOP per sample (forward + backward, counted)")
    print(f"{'pipeline':20s} {'samples/s/core':>14s} {'cores/GPU @35%':>15s} {'cores/GPU @50%':>15s}")
    for name, rate in cpu["samples_per_s_per_core"].items():
        c = r["consumption_h100"][name]
        print(
            f"{name:20s} {rate:14.1f} {c['mfu_35']['cores_per_gpu']:15.1f} {c['mfu_50']['cores_per_gpu']:15.1f}"
        )
    gpu = r["consumption_h100"]["volta"]
    print(
        f"one H100 consumes {gpu['mfu_35']['gpu_samples_per_s']} samples/s at 35% MFU, "
        f"{gpu['mfu_50']['gpu_samples_per_s']} at 50%; volta / baseline: {cpu['volta_over_baseline']}x per core"
    )
    if "device_render" in r:
        print(
            f"views rendered on {r['device_render']['device']}: {r['device_render']['samples_per_s']} samples/s"
        )


if __name__ == "__main__":
    main()
