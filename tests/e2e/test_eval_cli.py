"""`volta eval ...` and `volta visualize ...` on a tiny random-init checkpoint and synthetic shards with boxes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.fixtures_cli import volta
from tests.fixtures_eval import EvalAssets, make_eval_assets

pytestmark = pytest.mark.timeout(300)


def one_line_error(run: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("volta: "), run.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    assert run.stdout == ""


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> EvalAssets:
    return make_eval_assets(tmp_path_factory.mktemp("eval"), samples=24)


def test_eval_all_prints_json_and_a_table(assets: EvalAssets, tmp_path: Path) -> None:
    # The checkpoint's config names the tokenizer and the validation shards: no other argument is needed.
    run = volta("eval", "all", "--checkpoint", assets.checkpoint / "model.safetensors", "--batch-size", "8",
                cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["samples"] == 24 and out["model"] == "trained"
    assert set(out["retrieval"]) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert set(out["grounding"]) >= {"acc", "random", "center", "n", "acc/color_shape"}
    assert out["grounding"]["n"] >= 24
    # synthetic phrases are "<colour> <shape>": every word of every phrase is also pointed alone
    assert out["grounding"]["word_n"] == 2 * out["grounding"]["n"]
    assert sum(w["n"] for w in out["grounding_words"].values()) == out["grounding"]["word_n"]
    assert "word pointed alone" in run.stderr
    assert set(out["probe"]) >= {"acc", "majority", "random_init_acc", "n_train", "n_test"}
    assert out["probe"]["n_train"] + out["probe"]["n_test"] == 24
    assert "grounding:" in run.stderr and "i2t_r1" in run.stderr


def test_eval_random_init_and_missing_grounding_data(assets: EvalAssets, tmp_path: Path) -> None:
    run = volta("eval", "retrieval", "--checkpoint", assets.checkpoint, "--shards", assets.shards,
                "--random-init", "--seed", "7", "--max-samples", "10", "--set", "eval.retrieval_ks=[1,2]",
                cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["model"] == "random-init (seed 7)" and out["samples"] == 10
    recalls = {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 2)}
    assert set(out["retrieval"]) == recalls | {f"local_{r}" for r in recalls} | {"n_images", "n_texts"}
    assert "grounding" not in out

    run = volta("eval", "grounding", "--checkpoint", assets.checkpoint, "--shards", assets.no_box_shards,
                cwd=tmp_path)  # fmt: skip
    one_line_error(run, "boxes")


def test_random_init_from_a_recipe_equals_random_init_from_its_checkpoint(
    assets: EvalAssets, tmp_path: Path
) -> None:
    """Without --checkpoint, --random-init --config RECIPE is the same untrained model (same seed, same weights,
    so the same figures) as --random-init of a checkpoint trained from that recipe."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(assets.config.model_dump(mode="json")))
    common = ["--shards", assets.shards, "--random-init", "--seed", "7", "--max-samples", "12"]
    from_checkpoint = volta("eval", "retrieval", "--checkpoint", assets.checkpoint, *common, cwd=tmp_path)
    from_recipe = volta("eval", "retrieval", "--config", recipe, *common, cwd=tmp_path)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr
    assert from_recipe.returncode == 0, from_recipe.stderr
    a, b = json.loads(from_checkpoint.stdout), json.loads(from_recipe.stdout)
    assert b["checkpoint"] is None and a["checkpoint"] is not None
    assert b["model"] == a["model"] == "random-init (seed 7)"
    assert b["retrieval"] == a["retrieval"]
    other_seed = volta("eval", "retrieval", "--config", recipe, *common[:-4], "--seed", "8", "--max-samples", "12",
                       cwd=tmp_path)  # fmt: skip
    assert (
        json.loads(other_seed.stdout)["retrieval"] != a["retrieval"]
    )  # the figures do depend on the weights
    # Neither a checkpoint nor --random-init --config: one line naming what is missing.
    one_line_error(volta("eval", "all", "--config", recipe, cwd=tmp_path), "--checkpoint is required")
    one_line_error(volta("eval", "all", "--random-init", cwd=tmp_path), "--checkpoint is required")


def test_visualize_single_image_and_shards(assets: EvalAssets, tmp_path: Path) -> None:
    picture = np.full((60, 90, 3), 120, dtype=np.uint8)
    picture[10:40, 10:40] = (220, 30, 30)
    Image.fromarray(picture).save(tmp_path / "in.png")
    run = volta("visualize", "--checkpoint", assets.checkpoint, "--image", "in.png",
                "--caption", "a red square on a grey background", "--out", "maps.png", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"files": ["maps.png"]}
    # Picture + 4 content words (red, square, grey, background), default 192 px tiles.
    assert Image.open(tmp_path / "maps.png").size == (5 * 192, 192 + 22)

    run = volta("visualize", "--checkpoint", assets.checkpoint, "--shards", assets.shards, "--num", "3",
                "--out", "vis", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    files = json.loads(run.stdout)["files"]
    assert len(files) == 3 and all((tmp_path / f).is_file() for f in files)


def test_bad_inputs_exit_2_with_one_line(assets: EvalAssets, tmp_path: Path) -> None:
    one_line_error(volta("eval", "all", "--checkpoint", "nowhere", cwd=tmp_path), "nowhere")
    one_line_error(
        volta("eval", "retrieval", "--checkpoint", assets.checkpoint, "--shards", "missing", cwd=tmp_path),
        "missing",
    )
    one_line_error(
        volta("visualize", "--checkpoint", assets.checkpoint, "--out", "x.png", cwd=tmp_path), "--image"
    )
