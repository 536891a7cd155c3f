"""bench.workload and bench.step: random batches shaped for a recipe, and the step benchmark's variants."""

from __future__ import annotations

import math

import pytest
import torch

from bench import step
from bench.workload import random_batch
from tests.fixtures_task import tiny_config
from volta.task import build_task

VOCAB = 300


def test_random_batch_is_shaped_for_the_recipe_and_trains() -> None:
    cfg = tiny_config()
    batch = random_batch(cfg, 3, VOCAB, seed=1)
    size, length = cfg.model.image.img_size, cfg.model.text.max_length
    first, second = batch.views
    assert first.images.shape == second.images.shape == (3, 3, size, size)
    assert first.input_ids.shape == second.mlm_labels.shape == (3, length)
    assert int(first.input_ids.max()) < VOCAB and batch.image_ids.unique().numel() == 3
    assert bool((first.mlm_labels != -100).any())  # something to predict
    assert torch.equal(random_batch(cfg, 3, VOCAB, seed=1).views[0].images, first.images)  # seeded
    torch.manual_seed(0)
    out = build_task(cfg, VOCAB)(batch)
    assert {"bt_loss", "got_loss", "mlm_loss", "itm_loss", "loss"} <= set(out)
    assert all(math.isfinite(float(v)) for v in out.values())
    assert first.swap_input_ids is None  # the debug recipe has no swap negatives
    swap = tiny_config("loss.got.contrastive.weight=0.5", "loss.got.contrastive.swap_negatives=true")
    view = random_batch(swap, 3, VOCAB, seed=1).views[0]
    assert view.swap_input_ids is not None and view.swap_valid is not None and bool(view.swap_valid.all())
    changed = view.swap_input_ids != view.input_ids
    assert changed.sum(dim=1).tolist() == [2, 2, 2] and not bool(changed[view.special_tokens_mask].any())
    assert "got_swap_acc" in build_task(swap, VOCAB)(random_batch(swap, 3, VOCAB, seed=1))


@pytest.mark.timeout(240)
def test_step_benchmark_variants_match_the_baseline_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step, "cpu_bf16_support", lambda: {"supported": False, "isa_flags": []})
    report = step.run(
        "configs/debug.yaml",
        steps=1,
        warmup=1,
        rounds=1,
        variants=["no_prefix_sharing", "grad_checkpointing", "bf16"],
        vocab_size=VOCAB,
        batch_size=2,
        threads=1,
    )
    assert set(report["variants"]) == {"fp32", "no_prefix_sharing", "grad_checkpointing"}
    assert "bf16" in report["skipped"]  # not run where the CPU has no native bf16
    for res in report["variants"].values():
        assert res["samples_per_s"] > 0 and res["peak_rss_mb"] >= res["rss_start_mb"] > 0
        assert len(res["losses"]) == 2 and res["batch_size"] == 2
    ratios = report["ratios"]
    # Same weights, batches and draws: recomputing the prefix or checkpointing changes no loss.
    assert ratios["no_prefix_sharing"]["loss_max_rel_diff"] < 1e-4
    assert ratios["grad_checkpointing"]["loss_max_rel_diff"] < 1e-5
    assert ratios["prefix_sharing_speedup"] == pytest.approx(
        1 / ratios["no_prefix_sharing"]["samples_per_s_ratio"]
    )


def test_cpu_bf16_support_reports_flags_and_onednn() -> None:
    info = step.cpu_bf16_support()
    assert set(info) == {"isa_flags", "onednn_bf16", "supported"}
    assert info["supported"] == (bool(info["isa_flags"]) and info["onednn_bf16"] is not False)
