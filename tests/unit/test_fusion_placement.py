"""Where CMAF joins a fused block: before the block's MLP (FIBER, the paper) or after the block.

The "before_mlp" placement splits timm's Swin block and transformers' RoBERTa layer into their two residual steps
and puts the gated cross-attention between them. Checked here: fusion off is still timm / transformers exactly;
with closed gates the split blocks are the unsplit ones exactly (including Swin's cyclic shift and window
padding); with open gates the result equals a pair-by-pair reference built by hand from the blocks' submodules;
the fused signal really reaches the MLPs; the config switch reaches the model.
"""

from __future__ import annotations

from typing import Any, get_args

import pytest
import torch

from tests.conftest import REPO
from tests.fixtures_model import VOCAB, make_batch, model_config, set_gates
from volta.config import ConfigError, ModelConfig, load_config
from volta.models import VoLTAModel, build_model
from volta.models.fusion import FUSION_PLACEMENTS, GatedCrossAttention
from volta.models.image_encoder import SwinImageEncoder, create_swin
from volta.models.text_encoder import RobertaTextEncoder

PLACEMENTS = ["before_mlp", "after_block"]
# 56 px, window 4: stages of 14x14 and 7x7 tokens are padded to whole windows and every second block is shifted,
# so fusing all 6 blocks exercises timm's cyclic shift, padding and shifted-window mask inside the split block.
SHIFTED_PADDED: dict[str, Any] = {
    "img_size": 56,
    "timm_kwargs": {"embed_dim": 16, "depths": [2, 2, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 4},
}


def _config(placement: str, *, shifted_padded: bool = False, **kwargs: Any) -> ModelConfig:
    data = model_config(**kwargs).model_dump()
    if shifted_padded:
        data["image"].update(SHIFTED_PADDED)
    data["fusion_placement"] = placement
    return ModelConfig.model_validate(data)


def _model(placement: str, *, seed: int = 0, **kwargs: Any) -> VoLTAModel:
    torch.manual_seed(seed)
    return build_model(_config(placement, **kwargs), vocab_size=VOCAB)


def _open_gates_unequally(model: VoLTAModel) -> None:
    """A different nonzero value per gate, so that a gate applied to the wrong block shows."""
    with torch.no_grad():
        for j, gate in enumerate(model.fusion.gates()):
            gate.fill_(0.3 + 0.1 * j)


def test_the_test_variant_really_shifts_and_pads() -> None:
    enc = _model("before_mlp", shifted_padded=True, fusion_depth=6, text_layers=6).image_encoder
    blocks = [enc.get_block(i) for i in range(enc.num_blocks)]
    assert any(any(b.shift_size) for b in blocks)
    res = [tuple(b.input_resolution) for b in blocks]  # type: ignore[arg-type]
    assert any(h % b.window_size[0] for b, (h, _) in zip(blocks, res))


# ------------------------------------------------------------------------------------------- fusion off
@pytest.mark.parametrize("shifted_padded", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fusion_off_is_exactly_timm_and_transformers_for_either_placement(
    placement: str, shifted_padded: bool
) -> None:
    model = _model(placement, shifted_padded=shifted_padded, fusion_depth=4).eval()
    set_gates(model, 0.7)  # irrelevant with fusion off
    images, ids, mask = make_batch(model)
    with torch.no_grad():
        out = model(images, ids, mask, fusion=False)
        timm_tokens = model.image_encoder.swin.forward_features(images).flatten(1, 2)
        hf_tokens = model.text_encoder.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out.image_tokens, timm_tokens)
    assert torch.equal(out.text_tokens, hf_tokens)


# ---------------------------------------------------------------------------------------- closed gates
@pytest.mark.parametrize("train", [False, True])
def test_closed_gates_before_mlp_equal_fusion_off_exactly(train: bool) -> None:
    # Training mode with stochastic depth and dropout: the split blocks draw the same masks in the same order.
    drop = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1} if train else {}
    cfg = _config("before_mlp", shifted_padded=True, fusion_depth=6, text_layers=6, **drop)
    cfg.image.drop_path_rate = 0.3 if train else 0.0
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=VOCAB).train(train)
    images, ids, mask = make_batch(model)
    img, txt = model.image_prefix(images), model.text_prefix(ids, mask)
    with torch.no_grad():
        torch.manual_seed(1)
        off = model.encode(img, txt, fusion=False)
        torch.manual_seed(1)
        on = model.encode(img, txt, fusion=True)
    assert torch.equal(on.image_tokens, off.image_tokens)
    assert torch.equal(on.text_tokens, off.text_tokens)


