"""The Python API: ``model, preprocess, tokenizer = volta.load(path_or_url)``, as OpenCLIP users expect.

:func:`load` reads a saved VoLTA model (a local folder or an ``s3://`` prefix) and returns a
:class:`VoltaDualEncoder`, the evaluation image transform and a :class:`CaptionTokenizer`. The model runs as the
evaluation commands run it: a dual encoder (fusion off), in eval mode, without gradients. The same loading
(:func:`load_checkpoint`, :func:`load_matching_tokenizer`, :func:`resolve_device`) serves ``volta eval``.

Example (docs/evaluation.md, "Python API")::

    model, preprocess, tokenizer = volta.load("runs/debug/final")
    image = model.encode_image(preprocess(picture)[None])          # (1, D), unit norm
    text = model.encode_text(["a red circle", "a blue star"])      # (2, D), unit norm
    scores = model.similarity(image, text)                         # (1, 2) cosine similarities
    maps = model.ground(picture, "a red circle")                   # [("red", (h, w)), ("circle", (h, w))]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from transformers import PreTrainedTokenizerBase

from volta.config import VoltaConfig
from volta.data.batch import EvalCollate
from volta.data.s3 import S3Location, make_s3_client, split_s3_url
from volta.data.views import eval_image_transform
from volta.devices import resolve_device
from volta.errors import UsageError
from volta.eval.features import evaluating, model_dtype
from volta.eval.heatmap import batch_heatmap_rows
from volta.models.export import (
    CHECKPOINT_FILES,
    checkpoint_subfolder,
    find_volta_checkpoint,
    load_volta_checkpoint,
    not_a_checkpoint_message,
)
from volta.models.heads import masked_mean
from volta.models.volta_model import VoLTAModel

__all__ = [
    "CaptionTokenizer",
    "VoltaDualEncoder",
    "default_cache_dir",
    "download_s3_checkpoint",
    "load",
    "load_checkpoint",
    "load_matching_tokenizer",
    "resolve_device",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the model
class CaptionTokenizer:
    """Captions to ``{"input_ids", "attention_mask"}`` tensors ``(B, L)``, tokenised as evaluation does.

    Pads to the model's caption length ``max_length`` and truncates longer captions, like the evaluation
    loader, so :meth:`VoltaDualEncoder.encode_text` gives the features ``volta eval`` computes. The Hugging Face
    tokenizer itself is :attr:`tokenizer`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        """Tokenise one caption or a list of captions."""
        enc = self.tokenizer(
            [texts] if isinstance(texts, str) else list(texts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # (B, L) each


class VoltaDualEncoder:
    """A trained VoLTA model run as a dual encoder (fusion off, eval mode, no gradients) for research use.

    ``encode_image`` / ``encode_text`` give the L2-normalised Barlow Twins projections of the global features
    (mean image token, mean real text token): the features of the retrieval evaluation (``i2t_r*``/``t2i_r*``),
    which additionally standardises each modality over the evaluation set before the cosine. ``ground`` gives
    the per-word transport mass of the GOT plan, as the heat maps draw it. The wrapped :class:`VoLTAModel`,
    its config and the tokenizer are :attr:`model`, :attr:`config` and :attr:`tokenizer`.
    """

    def __init__(self, model: VoLTAModel, config: VoltaConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.config = config
        self.tokenizer = CaptionTokenizer(tokenizer, config.model.text.max_length)
        # v2.RGB first: a grayscale or RGBA picture becomes the RGB input the model was trained on.
        self.preprocess = v2.Compose([v2.RGB(), eval_image_transform(config.model.image.img_size)])

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> VoltaDualEncoder:
        """Move the model to ``device`` (in place); returns self."""
        self.model.to(resolve_device(device))
        return self

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm image features ``(B, D)`` of preprocessed images ``(B, 3, S, S)`` (``preprocess`` output).

        The Barlow Twins projection of the mean final Swin token, as the retrieval evaluation computes it;
        float32 on the model's device.
        """
        size = self.config.model.image.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"expected images of shape (B, 3, {size}, {size}) as preprocess makes them, "
                f"got {tuple(images.shape)}"
            )
        with evaluating(self.model):
            tokens = self.model.image_encoder(images.to(self.device, model_dtype(self.model)))  # (B, P, Di)
            projected = self.model.bt_image_projector(tokens.mean(dim=1))  # (B, D)
        return F.normalize(projected.float(), dim=-1)

    def encode_text(self, texts: str | Sequence[str] | Mapping[str, Tensor]) -> Tensor:
        """Unit-norm caption features ``(B, D)`` of captions or of a token batch from :attr:`tokenizer`.

        The Barlow Twins projection of the mean over real (non-padding) final RoBERTa states, as the retrieval
        evaluation computes it; float32 on the model's device.
        """
        tokens = texts if isinstance(texts, Mapping) else self.tokenizer(texts)
        input_ids = tokens["input_ids"].to(self.device)  # (B, L)
        attention_mask = tokens["attention_mask"].to(self.device)  # (B, L)
        with evaluating(self.model):
            hidden = self.model.text_encoder(input_ids, attention_mask)  # (B, L, Dt)
            projected = self.model.bt_text_projector(masked_mean(hidden, attention_mask))  # (B, D)
        return F.normalize(projected.float(), dim=-1)

    def similarity(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Similarity matrix ``(B_img, B_txt)``: dot products of the features, cosines for :meth:`encode_*` output."""
        return image_features.float() @ text_features.float().T  # (B_img, B_txt)

    def ground(self, image: Image.Image, caption: str, *, upsample: bool = False) -> list[tuple[str, Tensor]]:
        """Per content word of ``caption`` (stop words skipped), where its GOT transport mass lies on ``image``.

        Each map is the plan's mass of the word's tokens over the final patch grid ``(h, w)``, unnormalised, as
        ``volta visualize`` computes it (it scales each map to its own [min, max] for drawing); with
        ``upsample`` the map is interpolated bilinearly to the picture's ``(H, W)``. Words truncated away with
        the caption's tail have no map. CPU tensors, in caption order.
        """
        picture = image.convert("RGB")
        sample = {
            "key": "0",
            "image": self.preprocess(picture),  # (3, S, S)
            "caption": caption,
            "meta": {},
            "orig_size": picture.size,
            "image_id": 0,
        }
        batch = EvalCollate(self.tokenizer.tokenizer, max_length=self.tokenizer.max_length)([sample])
        row = batch_heatmap_rows(self.model, self.config, batch, device=self.device, pictures=[picture])[0]
        if not upsample:
            return row.maps
        size = (picture.height, picture.width)
        return [
            (
                word,
                F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[
                    0, 0
                ],
            )
            for word, heat in row.maps
        ]


# ------------------------------------------------------------------------------------------------ loading
def default_cache_dir() -> Path:
    """Where S3 checkpoints are downloaded: ``$XDG_CACHE_HOME/volta`` (default ``~/.cache/volta``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "volta"


def download_s3_checkpoint(
    url: str, *, cache_dir: str | Path | None = None, s3: S3Location | None = None
) -> Path:
    """Download the volta checkpoint at ``s3://bucket/prefix`` into the cache; returns the local folder.

    The prefix may hold the checkpoint itself, a run's ``final/`` or an engine checkpoint's ``volta/`` (the
    layouts :func:`~volta.models.export.find_volta_checkpoint` accepts); only the checkpoint's files are
    fetched, into ``cache_dir/bucket/prefix[/final|/volta]``, and a file already there with the object's size and
    modification time is not fetched again. The endpoint is ``s3`` or, by default, ``AWS_ENDPOINT_URL`` /
    ``AWS_ENDPOINT_URL_S3``.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        bucket, prefix = split_s3_url(url)
    except ValueError as err:
        raise UsageError(str(err)) from None
    prefix = prefix.strip("/")
    client = make_s3_client(s3)
    heads: dict[str, dict[str, Any] | None] = {}

    def head(relative: str) -> dict[str, Any] | None:
        if relative not in heads:
            key = f"{prefix}/{relative}" if prefix else relative
            try:
                heads[relative] = client.head_object(Bucket=bucket, Key=key)
            except ClientError as err:
                if str(err.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                    raise UsageError(f"{url}: cannot read s3://{bucket}/{key} ({err})") from None
                heads[relative] = None
            except BotoCoreError as err:
                raise UsageError(f"{url}: cannot reach S3 ({err})") from None
        return heads[relative]

    def has_file(relative: str) -> bool:
        return head(relative) is not None

    sub = checkpoint_subfolder(has_file)
    if sub is None:
        raise UsageError(not_a_checkpoint_message(url, has_file))
    folder = Path(cache_dir or default_cache_dir()).expanduser() / bucket / prefix / sub
    folder.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        relative = f"{sub}/{name}" if sub else name
        info = head(relative)
        assert info is not None  # checkpoint_subfolder saw it
        target = folder / name
        mtime = info["LastModified"].timestamp()
        stat = target.stat() if target.is_file() else None
        if stat is not None and stat.st_size == info["ContentLength"] and stat.st_mtime == mtime:
            continue
        partial = target.with_name(f".{name}.part-{os.getpid()}")
        key = f"{prefix}/{relative}" if prefix else relative
        try:
            client.download_file(bucket, key, str(partial))
        except (BotoCoreError, ClientError) as err:
            partial.unlink(missing_ok=True)
            raise UsageError(f"{url}: cannot download s3://{bucket}/{key} ({err})") from None
        os.utime(partial, (mtime, mtime))
        partial.replace(target)
        log.info("downloaded s3://%s/%s to %s", bucket, key, target)
    return folder


def load_checkpoint(
    path_or_url: str | Path, *, cache_dir: str | Path | None = None, s3: S3Location | None = None
) -> tuple[VoLTAModel, VoltaConfig, Path]:
    """The model and config of a saved volta checkpoint, and the local folder they were read from.

    ``path_or_url`` is a :func:`~volta.models.export.save_volta_checkpoint` folder or a file in it, a run folder
    (its ``final/``), an engine checkpoint folder (its ``volta/``), or any of these on S3 (``s3://bucket/prefix``,
    downloaded by :func:`download_s3_checkpoint`). Raises :class:`~volta.errors.UsageError` with one line when
    there is no checkpoint or its weights do not fit the architecture it describes.
    """
    if str(path_or_url).startswith("s3://"):
        folder = download_s3_checkpoint(str(path_or_url), cache_dir=cache_dir, s3=s3)
    else:
        try:
            folder = find_volta_checkpoint(path_or_url)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
    try:
        model, cfg = load_volta_checkpoint(folder)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    except RuntimeError as err:  # weights that do not fit the architecture the folder describes
        first = str(err).strip().splitlines()[0]
        raise UsageError(f"{folder}: cannot load the weights ({first})") from None
    return model, cfg, folder


def load_matching_tokenizer(name: str, vocab_size: int | None) -> PreTrainedTokenizerBase:
    """The tokenizer ``name`` (hub name or folder), checked to fit a model vocabulary of ``vocab_size`` rows
    (None: no model yet, nothing to check).

    Raises :class:`~volta.errors.UsageError` with one line when it cannot be loaded or has more tokens than
    the model has rows (then it is not the run's tokenizer).
    """
    from volta.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"cannot load tokenizer {name!r} ({first}); pass the run's tokenizer folder"
        ) from None
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UsageError(
            f"tokenizer {name!r} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: "
            "pass the run's tokenizer"
        )
    return tokenizer


def load(
    path_or_url: str | Path,
    device: str | torch.device = "cpu",
    *,
    tokenizer: str | None = None,
    cache_dir: str | Path | None = None,
    s3: S3Location | None = None,
) -> tuple[VoltaDualEncoder, v2.Compose, CaptionTokenizer]:
    """Load a trained VoLTA model for inference: ``model, preprocess, tokenizer = volta.load(path_or_url)``.

    ``path_or_url`` is what :func:`load_checkpoint` accepts (a run folder, its ``final/``, a checkpoint folder,
    or ``s3://bucket/prefix``, cached under ``cache_dir``, default ``~/.cache/volta``). ``preprocess`` turns a
    PIL image into the model's input tensor ``(3, S, S)`` (resized whole, no crop; ImageNet normalisation) and
    ``tokenizer`` captions into token tensors; ``tokenizer=`` names the caption tokenizer when the run's config
    (``data.tokenizer``) does not point at it on this machine. Raises :class:`~volta.errors.UsageError` (one
    line) for a missing checkpoint, tokenizer or device.
    """
    model, cfg, folder = load_checkpoint(path_or_url, cache_dir=cache_dir, s3=s3)
    hf_tokenizer = load_matching_tokenizer(tokenizer or cfg.tokenizer_name, model.vocab_size)
    encoder = VoltaDualEncoder(model.to(resolve_device(device)).eval(), cfg, hf_tokenizer)
    log.info("loaded the VoLTA model in %s on %s", folder, encoder.device)
    return encoder, encoder.preprocess, encoder.tokenizer
