"""In-loop validation: retrieval recall@K and GOT grounding accuracy on a held-out shard set, as flat metrics.

The trainer calls :func:`run_validation` every ``train.val_every`` steps on rank 0; the sweep optimises
``val/grounding_acc``. One pass over the shards computes everything (:func:`evaluate_pass`), which the offline
``volta eval`` command shares.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from volta.config import VoltaConfig
from volta.data.batch import EvalBatch
from volta.data.factory import build_config_eval_loader
from volta.eval.features import EvalFeatures, extract_features
from volta.eval.grounding import GroundingTally, ground_batch
from volta.eval.itm import ItmTally, itm_batch
from volta.eval.retrieval import evaluate_retrieval
from volta.models.volta_model import VoLTAModel, VoLTAOutputs

__all__ = ["EvalPass", "evaluate_pass", "run_validation"]

log = logging.getLogger(__name__)


@dataclass
class EvalPass:
    """What one pass over an evaluation set gathered: global features and the grounding outcomes."""

    features: EvalFeatures
    grounding: GroundingTally
    itm: ItmTally


def evaluate_pass(
    model: VoLTAModel,
    cfg: VoltaConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    shards: str | Sequence[str],
    device: torch.device | str,
    max_samples: int | None = None,
    batch_size: int | None = None,
    grounding: bool = True,
) -> EvalPass:
    """Read ``shards`` once (at most ``max_samples``, batches of ``batch_size`` or ``eval.batch_size``) and
    collect the global features of every sample and, when ``grounding``, the pointing-game outcome of every
    groundable phrase. Raises ``FileNotFoundError`` for missing shards and ``ValueError`` for an empty set."""
    loader = build_config_eval_loader(cfg, tokenizer, shards, batch_size=batch_size, max_samples=max_samples)
    tally, itm = GroundingTally(), ItmTally()
    pairs = torch.Generator().manual_seed(cfg.train.seed)  # the same held-out pairs at every validation

    def on_batch(batch: EvalBatch, outputs: VoLTAOutputs) -> None:
        if grounding:
            tally.add(ground_batch(model, batch, outputs, cfg.eval.grounding_got(cfg.loss.got)))
        if cfg.eval.itm and batch.batch_size > 1:
            itm.add(*itm_batch(model, batch, device, pairs))

    features = extract_features(model, loader, device=device, on_batch=on_batch)
    return EvalPass(features, tally, itm)


def run_validation(
    model: VoLTAModel,
    cfg: VoltaConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    shards: str | Sequence[str],
    device: torch.device | str,
    max_samples: int | None,
) -> dict[str, float]:
    """Validation metrics of ``model`` (the bare :class:`VoLTAModel`, not an engine wrapper) on ``shards``.

    Returns flat floats: ``val/i2t_r{k}`` and ``val/t2i_r{k}`` for every K of ``eval.retrieval_ks`` (Barlow
    Twins projections), ``val/local_i2t_r{k}``/``val/local_t2i_r{k}`` (means of the GOT token projections),
    ``val/global_i2t_r{k}``/``val/global_t2i_r{k}`` when both backbones have the same width,
    ``val/retrieval_n_images``/``val/retrieval_n_texts``, and, when ``eval.grounding`` is on and the shards
    carry boxes, ``val/grounding_acc``, ``val/grounding_random``, ``val/grounding_center``, ``val/grounding_other``
    (misses on another named object), ``val/grounding_n`` and the same per phrase type (``val/grounding_acc/<type>``, ...), and with
    ``eval.itm`` the held-out image-text matching ``val/itm_acc`` (balanced), ``val/itm_acc_pos``/``_neg``. The model's
    train/eval mode is restored; no gradients are computed.
    """
    start = time.perf_counter()
    result = evaluate_pass(
        model,
        cfg,
        tokenizer,
        shards=shards,
        device=device,
        max_samples=max_samples,
        grounding=cfg.eval.grounding,
    )
    metrics: dict[str, float] = {}
    for name, value in evaluate_retrieval(result.features, cfg.eval.retrieval_ks).items():
        metrics[f"val/retrieval_{name}" if name.startswith("n_") else f"val/{name}"] = value
    for name, value in result.grounding.summary().items():
        metrics[f"val/grounding_{name}"] = value
    for name, value in result.itm.summary().items():
        metrics[f"val/itm_{name}"] = value
    if cfg.eval.grounding and not result.grounding.count:
        log.info("validation: no groundable phrase in %s (no boxes whose phrase is in the caption)", shards)
    log.info(
        "validation on %d samples in %.1fs: %s",
        len(result.features),
        time.perf_counter() - start,
        ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "/" not in k[4:]),
    )
    return metrics
