"""bench.zero_memory's analytic model of the ZeRO layouts, and the parameter count it starts from."""

from __future__ import annotations

import pytest

from bench.zero_memory import analytic_bytes, meta_parameter_count, reduce_bucket_bytes
from tests.conftest import REPO
from volta.config import load_config

P = 1_000_000


@pytest.mark.parametrize("optimizer,floats", [("adamw", 2), ("lars", 1)])
def test_stage2_divides_state_master_and_gradients_by_the_ranks(optimizer: str, floats: int) -> None:
    s0 = analytic_bytes(P, optimizer=optimizer, precision="bf16", stage=0, world_size=4)
    s2 = analytic_bytes(P, optimizer=optimizer, precision="bf16", stage=2, world_size=4)
    assert s0["optimizer_state"] == 4 * floats * P and s2["optimizer_state"] == s0["optimizer_state"] / 4
    assert s0["master_weights"] == 4 * P and s2["master_weights"] == P  # fp32 copies of bf16 weights
    assert s0["gradients"] == 2 * P
    # LARS's one group per parameter leaves every gradient whole in ZeRO-2's buffer (measured on the engines).
    assert s2["gradients"] == (2 * P if optimizer == "lars" else 2 * P / 4)
    assert s0["parameters_bytes"] == s2["parameters_bytes"] == 2 * P  # ZeRO-2 does not shard parameters


def test_fp32_stage0_needs_no_master_copy_but_zero_keeps_one() -> None:
    assert (
        analytic_bytes(P, optimizer="adamw", precision="fp32", stage=0, world_size=2)["master_weights"] == 0
    )
    assert (
        analytic_bytes(P, optimizer="adamw", precision="fp32", stage=2, world_size=2)["master_weights"]
        == 2 * P
    )


def test_the_base_recipe_is_counted_on_the_meta_device() -> None:
    meta = meta_parameter_count(str(REPO / "configs" / "base.yaml"), [])
    assert meta["trainable_parameters"] == 272_698_591  # the README's parameter budget
    assert meta["optimizer"] == "lars" and meta["precision"] == "bf16" and meta["vocab_size"] == 50_265
    # zero2_bf16.json: 2e8-element buckets, double-buffered (overlap_comm), bf16.
    assert reduce_bucket_bytes(load_config(REPO / "configs" / "base.yaml")) == 2 * 200_000_000 * 2
