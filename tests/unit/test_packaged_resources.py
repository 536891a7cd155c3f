"""Recipes and DeepSpeed engine settings as package data: one copy, reachable by name or path from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.deepspeed_engine import CONFIG_DIR, deepspeed_config_path
from tests.conftest import REPO
from volta.config import ConfigError, load_config
from volta.config.loading import RECIPES_DIR, packaged_recipes, recipe_file


@pytest.mark.parametrize(
    ("packaged", "top_level"), [(RECIPES_DIR, REPO / "configs"), (CONFIG_DIR, REPO / "deepspeed_configs")]
)
def test_packaged_folders_are_the_top_level_folders(packaged: Path, top_level: Path) -> None:
    # One source of truth: the package folders are symlinks to what users edit, never a second copy.
    assert packaged.is_symlink()
    assert packaged.resolve() == top_level.resolve()


def test_packaged_recipe_names_load_like_their_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # outside the repository: only the package can supply them
    assert {"base", "debug", "demo"} <= set(packaged_recipes())
    assert load_config("debug") == load_config(REPO / "configs" / "debug.yaml")
    assert load_config("base", ["train.max_steps=3"]).train.max_steps == 3


def test_an_existing_file_wins_over_a_packaged_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "debug").write_text("train: {max_steps: 7}\n")
    assert recipe_file("debug") == Path("debug")
    assert load_config("debug").train.max_steps == 7


@pytest.mark.parametrize("name", ["nope", "configs/nope.yaml", "debug.yaml", "../configs/debug"])
def test_unknown_recipe_names_the_packaged_ones(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"recipe file not found \(packaged recipes: base, debug, demo"):
        load_config(name)


@pytest.mark.parametrize(
    ("precision", "on_gpu", "name"),
    [("fp32", False, "zero2_cpu.json"), ("bf16", True, "zero2_bf16.json"), ("fp16", True, "zero2_fp16.json")],
)
def test_default_engine_settings_come_from_the_package(precision: str, on_gpu: bool, name: str) -> None:
    device = "cuda" if on_gpu else "cpu"
    config = load_config("debug", [f"train.precision={precision}", f"train.device={device}"])
    path = deepspeed_config_path(config, on_gpu=on_gpu)
    assert path.parent == CONFIG_DIR and path.name == name
    assert path.read_bytes() == (REPO / "deepspeed_configs" / name).read_bytes()
