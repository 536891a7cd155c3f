"""One evaluation pass over shards: dual-encoder outputs per batch and the global features of every sample.

Evaluation always runs the model as a dual encoder (fusion off), in eval mode and without gradients, so the
features of a sample do not depend on the other samples of its batch. :func:`extract_features` collects the
backbone means and Barlow Twins projections of every sample and hands each batch's outputs to an optional
callback, so that grounding (which needs the token features) is computed in the same single pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volta.data.batch import EvalBatch
from volta.models.volta_model import VoLTAModel, VoLTAOutputs

__all__ = ["EvalFeatures", "evaluating", "extract_features", "forward_dual", "model_dtype"]

log = logging.getLogger(__name__)


@dataclass
class EvalFeatures:
    """Per-sample global features of an evaluation set, in reading order, as float32 CPU tensors.

    ``image_global (N, Di)`` / ``text_global (N, Dt)`` are the backbone means, ``image_bt`` / ``text_bt (N, D)``
    the Barlow Twins projector outputs, ``image_ids (N,)`` the image hashes (equal for captions of one image),
    ``labels`` the JSON ``label`` of each sample (None when absent) and ``keys`` the sample keys.
    ``image_local`` / ``text_local (N, G)`` are the means of the GOT token projections (every patch; every real
    word token, special tokens left out): the global features of the space the local alignment loss trains.
    """

    image_global: Tensor
    text_global: Tensor
    image_bt: Tensor
    text_bt: Tensor
    image_ids: Tensor
    labels: list[Any] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    image_local: Tensor | None = None
    text_local: Tensor | None = None

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (bf16 under DeepSpeed bf16, else usually fp32)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and disable gradients for the block; restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def forward_dual(model: VoLTAModel, batch: EvalBatch, device: torch.device | str) -> VoLTAOutputs:
    """Dual-encoder (fusion off) outputs of an evaluation batch on ``device``; call under :func:`evaluating`.

    Images are cast to the model's parameter dtype so that a bf16 model (DeepSpeed) can be evaluated directly.
    """
    images = batch.images.to(device=device, dtype=model_dtype(model))  # (B, 3, S, S)
    input_ids = batch.input_ids.to(device)  # (B, T)
    attention_mask = batch.attention_mask.to(device)  # (B, T)
    return model(images, input_ids, attention_mask, fusion=False)


def _local_means(model: VoLTAModel, out: VoLTAOutputs, batch: EvalBatch) -> tuple[Tensor, Tensor]:
    """Means of the L2-normalised GOT token projections (what the GOT cost compares): every patch ``(B, G)``
    and every word token, special tokens and padding left out ``(B, G)``; float32 on the CPU."""
    got = model.got_projections(out)
    image = F.normalize(got.image.float(), dim=-1).mean(1)  # (B, G)
    specials = batch.special_tokens_mask.to(got.text_mask.device).bool()
    words = (got.text_mask.bool() & ~specials).unsqueeze(-1)  # (B, T, 1)
    text = (F.normalize(got.text.float(), dim=-1) * words).sum(1) / words.sum(1).clamp(min=1)  # (B, G)
    return image.cpu(), text.cpu()


def extract_features(
    model: VoLTAModel,
    batches: Iterable[EvalBatch],
    *,
    device: torch.device | str,
    on_batch: Callable[[EvalBatch, VoLTAOutputs], None] | None = None,
) -> EvalFeatures:
    """Run the dual encoder over ``batches`` (eval mode, no grad) and gather every sample's global features.

    ``on_batch(batch, outputs)`` is called for each batch with the model's outputs on ``device`` (still inside
    eval mode and no-grad), e.g. to compute GOT plans for grounding in the same pass. The model's train/eval mode
    is restored afterwards. Raises ``ValueError`` when ``batches`` holds no sample.
    """
    image_global: list[Tensor] = []
    text_global: list[Tensor] = []
    image_bt: list[Tensor] = []
    text_bt: list[Tensor] = []
    image_local: list[Tensor] = []
    text_local: list[Tensor] = []
    image_ids: list[Tensor] = []
    labels: list[Any] = []
    keys: list[str] = []
    with evaluating(model):
        for batch in batches:
            out = forward_dual(model, batch, device)
            bt = model.bt_projections(out)
            image_global.append(out.image_global.float().cpu())  # (B, Di)
            text_global.append(out.text_global.float().cpu())  # (B, Dt)
            image_bt.append(bt.image.float().cpu())  # (B, D)
            text_bt.append(bt.text.float().cpu())  # (B, D)
            local_image, local_text = _local_means(model, out, batch)
            image_local.append(local_image)  # (B, G)
            text_local.append(local_text)  # (B, G)
            image_ids.append(batch.image_ids.cpu())  # (B,)
            labels.extend(meta.get("label") for meta in batch.metas)
            keys.extend(batch.keys)
            if on_batch is not None:
                on_batch(batch, out)
    if not keys:
        raise ValueError("the evaluation shards hold no usable sample")
    log.debug("extracted features of %d samples", len(keys))
    return EvalFeatures(
        image_global=torch.cat(image_global),  # (N, Di)
        text_global=torch.cat(text_global),  # (N, Dt)
        image_bt=torch.cat(image_bt),  # (N, D)
        text_bt=torch.cat(text_bt),  # (N, D)
        image_ids=torch.cat(image_ids),  # (N,)
        labels=labels,
        keys=keys,
        image_local=torch.cat(image_local),  # (N, G)
        text_local=torch.cat(text_local),  # (N, G)
    )
