"""Zero-shot image-text retrieval: recall@K in both directions from global features (cosine similarity).

Samples that share an image (several captions of one picture, recognised by equal ``image_ids``) are one gallery
image: image-to-text retrieval counts a hit when *any* of the image's captions is within the top K, text-to-image
retrieval when the caption's own image is. Ties are counted against the query (a collapsed model whose features
are all equal scores the chance level, not 100%).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from volta.eval.features import EvalFeatures

__all__ = ["evaluate_retrieval", "group_by_image", "recall_at_k", "retrieval_metrics", "standardize"]

log = logging.getLogger(__name__)


def recall_at_k(similarity: Tensor, text_image: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K both ways from a similarity matrix ``(Ni, Nt)`` between gallery images and captions.

    ``text_image (Nt,)`` gives the index of each caption's image. Returns ``i2t_r{k}`` and ``t2i_r{k}`` as
    fractions in [0, 1]: an image is retrieved correctly at K when fewer than K captions of *other* images score
    at least as high as its best caption; a caption when fewer than K other images score at least as high as
    its own image.
    """
    num_images, num_texts = similarity.shape
    if text_image.shape != (num_texts,):
        raise ValueError(f"text_image must be ({num_texts},), got {tuple(text_image.shape)}")
    sim = similarity.float()
    positive = text_image.unsqueeze(0) == torch.arange(num_images).unsqueeze(1)  # (Ni, Nt)
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every gallery image needs at least one caption")
    best = sim.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (Ni, 1)
    i2t_rank = ((sim >= best) & ~positive).sum(dim=1)  # (Ni,) other-image captions at or above the best match
    own = sim.gather(0, text_image.unsqueeze(0))  # (1, Nt) similarity of each caption to its image
    t2i_rank = (sim >= own).sum(dim=0) - 1  # (Nt,) other images at or above the caption's own image
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean())
    return out


def group_by_image(image_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Gallery of distinct images: the first sample index of each distinct id ``(Ni,)`` (in reading order) and
    the gallery index of every sample ``(N,)``."""
    first: dict[int, int] = {}
    text_image = torch.empty(image_ids.shape[0], dtype=torch.int64)
    for i, value in enumerate(image_ids.tolist()):
        text_image[i] = first.setdefault(int(value), len(first))
    gallery = torch.empty(len(first), dtype=torch.int64)
    for i in range(image_ids.shape[0] - 1, -1, -1):  # walk backwards so the first occurrence wins
        gallery[text_image[i]] = i
    return gallery, text_image


def standardize(x: Tensor) -> Tensor:
    """Subtract the per-dimension mean over the set and divide by the standard deviation (floored), ``(N, D)``.

    Barlow Twins aligns batch-standardised embeddings, so the projector outputs are compared in that frame.
    """
    mean = x.mean(dim=0, keepdim=True)  # (1, D)
    std = x.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-6)  # (1, D)
    return (x - mean) / std


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    image_ids: Tensor,
    ks: Sequence[int],
    *,
    standardize_features: bool = False,
) -> dict[str, float]:
    """Recall@K both ways between per-sample image features ``(N, D)`` and caption features ``(N, D)``.

    Samples with equal ``image_ids (N,)`` form one gallery image (its features from the first such sample);
    every sample's caption is a query and a gallery caption. Similarity is cosine, after standardising each
    modality over the set when ``standardize_features`` is set. Adds ``n_images`` and ``n_texts``.
    """
    if image_features.shape[0] != text_features.shape[0] or image_features.shape[0] != image_ids.shape[0]:
        raise ValueError("image features, text features and image ids must have one row per sample")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image and text features differ in width ({image_features.shape[1]} vs {text_features.shape[1]})"
        )
    gallery, text_image = group_by_image(image_ids)
    images = image_features[gallery].float()  # (Ni, D)
    texts = text_features.float()  # (Nt, D)
    if standardize_features:
        images, texts = standardize(images), standardize(texts)
    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T  # (Ni, Nt)
    out = recall_at_k(similarity, text_image, ks)
    out["n_images"] = float(images.shape[0])
    out["n_texts"] = float(texts.shape[0])
    return out


def evaluate_retrieval(features: EvalFeatures, ks: Sequence[int]) -> dict[str, float]:
    """Retrieval metrics of an evaluation set: the Barlow Twins projections (standardised, cosine) as
    ``i2t_r{k}``/``t2i_r{k}``; the means of the GOT token projections (standardised, cosine) as
    ``local_i2t_r{k}``/``local_t2i_r{k}`` when extracted; and the backbone means (raw cosine) as
    ``global_i2t_r{k}``/``global_t2i_r{k}`` when the two backbones have the same width (otherwise they are not
    comparable and are left out). No VoLTA loss aligns the two backbones' spaces: the Barlow Twins loss aligns
    the projector outputs and GOT the token projections, so those are the global features that can retrieve."""
    out = retrieval_metrics(
        features.image_bt, features.text_bt, features.image_ids, ks, standardize_features=True
    )
    if features.image_local is not None and features.text_local is not None:
        local = retrieval_metrics(
            features.image_local, features.text_local, features.image_ids, ks, standardize_features=True
        )
        out.update({f"local_{k}": v for k, v in local.items() if not k.startswith("n_")})
    di, dt = features.image_global.shape[1], features.text_global.shape[1]
    if di == dt:
        glob = retrieval_metrics(features.image_global, features.text_global, features.image_ids, ks)
        out.update({f"global_{k}": v for k, v in glob.items() if not k.startswith("n_")})
    else:
        log.debug("backbone widths differ (%d vs %d): no retrieval from the backbone means", di, dt)
    return out
