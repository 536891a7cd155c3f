"""run_validation on the tiny debug model and a tiny synthetic shard set: metric names, ranges, side effects."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_eval import EvalAssets, eval_config, make_eval_assets
from volta.data.tokenizer import load_tokenizer
from volta.eval.grounding import got_text_mask, transport_plans
from volta.eval.validate import run_validation


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> EvalAssets:
    return make_eval_assets(tmp_path_factory.mktemp("eval"), samples=16)


def test_run_validation_metrics(assets: EvalAssets) -> None:
    tokenizer = load_tokenizer(str(assets.tokenizer))
    model = assets.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = run_validation(
        model, assets.config, tokenizer, shards=str(assets.shards), device="cpu", max_samples=12
    )
    assert model.training  # mode restored
    # BatchNorm running statistics are untouched: evaluation ran in eval mode.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for k in assets.config.eval.retrieval_ks:
        assert 0.0 <= metrics[f"val/i2t_r{k}"] <= 1.0 and 0.0 <= metrics[f"val/t2i_r{k}"] <= 1.0
    assert metrics["val/retrieval_n_images"] == 12 and metrics["val/retrieval_n_texts"] == 12
    # Every synthetic caption names 1-3 objects, each with a box.
    assert 12 <= metrics["val/grounding_n"] <= 36
    for name in ("acc", "random", "center"):
        assert 0.0 <= metrics[f"val/grounding_{name}"] <= 1.0
    assert metrics["val/grounding_n/color_shape"] == metrics["val/grounding_n"]
    assert 0.0 < metrics["val/grounding_random"] < 0.5  # objects cover a minority of the 2x2 patch centres
    assert all(isinstance(v, float) for v in metrics.values())
    again = run_validation(
        model, assets.config, tokenizer, shards=str(assets.shards), device="cpu", max_samples=12
    )
    assert again == metrics  # deterministic


def test_no_grounding_metrics_without_boxes_or_when_off(assets: EvalAssets) -> None:
    tokenizer = load_tokenizer(str(assets.tokenizer))
    metrics = run_validation(
        assets.model,
        assets.config,
        tokenizer,
        shards=str(assets.no_box_shards),
        device="cpu",
        max_samples=None,
    )
    assert "val/i2t_r1" in metrics and not any(k.startswith("val/grounding") for k in metrics)
    cfg = eval_config(assets.tokenizer, assets.shards, "eval.grounding=false")
    metrics = run_validation(
        assets.model, cfg, tokenizer, shards=str(assets.shards), device="cpu", max_samples=8
    )
    assert not any(k.startswith("val/grounding") for k in metrics)


def test_transport_plans_follow_the_got_marginals(assets: EvalAssets) -> None:
    # The grounding plan is GOT's: uniform mass 1/P per patch, 1/T' per content token, none on specials/padding.
    model = assets.model.eval()
    b, t = 3, 12
    ids = torch.randint(5, 300, (b, t))
    attention = torch.ones(b, t, dtype=torch.long)
    attention[1, 8:] = 0
    special = torch.zeros(b, t, dtype=torch.bool)
    special[:, 0] = True
    special[0, -1] = True
    special |= attention == 0
    images = torch.randn(b, 3, assets.config.model.image.img_size, assets.config.model.image.img_size)
    with torch.no_grad():
        out = model(images, ids, attention, fusion=False)
        mask = got_text_mask(attention, special)
        plan = transport_plans(model, out, mask, assets.config.loss.got)  # (B, P, T)
    assert plan.shape == (b, out.image_tokens.shape[1], t)
    assert torch.all(plan[~mask.unsqueeze(1).expand_as(plan)] == 0)
    col = plan.sum(dim=1)  # (B, T)
    assert torch.allclose(col[mask], (1 / mask.sum(1, keepdim=True).float()).expand_as(col)[mask], atol=1e-3)


def test_max_samples_caps_the_pass(assets: EvalAssets) -> None:
    tokenizer = load_tokenizer(str(assets.tokenizer))
    metrics = run_validation(
        assets.model, assets.config, tokenizer, shards=str(assets.shards), device="cpu", max_samples=5
    )
    assert metrics["val/retrieval_n_texts"] == 5
