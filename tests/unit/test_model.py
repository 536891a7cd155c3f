"""The VoLTA model through its public interface: shapes, fusion semantics, padding, prefix sharing, gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.fixtures_model import VOCAB, make_batch, model_config, set_gates, tiny_model
from volta.config import ModelConfig
from volta.models import VoLTAModel, VoLTAOutputs, build_model
from volta.models.image_encoder import SwinImageEncoder, create_swin
from volta.models.text_encoder import RobertaTextEncoder

PLACEMENTS = ["after_block", "before_mlp"]  # model.fusion_placement (tests/unit/test_fusion_placement.py)


def _placed_config(placement: str, **kwargs: Any) -> ModelConfig:
    """:func:`model_config` with ``fusion_placement`` set."""
    return ModelConfig.model_validate({**model_config(**kwargs).model_dump(), "fusion_placement": placement})


def _placed_model(placement: str, **kwargs: Any) -> VoLTAModel:
    torch.manual_seed(0)
    return build_model(_placed_config(placement, **kwargs), vocab_size=VOCAB)


def _all_heads(model: VoLTAModel, out: VoLTAOutputs) -> dict[str, torch.Tensor]:
    bt, got = model.bt_projections(out), model.got_projections(out)
    return {
        "bt_image": bt.image,
        "bt_text": bt.text,
        "got_image": got.image,
        "got_text": got.text,
        "mlm": model.mlm_logits(out),
        "itm": model.itm_logits(out),
    }


# ------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("variant", ["debug", "w3"])
@pytest.mark.parametrize("depth", ["zero", "one", "all"])
def test_output_shapes_for_fusion_depths_and_swin_sizes(variant: str, depth: str) -> None:
    blocks = {"debug": 5, "w3": 8}[variant]
    n = {"zero": 0, "one": 1, "all": blocks}[depth]
    model = tiny_model(variant=variant, fusion_depth=n, text_layers=blocks)
    assert model.fusion_depth == n and model.fusion.depth == n
    if n == 0:
        assert not list(model.fusion.parameters())  # no fusion modules at all
    images, ids, mask = make_batch(model, batch=3)
    b, t = ids.shape
    swin = model.image_encoder.swin
    p = 4  # both variants end on a 2x2 grid
    di, dt, cfg = swin.num_features, model.text_encoder.width, model_config(variant=variant)
    for fusion in (False, True):
        with torch.no_grad():
            out = model(images, ids, mask, fusion=fusion)
            heads = _all_heads(model, out)
        assert out.fused is fusion
        assert out.image_tokens.shape == (b, p, di) and out.text_tokens.shape == (b, t, dt)
        assert out.image_global.shape == (b, di) and out.text_global.shape == (b, dt)
        assert heads["bt_image"].shape == heads["bt_text"].shape == (b, cfg.projector_out_dim)
        assert heads["got_image"].shape == (b, p, cfg.got_projector_out_dim)
        assert heads["got_text"].shape == (b, t, cfg.got_projector_out_dim)
        assert heads["mlm"].shape == (b, t, VOCAB) and heads["itm"].shape == (b, 2)
        assert model.mlm_logits(out, positions=mask.bool()).shape == (int(mask.sum()), VOCAB)
        assert all(torch.isfinite(v).all() for v in heads.values())


def test_fused_image_blocks_span_stages_with_the_downsample_between_them() -> None:
    # debug Swin depths 1-1-2-1: N=3 fuses both stage-3 blocks and the stage-4 block.
    model = tiny_model(fusion_depth=3)
    assert model.first_fused_image_block == 2
    dims = [m.norm.normalized_shape[0] for m in model.fusion.image]
    assert dims == [128, 128, 256]  # each cross-attention has its block's width
    assert [m.context_norm.normalized_shape[0] for m in model.fusion.text] == dims


# ------------------------------------------------------------------------------------------ fusion switch
def test_fusion_off_is_bit_identical_to_plain_timm_and_hf_modules() -> None:
    model = tiny_model(fusion_depth=3).eval()
    set_gates(model, 0.7)  # irrelevant with fusion off
    images, ids, mask = make_batch(model)
    with torch.no_grad():
        out = model(images, ids, mask, fusion=False)
        timm_tokens = model.image_encoder.swin.forward_features(images).flatten(1, 2)
        hf_tokens = model.text_encoder.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out.image_tokens, timm_tokens)
    assert torch.equal(out.text_tokens, hf_tokens)
    # The adapters alone are the same networks too.
    with torch.no_grad():
        assert torch.equal(model.image_encoder(images), timm_tokens)
        assert torch.equal(model.text_encoder(ids, mask), hf_tokens)


def test_zero_gates_make_fusion_on_equal_fusion_off_and_nonzero_gates_change_it() -> None:
    model = tiny_model(fusion_depth=4).eval()
    images, ids, mask = make_batch(model)
    with torch.no_grad():
        off = model(images, ids, mask, fusion=False)
        on = model(images, ids, mask, fusion=True)
        assert torch.equal(on.image_tokens, off.image_tokens) and torch.equal(on.text_tokens, off.text_tokens)
        model.fusion.image[0].gate.fill_(0.5)  # an image-side gate: only the image stream reads the text
        on = model(images, ids, mask, fusion=True)
        assert not torch.allclose(on.image_tokens, off.image_tokens)
        assert torch.equal(on.text_tokens, off.text_tokens)
        model.fusion.text[0].gate.fill_(0.5)  # and a text-side gate: now the text stream reads the image
        on = model(images, ids, mask, fusion=True)
    assert not torch.allclose(on.text_tokens, off.text_tokens)


def test_fused_pair_reads_the_other_stream_from_before_the_pair() -> None:
    # N=1: text out = xattn(layer(t), image input of the fused block); image out = xattn(block(x), t).
    model = tiny_model(fusion_depth=1).eval()
    set_gates(model, 0.5)
    images, ids, mask = make_batch(model)
    with torch.no_grad():
        img, txt = model.image_prefix(images), model.text_prefix(ids, mask)
        out = model.encode(img, txt, fusion=True)
        enc_i, enc_t = model.image_encoder, model.text_encoder
        x_new = enc_i.block(enc_i.num_blocks - 1, img.tokens)
        t_new = enc_t.layer(enc_t.num_layers - 1, txt.hidden, enc_t.layer_mask(txt.hidden, mask))
        want_t = model.fusion.text[0](t_new, img.tokens.flatten(1, 2))
        b, h, w, c = x_new.shape
        want_x = model.fusion.image[0](x_new.reshape(b, h * w, c), txt.hidden, mask).reshape(b, h, w, c)
    assert torch.allclose(out.text_tokens, want_t, atol=1e-6, rtol=0)
    assert torch.allclose(out.image_tokens, enc_i.norm(want_x).flatten(1, 2), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_padding_ids_change_nothing_for_real_tokens_in_any_output(placement: str) -> None:
    # Training mode (BatchNorm uses batch statistics) without dropout; gates on so fusion mixes the streams.
    model = _placed_model(
        placement, fusion_depth=3, **{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    )
    model.train()
    set_gates(model, 0.5)
    images, ids, mask = make_batch(model, batch=4)
    assert (mask == 0).any()
    other = ids.clone()
    other[mask == 0] = torch.randint(5, VOCAB, (int((mask == 0).sum()),))
    real = mask.bool()
    for fusion in (False, True):
        a, b = model(images, ids, mask, fusion=fusion), model(images, other, mask, fusion=fusion)
        ha, hb = _all_heads(model, a), _all_heads(model, b)
        same = {
            "image_tokens": (a.image_tokens, b.image_tokens),
            "text_tokens[real]": (a.text_tokens[real], b.text_tokens[real]),
            "text_global": (a.text_global, b.text_global),
            "image_global": (a.image_global, b.image_global),
            "got_text[real]": (ha["got_text"][real], hb["got_text"][real]),
            "mlm[real]": (ha["mlm"][real], hb["mlm"][real]),
            **{k: (ha[k], hb[k]) for k in ("bt_image", "bt_text", "got_image", "itm")},
        }
        for name, (x, y) in same.items():
            assert torch.allclose(x, y, atol=1e-6, rtol=0), (fusion, name, (x - y).abs().max())
        assert (ha["got_text"][~real] == 0).all()  # padding rows are not projected


def test_text_global_is_the_mean_over_real_tokens() -> None:
    model = tiny_model().eval()
    images, ids, mask = make_batch(model)
    with torch.no_grad():
        out = model(images, ids, mask, fusion=False)
    b = 2
    n = int(mask[b].sum())
    assert torch.allclose(out.text_global[b], out.text_tokens[b, :n].mean(0), atol=1e-6)
    assert torch.allclose(out.image_global, out.image_tokens.mean(1))


# ----------------------------------------------------------------------------------------- prefix sharing
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("depth", [0, 2, 5])
def test_shared_prefix_equals_unshared_forward(depth: int, placement: str) -> None:
    model = _placed_model(placement, fusion_depth=depth, text_layers=5).eval()
    set_gates(model, 0.5)
    images, ids, mask = make_batch(model)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        img, txt = model.image_prefix(images), model.text_prefix(ids, mask)
        for fusion in (False, True):
            shared, plain = model.encode(img, txt, fusion=fusion), model(images, ids, mask, fusion=fusion)
            assert torch.equal(shared.image_tokens, plain.image_tokens)
            assert torch.equal(shared.text_tokens, plain.text_tokens)
        swapped = model.encode(img.index(perm), txt, fusion=True)
        direct = model(images[perm], ids, mask, fusion=True)
        assert torch.allclose(swapped.image_tokens, direct.image_tokens, atol=1e-5, rtol=0)
        assert torch.allclose(swapped.text_tokens, direct.text_tokens, atol=1e-5, rtol=0)
        assert torch.equal(txt.index(perm).attention_mask, mask[perm])
        # the text stream alone, fusion off: what encode gives without running the image blocks
        tokens, text_mask = model.encode_text(txt)
        assert torch.equal(tokens, model.encode(img, txt, fusion=False).text_tokens)
        assert torch.equal(text_mask, mask.bool())


def test_mismatched_prefix_batches_are_rejected() -> None:
    model = tiny_model().eval()
    images, ids, mask = make_batch(model)
    with torch.no_grad(), pytest.raises(ValueError, match="batches differ"):
        model.encode(model.image_prefix(images[:2]), model.text_prefix(ids, mask), fusion=True)


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("depth", [-1, 5, 99])
def test_invalid_fusion_depth_raises_a_clear_error(depth: int) -> None:
    cfg = model_config()
    image = SwinImageEncoder(
        create_swin(cfg.image.name, img_size=cfg.image.img_size, timm_kwargs=cfg.image.timm_kwargs)
    )
    from volta.models.factory import text_config_for

    text = RobertaTextEncoder.from_config(text_config_for(cfg, vocab_size=VOCAB))
    with pytest.raises(
        ValueError, match=r"fusion_depth must be an integer between 0 and 4 .*5 blocks.*4 layers"
    ):
        VoLTAModel(image, text, fusion_depth=depth)
    # ModelConfig alone does not know the backbones; the constructor checks again.
    with pytest.raises(ValueError, match="fusion_depth"):
        build_model(cfg.model_copy(update={"fusion_depth": 9}), vocab_size=VOCAB)


def test_unknown_text_override_is_rejected() -> None:
    with pytest.raises(ValueError, match="config_overrides.hiden_size"):
        build_model(model_config(hiden_size=32), vocab_size=VOCAB)


# ---------------------------------------------------------------------------------------------- gradients
def _one_step_loss(model: VoLTAModel, seed: int = 0) -> torch.Tensor:
    """Every head, fusion off (BT, GOT) and on (MLM, ITM), weighted by fixed random tensors and summed."""
    images, ids, mask = make_batch(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    img, txt = model.image_prefix(images), model.text_prefix(ids, mask)
    dual = model.encode(img, txt, fusion=False)
    fused = model.encode(img.index(torch.tensor([1, 0, 2, 3])), txt, fusion=True)
    bt, got = model.bt_projections(dual), model.got_projections(dual)
    outputs = [bt.image, bt.text, got.image, got.text, model.mlm_logits(fused), model.itm_logits(fused)]
    return torch.stack([(o * torch.randn(o.shape, generator=g)).sum() for o in outputs]).sum()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_parameter_gets_a_finite_nonzero_gradient(placement: str) -> None:
    model = _placed_model(placement, fusion_depth=3)
    model.train()
    # At initialisation (gates 0) the gates themselves learn; the rest of each cross-attention (its norms and
    # projections) is multiplied by a zero gate, so its gradient is exactly zero until the gates move.
    _one_step_loss(model).backward()
    for gate in model.fusion.gates():
        assert gate.grad is not None and gate.grad.abs() > 0
    for name, p in model.fusion.named_parameters():
        if not name.endswith("gate"):
            assert p.grad is None or not p.grad.any(), name
    # With the gates open, every parameter of the model receives a gradient.
    model.zero_grad(set_to_none=True)
    set_gates(model, 0.5)
    loss = _one_step_loss(model)
    assert torch.isfinite(loss)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    nonfinite = [
        n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not dead, dead
    assert not nonfinite, nonfinite


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gradient_checkpointing_gives_the_same_gradients(placement: str) -> None:
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        cfg = _placed_config(placement, fusion_depth=3)
        cfg.image.drop_path_rate = 0.2  # stochastic depth and dropout: the recomputation must replay the RNG
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=VOCAB)
        set_gates(model, 0.5)
        model.set_grad_checkpointing(image=checkpointing, text=checkpointing)
        model.train()
        calls = []
        # The block's MLP runs in every placement (the split before_mlp block never calls the block module).
        model.image_encoder.get_block(4).mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)
        _one_step_loss(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert ckpt_calls == 2 * plain_calls  # the block really was recomputed in backward
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name
