"""Loss functions of VoLTA: pure tensor functions, collectives injected by the caller."""

from volta.losses.barlow_twins import barlow_twins_loss
from volta.losses.got import cosine_cost, got_contrastive_loss, got_loss, prune_cost
from volta.losses.itm import itm_loss, sample_itm_pairs
from volta.losses.mlm import mlm_loss
from volta.losses.ot import gromov_wasserstein, gromov_wasserstein_value, ipot, sinkhorn

__all__ = [
    "barlow_twins_loss",
    "cosine_cost",
    "got_contrastive_loss",
    "got_loss",
    "gromov_wasserstein",
    "gromov_wasserstein_value",
    "ipot",
    "itm_loss",
    "mlm_loss",
    "prune_cost",
    "sample_itm_pairs",
    "sinkhorn",
]
