"""Loss functions of VoLTA: pure tensor functions, collectives injected by the caller."""

from volta.losses.barlow_twins import AllReduce, barlow_twins_loss, differentiable_all_reduce_sum
from volta.losses.got import cosine_cost, got_contrastive_loss, got_loss, prune_cost
from volta.losses.itm import itm_loss, sample_itm_pairs
from volta.losses.ot import gromov_wasserstein, gromov_wasserstein_value, ipot, sinkhorn

__all__ = [
    "AllReduce",
    "barlow_twins_loss",
    "cosine_cost",
    "differentiable_all_reduce_sum",
    "got_contrastive_loss",
    "got_loss",
    "gromov_wasserstein",
    "gromov_wasserstein_value",
    "ipot",
    "itm_loss",
    "prune_cost",
    "sample_itm_pairs",
    "sinkhorn",
]
