"""Device names as users and recipes write them (``auto``, ``cpu``, ``cuda``, ``cuda:1``), resolved in one place for
the Python API, the evaluation commands and the training ranks."""

from __future__ import annotations

import torch

from volta.errors import UsageError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device, local_rank: int | None = None) -> torch.device:
    """``device`` as a ``torch.device``; one-line :class:`~volta.errors.UsageError` for a bad name or missing CUDA.

    ``"auto"`` is CUDA when available, else the CPU. A CUDA device without an index (``"cuda"``, or ``"auto"`` on a
    GPU host) takes ``local_rank``'s GPU when given (a training rank), else the current one; ``"cuda:1"`` stays
    as written. A ``torch.device`` is returned unchanged.
    """
    if isinstance(device, torch.device):
        return device
    name = device
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"device {name!r}: {err}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r}: no CUDA device available on this machine")
        if resolved.index is None and local_rank is not None:
            resolved = torch.device("cuda", local_rank)
    return resolved
