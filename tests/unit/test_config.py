"""Config loading, overrides, round trips, and one-line errors for invalid recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from volta.config import (
    ConfigError,
    VoltaConfig,
    config_from_dict,
    dump_config,
    image_block_count,
    load_config,
    text_layer_count,
    total_steps,
)

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_recipes() -> None:
    names = {p.stem for p in RECIPES}
    assert {"debug", "base"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_round_trips_exactly(recipe: Path, tmp_path: Path) -> None:
    config = load_config(recipe)
    assert isinstance(config, VoltaConfig)
    out = tmp_path / "resolved.yaml"
    dump_config(config, out)
    again = load_config(out)
    assert again == config
    assert again.model_dump() == config.model_dump()
    assert dump_config(again) == out.read_text()


def test_base_recipe_is_the_paper_setting() -> None:
    c = load_config(REPO / "configs" / "base.yaml")
    assert c.model.image.name == "swin_base_patch4_window12_384" and c.model.image.img_size == 384
    assert c.model.text.name.endswith("roberta-base") and c.model.text.max_length == 30
    assert c.model.fusion_depth == 6
    assert c.train.global_batch_size == 256 and c.train.precision == "bf16" and c.train.zero_stage == 2
    assert c.optim.name == "lars" and c.ray.use_gpu
    assert (c.loss.got.weight, c.loss.got.wd_weight, c.loss.got.gwd_weight, c.loss.bt.lambd) == (
        100,
        0.1,
        0.1,
        0.005,
    )


def test_overrides_apply_with_yaml_values() -> None:
    c = load_config(
        REPO / "configs" / "debug.yaml",
        [
            "model.fusion_depth=1",
            "loss.got.weight=2.5",
            "model.image.timm_kwargs.depths=[1,1,1,1]",
            "data.train_shards=['a/{0..3}.tar', 's3://b/x']",
            "train.max_steps=7",
            "sweep.space.loss.got.wd_weight={type: uniform, low: 0.0, high: 1.0}",
        ],
    )
    assert c.model.fusion_depth == 1
    assert c.loss.got.weight == 2.5
    assert c.model.image.timm_kwargs["depths"] == [1, 1, 1, 1]
    assert c.data.train_shards == ["a/{0..3}.tar", "s3://b/x"]
    assert c.train.max_steps == 7
    assert c.sweep.space["loss.got.wd_weight"].high == 1.0


def test_defaults_validate_and_derived_values() -> None:
    c = VoltaConfig()
    assert c.gradient_accumulation_steps == 256 // 32
    c2 = load_config(REPO / "configs" / "debug.yaml")
    assert c2.gradient_accumulation_steps == 1
    assert c2.tokenizer_name == c2.data.tokenizer
    assert total_steps(c2, None) == 4
    c3 = load_config(REPO / "configs" / "debug.yaml", ["train.max_steps=null", "train.epochs=2"])
    assert total_steps(c3, 100) == 25
    with pytest.raises(ConfigError, match="data.samples_per_epoch"):
        total_steps(c3, None)


def test_block_counts() -> None:
    c = VoltaConfig()
    assert image_block_count(c.model.image) == 24  # Swin-B: 2+2+18+2
    assert text_layer_count(c.model.text) == 12
    d = load_config(REPO / "configs" / "debug.yaml")
    assert image_block_count(d.model.image) == 5 and text_layer_count(d.model.text) == 4


def test_text_layers_from_local_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 3}')
    with pytest.raises(ConfigError, match=r"model.fusion_depth: must be between 0 and 3"):
        config_from_dict({"model": {"text": {"pretrained": str(tmp_path)}, "fusion_depth": 4}})


# (overrides on the debug recipe, expected error prefix)
INVALID: list[tuple[list[str], str]] = [
    (["model.fusion_depth=5"], "model.fusion_depth: must be between 0 and 4"),
    (["model.fusion_depth=-1"], "model.fusion_depth: Input should be greater than or equal to 0"),
    (["train.global_batch_size=12"], "train.global_batch_size: must be divisible by"),
    (["loss.got.weight=-1"], "loss.got.weight: Input should be greater than or equal to 0"),
    (["loss.got.wd_weight=-0.5"], "loss.got.wd_weight: Input should be greater than or equal to 0"),
    (
        ["loss.bt.weight=0", "loss.got.weight=0", "loss.mlm.weight=0", "loss.itm.weight=0"],
        "loss: at least one of bt.weight",
    ),
    (["model.bogus=1"], "model.bogus: unknown key"),
    (["train.precision=fp8"], "train.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
    (["train.precision=fp16"], "train.precision: fp16 needs a GPU"),
    (["train.micro_batch_size=abc"], "train.micro_batch_size: Input should be a valid integer"),
    (["model.image.name=vit_base_patch16_224"], "model.image.name: expected a timm Swin Transformer name"),
    (["loss.got.prune_scope=global"], "loss.got.prune_scope: Input should be 'sample' or 'batch'"),
    (["loss.got.prune_fraction=1.5"], "loss.got.prune_fraction: Input should be less than 1"),
    (["ray.run_name=has space"], "ray.run_name: expected letters, digits"),
    (["storage.endpoint_url=localhost:9000"], "storage.endpoint_url: expected http(s)://host[:port]"),
    (["train.val_every=10", "data.val_shards=null"], "data.val_shards: must be set when train.val_every"),
    (["train.max_steps=null", "train.epochs=null"], "train: one of train.epochs or train.max_steps"),
    (["ray.use_gpu=true"], "train.device: is 'cpu' but ray.use_gpu is true"),
    (
        ["sweep.space.loss.nothing={type: uniform, low: 0, high: 1}"],
        "sweep.space.loss.nothing: is not a config",
    ),
    (
        ["sweep.space.loss.got.wd_weight={type: uniform, low: 1, high: 0}"],
        "sweep.space.loss.got.wd_weight: expected low < high",
    ),
    (
        ["sweep.space.loss.got.wd_weight={type: choice}"],
        "sweep.space.loss.got.wd_weight: type 'choice' needs",
    ),
    (["sweep.metric=grounding"], "sweep.metric: expected 'val/<name>'"),
    (["data.views.crop_scale=[0.9, 0.2]"], "data.views.crop_scale: expected 0 < low <= high <= 1"),
    (["eval.retrieval_ks=[0, 5]"], "eval.retrieval_ks: expected a non-empty list of positive integers"),
    (["model.text.max_length=2"], "model.text.max_length: Input should be greater than or equal to 4"),
    (["optim.name=sgd"], "optim.name: Input should be 'lars' or 'adamw'"),
]


@pytest.mark.parametrize(("overrides", "expected"), INVALID, ids=[e for _, e in INVALID])
def test_invalid_config_gives_one_line_naming_the_field(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "debug.yaml", overrides)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_invalid_yaml_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of config sections, got list"):
        load_config(listy)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["model.fusion_depth"])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"modle": {"fusion_depth": 2}}))
    with pytest.raises(ConfigError, match=r"^modle: unknown key"):
        load_config(unknown)


def test_cli_prints_one_line_and_exits_2_without_traceback() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "volta.cli",
            "config",
            "validate",
            "-c",
            "configs/debug.yaml",
            "--set",
            "model.fusion_depth=9",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("volta: config error: model.fusion_depth:")


def test_cli_show_is_reloadable(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "volta.cli",
            "config",
            "show",
            "-c",
            "configs/debug.yaml",
            "--set",
            "train.seed=5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    path = tmp_path / "shown.yaml"
    path.write_text(out.stdout)
    assert load_config(path).train.seed == 5


def test_resolve_local_paths_makes_relative_paths_absolute(tmp_path: Path) -> None:
    from volta.config import resolve_local_paths

    (tmp_path / "tok").mkdir()
    c = load_config(
        REPO / "configs" / "debug.yaml",
        ["data.tokenizer=tok", "data.val_shards=['v/{0..1}.tar', 's3://b/v']", "model.text.pretrained=false"],
    )
    r = resolve_local_paths(c, tmp_path)
    assert r.data.train_shards == str(tmp_path / "data/synth/train")
    assert r.data.val_shards == [str(tmp_path / "v/{0..1}.tar"), "s3://b/v"]
    assert r.data.tokenizer == str(tmp_path / "tok")
    assert r.storage.path == str(tmp_path / "runs/debug/ray")
    assert r.train.output_dir == str(tmp_path / "runs/debug")
    hub = resolve_local_paths(load_config(REPO / "configs" / "base.yaml"), tmp_path)
    assert hub.model.text.name == "FacebookAI/roberta-base" and hub.storage.path.startswith("s3://")
    assert all(s.startswith("s3://") for s in hub.data.train_shards)


def test_loss_blocks_hold_exactly_the_loss_functions_keyword_arguments() -> None:
    import inspect

    from volta.config import GOTLossConfig
    from volta.losses.got import got_contrastive_loss, got_loss

    def keyword_only(fn: Any) -> set[str]:
        return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

    got = GOTLossConfig()
    assert set(got.kwargs()) == keyword_only(got_loss)
    # swap_tokens/swap_mask are the batch's swapped captions (the task passes them), not settings
    assert set(got.contrastive.kwargs(got.ipot_beta)) == keyword_only(got_contrastive_loss) - {
        "swap_tokens",
        "swap_mask",
    }


@pytest.mark.parametrize(
    ("old", "new"),
    [("got_weight", "got.weight"), ("bt_w_it2", "bt.image_text_view2"), ("itm_negatives", "itm.negatives")],
)
def test_an_old_flat_loss_key_names_its_new_place(old: str, new: str, tmp_path: Path) -> None:
    message = f"loss.{old}: renamed; use loss.{new}"
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "debug.yaml", [f"loss.{old}=1"])
    assert str(err.value) == message
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"loss:\n  {old}: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == message
