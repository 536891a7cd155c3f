"""Heat maps: content words, word maps from a plan, the PNG grid's size and content, render_heatmaps end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures_eval import make_tokenizer
from tests.fixtures_task import tiny_config
from volta.eval.heatmap import HeatmapRow, content_words, draw_heatmap_grid, render_heatmaps, word_maps
from volta.models.factory import build_model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_content_words_skip_stop_words() -> None:
    words = content_words("There is a red circle to the left of a Blue star, and a cross-hatch.")
    assert [w for w, _, _ in words] == ["red", "circle", "left", "Blue", "star", "cross-hatch"]
    caption = "a red circle"
    assert [caption[s:e] for _, s, e in content_words(caption)] == ["red", "circle"]


def test_word_maps_sum_the_word_tokens_and_drop_truncated_words() -> None:
    plan = torch.zeros(4, 5)  # 2x2 patches, tokens: <s> red cir cle </s>
    plan[1, 1] = 0.3
    plan[2, 2] = 0.1
    plan[2, 3] = 0.2
    offsets = torch.tensor([[0, 0], [2, 5], [6, 9], [9, 12], [0, 0]])
    valid = torch.tensor([False, True, True, True, False])
    maps = word_maps(plan, offsets, valid, [("red", 2, 5), ("circle", 6, 12), ("star", 30, 34)])
    assert [w for w, _ in maps] == ["red", "circle"]
    assert torch.allclose(maps[0][1], torch.tensor([[0.0, 0.3], [0.0, 0.0]]))
    assert torch.allclose(maps[1][1], torch.tensor([[0.0, 0.0], [0.3, 0.0]]))


def test_grid_has_the_expected_size_and_a_hot_spot_where_the_mass_is() -> None:
    heat = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # all mass on the top-left patch
    grey = Image.new("RGB", (80, 80), (128, 128, 128))
    rows = [
        HeatmapRow(grey, "a red thing", [("red", heat), ("thing", heat.flip(0))], [{"bbox": [0, 0, 40, 40]}]),
        HeatmapRow(Image.new("RGB", (160, 80), (128, 128, 128)), "wide", [("wide", heat)]),
    ]
    tile = 64
    grid = draw_heatmap_grid(rows, tile=tile)
    assert grid.size == (3 * tile, 2 * (tile + 22))
    pixels = np.asarray(grid, dtype=np.float64)
    cell = pixels[22 : 22 + tile, tile : 2 * tile]  # the "red" overlay of row 0
    assert cell.std() > 10  # not a uniform map
    red_minus_blue = cell[..., 0] - cell[..., 2]
    # Hot (red in the colormap) top-left, cold (blue) bottom-right.
    assert red_minus_blue[:16, :16].mean() > 40 > -40 > red_minus_blue[-16:, -16:].mean()
    flipped = pixels[22 : 22 + tile, 2 * tile : 3 * tile]  # "thing": mass on the bottom-left patch
    assert (flipped[-16:, :16, 0] - flipped[-16:, :16, 2]).mean() > 40
    # The wide picture of row 1 is letterboxed: the rows above and below it stay white.
    top_of_row1 = 2 * (tile + 22) - tile
    assert (pixels[top_of_row1 : top_of_row1 + 8, tile : 2 * tile] == 255).all()


def test_render_heatmaps_with_the_tiny_model(tmp_path: Path, tokenizer_dir: Path) -> None:
    from volta.data.tokenizer import load_tokenizer

    cfg = tiny_config(f"data.tokenizer={tokenizer_dir}", "model.text.max_length=24")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(tokenizer)).train()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(50, 70, 3), dtype=np.uint8))
    tensor = torch.randn(3, cfg.model.image.img_size, cfg.model.image.img_size)
    out = render_heatmaps(
        model,
        cfg,
        tokenizer,
        [picture, tensor],
        ["a red circle and a blue star", "the green square"],
        tmp_path / "sub" / "maps.png",
        boxes=[[{"phrase": "red circle", "bbox": [5, 5, 20, 20]}], []],
        image_sizes=[None, (100, 50)],
        tile=96,
    )
    assert model.training  # mode restored
    image = Image.open(out)
    # 1 picture column + 4 content words (red, circle, blue, star); 2 rows.
    assert image.size == (5 * 96, 2 * (96 + 22))
    overlay = np.asarray(image, dtype=np.float64)[22 + 20 : 22 + 76, 96 + 4 : 2 * 96 - 4]
    assert overlay.std() > 1.0