# ------------------------------------------------------------------------------------------ open gates
def _xattn(
    m: GatedCrossAttention, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None
) -> torch.Tensor:
    """``gate * MHA(LN(x), LN(ctx))`` from the module's parts, ``x (B, L, D)``, ``ctx (B, S, Dc)``."""
    kv = m.context_norm(ctx)
    pad = None if ctx_mask is None else ~ctx_mask.bool()
    y, _ = m.attn(m.norm(x), kv, kv, key_padding_mask=pad, need_weights=False)
    return m.gate * y


def _post_attention_state(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``norm2`` while timm's own ``SwinTransformerBlock.forward`` runs on ``x``."""
    captured: list[torch.Tensor] = []
    hook = block.norm2.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        block(x)
    finally:
        hook.remove()
    return captured[0]


def _reference_before_mlp(
    model: VoLTAModel, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FIBER-placed fusion, pair by pair, from the blocks' submodules (eval mode: no dropout, no drop path).

    Swin: the post-attention state is the input of ``norm2`` in timm's own block forward (captured by a hook, so
    the shift / padding / window partition are timm's, untouched by the adapter); then the gated cross-attention
    and ``x + mlp(norm2(x))``. RoBERTa: ``attention.self`` + ``attention.output`` (dense, residual, LayerNorm), the
    gated cross-attention, then ``output(intermediate(a), a)``. Each side reads the other's pair input.
    """
    img_enc, txt_enc = model.image_encoder, model.text_encoder
    x = img_enc.run(img_enc.embed(images), 0, model.first_fused_image_block)  # (B, H, W, C)
    t = txt_enc.embed(ids, mask)  # (B, T, D)
    layer_mask = txt_enc.layer_mask(t, mask)
    for j in range(model.first_fused_text_layer):
        t = txt_enc.roberta.encoder.layer[j](t, layer_mask)
    for k in range(model.fusion_depth):
        x = img_enc.enter(model.first_fused_image_block + k, x)
        block = img_enc.get_block(model.first_fused_image_block + k)
        layer = txt_enc.roberta.encoder.layer[model.first_fused_text_layer + k]
        x_in, t_in = x, t
        # image block k
        b, h, w, c = x_in.shape
        a = _post_attention_state(block, x_in)  # (B, HW, C): x + W-MSA(norm1(x)) as timm computed it
        a = a + _xattn(model.fusion.image[k], a, t_in, mask)
        x = (a + block.mlp(block.norm2(a))).reshape(b, h, w, c)
        # text layer k
        s = layer.attention.output(layer.attention.self(t_in, attention_mask=layer_mask)[0], t_in)
        s = s + _xattn(model.fusion.text[k], s, x_in.flatten(1, 2), None)
        t = layer.output(layer.intermediate(s), s)
    return img_enc.norm(x).flatten(1, 2), t


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shifted_padded": True, "fusion_depth": 6, "text_layers": 6},  # every block, shifts, padding
        {"fusion_depth": 3},  # debug Swin: stage 3 and 4, the patch merging between fused blocks
    ],
    ids=["shifted_padded-all_blocks", "debug-across_stages"],
)
def test_open_gates_before_mlp_equal_a_reference_from_block_submodules(kwargs: dict[str, Any]) -> None:
    model = _model("before_mlp", **kwargs).eval()
    _open_gates_unequally(model)
    images, ids, mask = make_batch(model)
    with torch.no_grad():
        out = model(images, ids, mask, fusion=True)
        off = model(images, ids, mask, fusion=False)
        want_image, want_text = _reference_before_mlp(model, images, ids, mask)
    assert not torch.allclose(out.image_tokens, off.image_tokens, atol=1e-3)  # the gates really act
    assert not torch.allclose(out.text_tokens, off.text_tokens, atol=1e-3)
    torch.testing.assert_close(out.image_tokens, want_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.text_tokens, want_text, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ the MLP reads the fusion
def _mlp_inputs(
    model: VoLTAModel, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the first fused Swin block's MLP and the first fused RoBERTa layer's feed-forward read."""
    block = model.image_encoder.get_block(model.first_fused_image_block)
    layer = model.text_encoder.roberta.encoder.layer[model.first_fused_text_layer]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        block.mlp.register_forward_pre_hook(lambda _m, args: seen.__setitem__("image", args[0])),
        layer.intermediate.register_forward_pre_hook(lambda _m, args: seen.__setitem__("text", args[0])),
    ]
    with torch.no_grad():
        model(images, ids, mask, fusion=True)
    for hook in hooks:
        hook.remove()
    return seen["image"], seen["text"]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_only_before_mlp_feeds_the_other_modality_through_the_block_mlp(placement: str) -> None:
    model = _model(placement, fusion_depth=2).eval()
    set_gates(model, 0.5)
    images, ids, mask = make_batch(model, seed=0)
    other_images, other_ids, _ = make_batch(model, seed=1)
    other_ids[mask == 0] = 1  # same padding, other words
    image_mlp, text_mlp = _mlp_inputs(model, images, ids, mask)
    image_mlp_other_text, _ = _mlp_inputs(model, images, other_ids, mask)
    _, text_mlp_other_image = _mlp_inputs(model, other_images, ids, mask)
    # after_block: the first fused block's MLP runs before any cross-attention, so it cannot see the other side.
    reads_other = placement == "before_mlp"
    assert (not torch.equal(image_mlp, image_mlp_other_text)) is reads_other
    assert (not torch.equal(text_mlp, text_mlp_other_image)) is reads_other


def test_same_weights_give_the_same_dual_encoder_and_different_fused_outputs() -> None:
    after, before = _model("after_block", fusion_depth=2).eval(), _model("before_mlp", fusion_depth=2).eval()
    before.load_state_dict(after.state_dict())  # the placement adds no parameters
    set_gates(after, 0.5)
    set_gates(before, 0.5)
    images, ids, mask = make_batch(after)
    with torch.no_grad():
        off_a, off_b = after(images, ids, mask, fusion=False), before(images, ids, mask, fusion=False)
        on_a, on_b = after(images, ids, mask, fusion=True), before(images, ids, mask, fusion=True)
    assert torch.equal(off_a.image_tokens, off_b.image_tokens) and torch.equal(
        off_a.text_tokens, off_b.text_tokens
    )
    assert not torch.allclose(on_a.image_tokens, on_b.image_tokens, atol=1e-4)
    assert not torch.allclose(on_a.text_tokens, on_b.text_tokens, atol=1e-4)


# ----------------------------------------------------------------------------------------- the switch
def test_placement_is_one_config_line_through_the_factory() -> None:
    debug = REPO / "configs" / "debug.yaml"
    assert load_config(debug).model.fusion_placement == "after_block"  # the default, unchanged behaviour
    cfg = load_config(debug, ["model.fusion_placement=before_mlp"])
    assert build_model(cfg.model, vocab_size=VOCAB).fusion_placement == "before_mlp"
    with pytest.raises(
        ConfigError, match=r"model.fusion_placement: Input should be 'before_mlp' or 'after_block'"
    ):
        load_config(debug, ["model.fusion_placement=inside"])
    annotation = ModelConfig.model_fields["fusion_placement"].annotation
    assert set(get_args(annotation)) == set(FUSION_PLACEMENTS)


def test_the_model_rejects_an_unknown_placement() -> None:
    cfg = model_config()
    image = SwinImageEncoder(
        create_swin(cfg.image.name, img_size=cfg.image.img_size, timm_kwargs=cfg.image.timm_kwargs)
    )
    from volta.models.factory import text_config_for

    text = RobertaTextEncoder.from_config(text_config_for(cfg, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="fusion_placement must be one of before_mlp, after_block"):
        VoLTAModel(image, text, fusion_depth=2, fusion_placement="inside")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- gate init
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gate_init_opens_the_cross_attention_to_gradient_from_the_first_step(placement: str) -> None:
    cfg = load_config(REPO / "configs" / "debug.yaml")
    assert cfg.model.fusion_gate_init == 0.0  # the paper's, the default
    images = ids = mask = None
    grads: dict[float, float] = {}
    dual: dict[float, torch.Tensor] = {}
    for init in (0.0, 0.25):
        torch.manual_seed(0)
        cfg_model = _config(placement, fusion_depth=2).model_copy(update={"fusion_gate_init": init})
        model = build_model(cfg_model, vocab_size=VOCAB)
        assert all(float(g.detach()) == init for g in model.fusion.gates())
        if images is None:
            images, ids, mask = make_batch(model)
        out = model(images, ids, mask, fusion=True)
        (out.image_tokens.square().mean() + out.text_tokens.square().mean()).backward()
        grads[init] = sum(
            float(p.grad.abs().sum())
            for name, p in model.fusion.named_parameters()
            if not name.endswith("gate") and p.grad is not None
        )
        with torch.no_grad():
            dual[init] = model(images, ids, mask, fusion=False).text_tokens
    # A closed gate passes no gradient to the weights under it; an open one does.
    assert grads[0.0] == 0.0 and grads[0.25] > 0.0
    # Fusion off never reads the gates: the dual-encoder outputs are the same whatever the init.
    assert torch.equal(dual[0.0], dual[0.25])


def test_gate_init_is_validated() -> None:
    with pytest.raises(ConfigError, match="model.fusion_gate_init"):
        load_config(REPO / "configs" / "debug.yaml", ["model.fusion_gate_init=3"])
