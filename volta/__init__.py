"""volta: cluster-scale pre-training of VoLTA vision-language models.

The library (this package) holds the model, the losses, the data pipeline, evaluation and the training loop.
It never imports Ray or DeepSpeed; the ``orchestration`` package wraps it for clusters.

``volta.load(path_or_url)`` (:mod:`volta.api`) returns ``model, preprocess, tokenizer`` for inference; it is
imported on first use (PEP 562), so ``import volta`` stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from volta.api import load

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from volta.api import load as _load

        return _load
    raise AttributeError(f"module 'volta' has no attribute {name!r}")
