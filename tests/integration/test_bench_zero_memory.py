"""bench.zero_memory on real DeepSpeed engines: 2 gloo ranks, stage 2 against stage 0, debug recipe."""

from __future__ import annotations

import pytest

from bench.zero_memory import _ratios, analytic_bytes, measure_engines
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("precision,optimizer", [("fp32", "adamw"), ("bf16", "adamw"), ("bf16", "lars")])
def test_stage2_halves_optimizer_state_per_rank_with_two_ranks(precision: str, optimizer: str) -> None:
    config = str(REPO / "configs" / "debug.yaml")
    s0 = measure_engines(config, [], stage=0, precision=precision, optimizer=optimizer, vocab_size=300)
    s2 = measure_engines(config, [], stage=2, precision=precision, optimizer=optimizer, vocab_size=300)
    assert s0["optimizer"] == s2["optimizer"] == optimizer
    assert s2["wrapper"] == "DeepSpeedZeroOptimizer" and s0["wrapper"] != s2["wrapper"]
    p = s0["trainable_parameters"]
    b0, b2 = s0["per_rank_bytes"], s2["per_rank_bytes"]
    ratios = _ratios(b2, b0)
    assert ratios["optimizer_state"] == pytest.approx(0.5, abs=0.01)
    assert ratios["gradients"] is not None
    if optimizer == "lars":  # one group per parameter: every gradient straddles a boundary and stays whole
        assert ratios["gradients"] == pytest.approx(1.0, abs=0.01)
    else:  # halved, plus the whole gradients of the parameters on the partition boundaries
        assert 0.45 < ratios["gradients"] < 0.6
    # fp32 stage 0 updates the model's own weights; ZeRO keeps an fp32 master partition in every precision.
    assert b2["master_weights"] == pytest.approx(4 * p / 2, rel=0.01)
    assert (b0["master_weights"] == 0) == (precision == "fp32")
    assert b2["reduce_buckets"] > 0 and b0["reduce_buckets"] == 0
    for stage, measured in ((0, b0), (2, b2)):
        model = analytic_bytes(p, optimizer=optimizer, precision=precision, stage=stage, world_size=2)
        assert measured["optimizer_state"] == pytest.approx(model["optimizer_state"], rel=0.01)
        assert measured["master_weights"] == pytest.approx(model["master_weights"], rel=0.01)
    # The ZeRO stage changes where state lives, not the computation: same weights, batches and losses.
    for r0, r2 in zip(s0["ranks"], s2["ranks"]):
        assert r0["rank"] == r2["rank"] and r0["loss"] == pytest.approx(r2["loss"], rel=1e-5)
