"""The VoLTA task module: every term, switches, prefix sharing, fp32 OT under autocast, gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures_task import VOCAB, make_batch, tiny_config, with_swaps
from volta.models.factory import build_model
from volta.task import VoLTATask

TERMS = ("bt_loss", "got_loss", "mlm_loss", "itm_loss")


def _task(*overrides: str, share: bool = True) -> VoLTATask:
    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    return VoLTATask(build_model(cfg.model, vocab_size=VOCAB), cfg.loss, share_prefix=share)


def test_all_terms_finite_sum_and_every_parameter_gets_a_gradient() -> None:
    task = _task()
    with torch.no_grad():  # open the gates so cross-attention parameters are reachable by gradients
        for name, p in task.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    batch = make_batch(tiny_config())
    torch.manual_seed(1)
    out = task(batch)
    for k in TERMS:
        assert k in out and torch.isfinite(out[k]), k
    assert torch.allclose(out["loss"], sum(out[k] for k in TERMS))
    assert out["wd"] > 0 and out["gwd"] >= 0
    out["loss"].backward()
    missing = [
        n
        for n, p in task.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def test_gates_get_gradient_at_initialisation() -> None:
    task = _task()
    task(make_batch(tiny_config()))["loss"].backward()
    gates = [p for n, p in task.named_parameters() if "gate" in n]
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


@pytest.mark.parametrize("term", ["bt", "got", "mlm", "itm"])
def test_weight_zero_switches_a_term_off_without_computing_it(
    term: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import volta.task as task_mod

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError(f"{term} computed although its weight is 0")

    target = {"bt": "barlow_twins_loss", "got": "got_loss", "mlm": "mlm_loss", "itm": "sample_itm_pairs"}[
        term
    ]
    monkeypatch.setattr(task_mod, target, boom)
    task = _task(f"loss.{term}.weight=0")
    out = task(make_batch(tiny_config()))
    assert f"{term}_loss" not in out
    assert torch.isfinite(out["loss"])


def test_weights_scale_their_terms() -> None:
    batch = make_batch(tiny_config())
    base = _task()
    torch.manual_seed(3)
    a = base(batch)
    doubled = _task("loss.got.weight=200", "loss.mlm.weight=2")
    torch.manual_seed(3)
    b = doubled(batch)
    assert torch.allclose(b["got_loss"], 2 * a["got_loss"], rtol=1e-5)
    assert torch.allclose(b["mlm_loss"], 2 * a["mlm_loss"], rtol=1e-5)
    assert torch.allclose(b["bt_loss"], a["bt_loss"], rtol=1e-5)


def test_prefix_sharing_gives_the_same_losses_and_gradients() -> None:
    batch = make_batch(tiny_config())
    shared, plain = _task(share=True), _task(share=False)
    plain.load_state_dict(shared.state_dict())
    torch.manual_seed(5)
    a = shared(batch)
    torch.manual_seed(5)
    b = plain(batch)
    for k in (*TERMS, "loss"):
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    a["loss"].backward()
    b["loss"].backward()
    for (n, p), q in zip(shared.named_parameters(), plain.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-4), n  # summation order differs


def test_ot_stays_fp32_and_finite_under_bf16_autocast() -> None:
    task = _task()
    batch = make_batch(tiny_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task(batch)
    assert torch.isfinite(out["got_loss"]) and out["got_loss"].dtype == torch.float32
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def test_caption_of_only_specials_is_finite() -> None:
    task = _task()
    batch = make_batch(tiny_config())
    view = batch.views[0]
    view.attention_mask[0] = 0
    view.attention_mask[0, :2] = 1
    view.input_ids[0, :2] = torch.tensor([0, 2])
    view.special_tokens_mask[0] = True
    view.mlm_labels[0] = -100
    out = task(batch)
    assert all(torch.isfinite(out[k]) for k in (*TERMS, "loss"))
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


def test_got_contrastive_term_is_added_inside_the_got_term() -> None:
    batch = make_batch(tiny_config())
    plain, contrast = _task(), _task("loss.got.contrastive.weight=0.5")
    torch.manual_seed(3)
    a = plain(batch)
    torch.manual_seed(3)
    b = contrast(batch)
    assert "got_nce" not in a and "got_nce_acc" not in a
    assert b["got_nce"] > 0 and 0 <= b["got_nce_acc"] <= 1
    weight = contrast.loss_cfg.got.weight * 0.5
    torch.testing.assert_close(b["got_loss"], a["got_loss"] + weight * b["got_nce"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["loss"] - b["got_loss"], a["loss"] - a["got_loss"], rtol=1e-5, atol=1e-4)
    off = _task("loss.got.contrastive.weight=0.5", "loss.got.weight=0")(batch)
    assert "got_nce" not in off and "got_loss" not in off


def test_swap_negatives_add_a_column_to_the_got_contrast_and_nothing_else() -> None:
    swap = "loss.got.contrastive.swap_negatives=true"
    batch = with_swaps(make_batch(tiny_config()))
    contrast, swapped = (
        _task("loss.got.contrastive.weight=0.5"),
        _task("loss.got.contrastive.weight=0.5", swap),
    )
    torch.manual_seed(3)
    a = contrast(batch)
    torch.manual_seed(3)
    b = swapped(batch)
    assert "got_swap_acc" not in a and 0 <= b["got_swap_acc"] <= 1
    # one more negative per image: the image-to-text cross entropy can only grow; the WD/GWD terms and every
    # other loss are those of the same step without it
    assert b["got_nce"] > a["got_nce"]
    torch.testing.assert_close(b["wd"], a["wd"])
    torch.testing.assert_close(b["loss"] - b["got_loss"], a["loss"] - a["got_loss"], rtol=1e-5, atol=1e-4)
    b["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in swapped.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="swap_negatives is on but the batch has no swapped captions"):
        _task("loss.got.contrastive.weight=0.5", swap)(make_batch(tiny_config()))
    # without the contrast there is nothing to add the column to: the setting asks for no swapped captions
    assert not tiny_config(swap).loss.got.swap_negatives_on
    assert tiny_config(swap, "loss.got.contrastive.weight=0.5").loss.got.swap_negatives_on


def test_hard_itm_negatives_are_drawn_from_the_projection_similarity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backbones' global features differ in width (debug: 256 vs 64); the BT projections share one space."""
    import volta.task as task_mod

    task = _task("loss.itm.negatives=hard")
    assert task.model.image_encoder.out_dim != task.model.text_encoder.width
    batch = make_batch(tiny_config())
    seen: list[torch.Tensor] = []
    real = task_mod.sample_itm_pairs

    def spy(ids: torch.Tensor, **kwargs: Any) -> Any:
        seen.append(kwargs["similarity"])
        return real(ids, **kwargs)

    monkeypatch.setattr(task_mod, "sample_itm_pairs", spy)
    out = task(batch)
    assert torch.isfinite(out["itm_loss"]) and len(seen) == 2
    for view, similarity in zip(batch.views, seen, strict=True):
        with torch.no_grad():  # train-mode BatchNorm: the same batch gives the same projections
            dual = task.model(view.images, view.input_ids, view.attention_mask, fusion=False)
            proj = task.model.bt_projections(dual)
        expected = F.normalize(proj.text, dim=-1) @ F.normalize(proj.image, dim=-1).T  # (B, B)
        assert similarity.shape == (batch.batch_size, batch.batch_size)
        assert torch.allclose(similarity, expected, atol=1e-5)
