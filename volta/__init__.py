"""volta: cluster-scale pre-training of VoLTA vision-language models.

The library (this package) holds the model, the losses, the data pipeline, evaluation and the training loop.
It never imports Ray or DeepSpeed; the ``orchestration`` package wraps it for clusters.
"""

__version__ = "0.1.0"
