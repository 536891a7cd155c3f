"""Collectives over the default ``torch.distributed`` process group, each the identity in one process.

The library never looks these up itself: a launcher builds :class:`Collectives` for its world and hands the
functions to the task (``all_reduce``), the optimizer (``sum_over_ranks``) and the loop (``any_rank``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["AllReduce", "Collectives", "any_rank", "differentiable_all_reduce_sum", "sum_over_ranks"]

# A differentiable sum over ranks: forward returns the sum of the tensor over all ranks, backward sums the
# incoming gradients over all ranks (the adjoint of "every rank receives the sum").
AllReduce = Callable[[Tensor], Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def differentiable_all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over the ranks, differentiably; identity when not distributed.

    Built on ``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces (sums) the gradient, so
    a loss built from global sums and evaluated identically on every rank back-propagates each rank's share.
    """
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


def sum_over_ranks(x: Tensor) -> Tensor:
    """Sum a tensor over ranks, not differentiably (LARS's whole-parameter norms under ZeRO); a copy when reduced."""
    if _distributed():
        x = x.clone()
        dist.all_reduce(x)
    return x


def any_rank(flag: bool) -> bool:
    """OR of ``flag`` over ranks (one tiny all-reduce)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclass(frozen=True)
class Collectives:
    """The collectives one rank of a run uses; ``all_reduce`` is None in one process (the task's fast path)."""

    all_reduce: AllReduce | None
    sum_over_ranks: Callable[[Tensor], Tensor]
    any_rank: Callable[[bool], bool]

    @classmethod
    def for_world(cls, world_size: int) -> Collectives:
        """torch.distributed collectives when ``world_size > 1`` (the process group must exist), else identities."""
        if world_size > 1:
            return cls(differentiable_all_reduce_sum, sum_over_ranks, any_rank)
        return cls(None, lambda x: x, lambda flag: flag)
