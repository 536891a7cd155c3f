"""Held-out image-text matching: the tally's arithmetic, the pairs, and the logits against the plain forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures_eval import EvalAssets, make_eval_assets
from volta.data.factory import build_config_eval_loader
from volta.data.tokenizer import load_tokenizer
from volta.eval.features import evaluating
from volta.eval.itm import ItmTally, itm_batch
from volta.eval.validate import evaluate_pass, run_validation

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> EvalAssets:
    return make_eval_assets(tmp_path_factory.mktemp("itm"), samples=16)


def test_tally_reports_balanced_accuracy() -> None:
    tally = ItmTally()
    # 3 positives (2 right), 1 negative (right): balanced (2/3 + 1) / 2; plain accuracy would be 3/4.
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    tally.add(logits, torch.tensor([1, 1, 1, 0]))
    s = tally.summary()
    assert s["acc_pos"] == pytest.approx(2 / 3) and s["acc_neg"] == 1.0
    assert s["acc"] == pytest.approx((2 / 3 + 1) / 2) and s["n"] == 4 and s["chance"] == 0.5
    assert ItmTally().summary() == {}  # nothing paired: nothing reported
    # A head that always answers "match" scores exactly chance, whatever the share of negatives.
    always = ItmTally()
    always.add(torch.tensor([[0.0, 1.0]] * 5), torch.tensor([1, 1, 1, 0, 0]))
    assert always.summary()["acc"] == 0.5


def test_logits_equal_the_fused_forward_of_the_paired_images(assets: EvalAssets) -> None:
    tokenizer = load_tokenizer(str(assets.tokenizer))
    batch = next(iter(build_config_eval_loader(assets.config, tokenizer, str(assets.shards), batch_size=8)))
    model = assets.model
    with evaluating(model):
        logits, labels = itm_batch(model, batch, "cpu", torch.Generator().manual_seed(0))
        # The same pairs drawn again, and the plain (non-prefix) fused forward of each pair as the reference.
        from volta.losses.itm import sample_itm_pairs

        index, same_labels = sample_itm_pairs(batch.image_ids, generator=torch.Generator().manual_seed(0))
        out = model(batch.images[index], batch.input_ids, batch.attention_mask, fusion=True)
        reference = model.itm_logits(out).float()
    assert torch.equal(labels, same_labels)
    assert int((labels == 0).sum()) == 4  # half of the batch are non-matching pairs
    own = index == torch.arange(len(index))
    assert torch.equal(own, labels == 1)  # a positive keeps its own image, a negative gets another one
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_every_evaluation_pass_reports_itm_over_the_whole_set(assets: EvalAssets) -> None:
    tokenizer = load_tokenizer(str(assets.tokenizer))
    result = evaluate_pass(
        assets.model, assets.config, tokenizer, shards=str(assets.shards), device="cpu", batch_size=8
    )
    s = result.itm.summary()
    assert s["n"] == 16 and 0.0 <= s["acc"] <= 1.0
    again = evaluate_pass(
        assets.model, assets.config, tokenizer, shards=str(assets.shards), device="cpu", batch_size=8
    )
    assert again.itm == result.itm  # the held-out pairs are fixed
    metrics = run_validation(
        assets.model, assets.config, tokenizer, shards=str(assets.shards), device="cpu", max_samples=None
    )
    assert assets.config.eval.batch_size == 8  # so the validation pass pairs the same batches
    assert metrics["val/itm_acc"] == pytest.approx(s["acc"])
