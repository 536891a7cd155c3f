"""Linear probe: multinomial logistic regression (scikit-learn) on frozen image features.

Features are standardised with the training split's statistics; the reported baseline is the same probe on the
features of a randomly initialised model of the same architecture (:func:`fresh_model_like`), so the number says
how much pre-training adds over an untrained encoder.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor
from transformers import RobertaConfig

from volta.config import ModelConfig
from volta.eval.features import EvalFeatures
from volta.models.factory import build_model
from volta.models.volta_model import VoLTAModel

__all__ = ["fresh_model_like", "labelled", "linear_probe", "split_indices"]

log = logging.getLogger(__name__)


def split_indices(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into (train, test) index arrays, both non-empty when ``n >= 2``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 labelled samples to split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def labelled(features: EvalFeatures) -> tuple[Tensor, list[Any]]:
    """The image features ``(M, Di)`` (backbone means) and labels of the samples that carry a ``label``."""
    rows = [i for i, label in enumerate(features.labels) if label is not None]
    return features.image_global[rows], [features.labels[i] for i in rows]


def linear_probe(
    train_x: Tensor | np.ndarray,
    train_y: Sequence[Any],
    test_x: Tensor | np.ndarray,
    test_y: Sequence[Any],
    *,
    c: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Fit a logistic-regression probe on ``(train_x, train_y)`` and score it on ``(test_x, test_y)``.

    Labels may be any hashable values (ints or class names). Returns ``acc`` (test accuracy), ``majority``
    (accuracy of always predicting the most frequent training label), ``n_train``, ``n_test`` and ``classes``.
    Raises ``ValueError`` when the training split holds fewer than two classes.
    """
    xtr = np.asarray(train_x, dtype=np.float64)
    xte = np.asarray(test_x, dtype=np.float64)
    ytr, yte = np.asarray(list(train_y)), np.asarray(list(test_y))
    classes = sorted(set(ytr.tolist()), key=str)
    if len(classes) < 2:
        raise ValueError(f"the probe's training split needs at least 2 classes, got {classes}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    probe.fit(xtr, ytr)
    majority = Counter(ytr.tolist()).most_common(1)[0][0]
    return {
        "acc": float((probe.predict(xte) == yte).mean()),
        "majority": float((yte == majority).mean()),
        "n_train": float(len(ytr)),
        "n_test": float(len(yte)),
        "classes": float(len(set(ytr.tolist()) | set(yte.tolist()))),
    }


def fresh_model_like(model: VoLTAModel, cfg: ModelConfig, *, seed: int) -> VoLTAModel:
    """A randomly initialised model with ``model``'s architecture (same config and text config), seeded.

    Built without reading any weights or the network; the global torch RNG state is left untouched.
    """
    text_config = RobertaConfig.from_dict(model.text_encoder.config.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_model(cfg, text_config=text_config)
    device = next(model.parameters()).device
    return fresh.to(device)
