"""DeepSpeed engine knobs: batch sizes come only from the volta config, and the filled config agrees with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestration.deepspeed_engine import CONFIG_DIR, build_deepspeed_config, deepspeed_config_path
from tests.conftest import REPO
from volta.config import load_config

OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@pytest.mark.parametrize("name", ["zero2_bf16.json", "zero2_fp16.json", "zero2_cpu.json"])
def test_knob_files_hold_no_batch_sizes_and_are_stage_2(name: str) -> None:
    ds = json.loads((CONFIG_DIR / name).read_text())
    assert not any(k in ds for k in OWNED)
    assert ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    ("recipe", "world", "on_gpu"),
    [("base.yaml", 8, True), ("debug.yaml", 2, False), ("debug.yaml", 1, False)],
)
def test_filled_config_agrees_with_volta_config(recipe: str, world: int, on_gpu: bool) -> None:
    cfg = load_config(REPO / "configs" / recipe, [f"ray.num_workers={world}"])
    ds = build_deepspeed_config(cfg, world_size=world, on_gpu=on_gpu)
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == cfg.gradient_accumulation_steps
    assert (
        ds["train_batch_size"]
        == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    )
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage
    assert ds["bf16"]["enabled"] == (cfg.train.precision == "bf16")
    assert "fp16" not in ds


def test_file_choice_by_device_and_precision(tmp_path: Path) -> None:
    base = load_config(REPO / "configs" / "base.yaml")
    assert deepspeed_config_path(base, on_gpu=True).name == "zero2_bf16.json"
    assert deepspeed_config_path(base, on_gpu=False).name == "zero2_cpu.json"
    fp16 = load_config(REPO / "configs" / "base.yaml", ["train.precision=fp16"])
    assert deepspeed_config_path(fp16, on_gpu=True).name == "zero2_fp16.json"
    assert build_deepspeed_config(fp16, world_size=8, on_gpu=True)["fp16"]["enabled"] is True


def test_knob_file_setting_a_batch_size_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    cfg = load_config(REPO / "configs" / "debug.yaml", [f"train.deepspeed_config={bad}"])
    with pytest.raises(ValueError, match="must not set"):
        build_deepspeed_config(cfg, world_size=2, on_gpu=False)
