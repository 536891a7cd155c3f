"""Zero-shot classification: class embeddings from prompt templates, top-K accuracy on labelled shards.

As in CLIP/OpenCLIP, each class name is put into every template (``"a photo of a {}."``), the prompts are
encoded, and the class embedding is the mean of the unit-norm prompt embeddings, renormalised. An image is
assigned the classes whose embeddings are most similar (cosine) to its unit-norm image feature. Features are the
ones :class:`~volta.api.VoltaDualEncoder` gives (Barlow Twins projections of the global features).

Labels come from the samples' JSON, field ``label`` by default (as the linear probe reads it): an integer is an
index into the class list (0-based, e.g. the synthetic data's shape index), a string a class name (exact match).
A missing or unknown label stops the evaluation with one line naming the shard and the sample.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from volta.data.batch import EvalBatch
from volta.data.factory import build_config_eval_loader
from volta.data.s3 import S3Location
from volta.data.shards import resolve_shards

if TYPE_CHECKING:
    from volta.api import VoltaDualEncoder

__all__ = [
    "DEFAULT_TEMPLATES",
    "label_index",
    "labelled_batches",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]

log = logging.getLogger(__name__)

# A short OpenCLIP-like prompt set; ``{}`` is replaced by the class name.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a {}.",
)


def zeroshot_classifier(
    model: VoltaDualEncoder,
    tokenizer: Callable[[Sequence[str]], Mapping[str, Tensor]],
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> Tensor:
    """Class embeddings ``(C, D)``: per class, the mean of its unit-norm prompt embeddings, renormalised.

    Every template must contain ``{}`` (replaced by the class name). ``model.similarity(image_features,
    classifier)`` then gives the ``(B, C)`` class scores.
    """
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"prompt template {bad[0]!r} has no '{{}}' for the class name")
    rows = []
    for name in classnames:
        prompts = [t.replace("{}", name) for t in templates]
        embeddings = F.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)  # (K, D)
        rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))  # (D,)
    return torch.stack(rows)  # (C, D)


def label_index(label: Any, classnames: Sequence[str]) -> int:
    """The class index of a JSON label: an int indexes ``classnames``, a string is a class name.

    Raises ``ValueError`` (one line, without the sample's location) for a missing or unknown label.
    """
    if label is None:
        raise ValueError("no label")
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(classnames):
            return label
        raise ValueError(f"label {label} is not a class index (0..{len(classnames) - 1})")
    if isinstance(label, str):
        try:
            return list(classnames).index(label)
        except ValueError:
            shown = ", ".join(classnames[:8]) + (", ..." if len(classnames) > 8 else "")
            raise ValueError(f"label {label!r} is not one of the classes ({shown})") from None
    raise ValueError(f"label {label!r} is neither a class index nor a class name")


def labelled_batches(
    model: VoltaDualEncoder,
    shards: str | Sequence[str],
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> Iterator[tuple[str, EvalBatch]]:
    """Evaluation batches of ``shards`` with the shard each came from, read in order as ``volta eval`` reads them.

    At most ``max_samples`` samples in all; batches of ``batch_size`` (default ``eval.batch_size``). Raises
    ``FileNotFoundError`` when the shards do not exist.
    """
    cfg = model.config
    remaining = max_samples
    for url in resolve_shards(shards, s3=S3Location.from_storage(cfg.storage)):
        if remaining is not None and remaining <= 0:
            return
        loader = build_config_eval_loader(
            cfg, model.tokenizer.tokenizer, [url], batch_size=batch_size, max_samples=remaining
        )
        for batch in loader:
            if remaining is not None:
                remaining -= batch.batch_size
            yield url, batch


def zeroshot_accuracy(
    model: VoltaDualEncoder,
    classifier: Tensor,
    classnames: Sequence[str],
    shards: str | Sequence[str],
    *,
    label_field: str = "label",
    ks: Sequence[int] = (1, 5),
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> dict[str, float]:
    """Top-K zero-shot accuracy of ``classifier (C, D)`` (from :func:`zeroshot_classifier`) on labelled shards.

    Every sample needs its JSON ``label_field`` (see :func:`label_index`); a missing or unknown one raises
    ``ValueError`` naming the shard and the sample. Returns ``top{k}`` for each K (a hit when the label is among
    the K highest-scoring classes; K at least the class count is always a hit), ``majority`` (the accuracy of
    always answering the most frequent label), ``n`` (samples) and ``classes``. Raises ``ValueError`` when the
    shards hold no usable sample and ``FileNotFoundError`` when they do not exist.
    """
    if classifier.ndim != 2 or classifier.shape[0] != len(classnames):
        raise ValueError(f"classifier must be (C={len(classnames)}, D), got {tuple(classifier.shape)}")
    hits = dict.fromkeys(ks, 0)
    labels: list[int] = []
    for url, batch in labelled_batches(model, shards, batch_size=batch_size, max_samples=max_samples):
        targets = []
        for key, meta in zip(batch.keys, batch.metas):
            try:
                targets.append(label_index(meta.get(label_field), classnames))
            except ValueError as err:
                raise ValueError(f"{url}: sample {key!r}: {err} in JSON field {label_field!r}") from None
        target = torch.tensor(targets)  # (B,)
        scores = model.similarity(
            model.encode_image(batch.images), classifier.to(model.device)
        ).cpu()  # (B, C)
        for k in ks:
            top = scores.topk(min(k, len(classnames)), dim=-1).indices  # (B, k)
            hits[k] += int((top == target[:, None]).any(dim=-1).sum())
        labels.extend(targets)
    if not labels:
        raise ValueError(f"{shards}: the shards hold no usable sample")
    n = len(labels)
    out = {f"top{k}": hits[k] / n for k in ks}
    out["majority"] = Counter(labels).most_common(1)[0][1] / n
    out["n"] = float(n)
    out["classes"] = float(len(classnames))
    log.debug("zero-shot accuracy over %d samples: %s", n, out)
    return out
