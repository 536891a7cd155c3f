"""The VoLTA model: Swin + RoBERTa with gated cross-attention in their last N blocks, and VoLTA's heads.

Fusion is a per-call switch. ``fusion=False`` is a pure dual encoder whose token outputs are bit-identical to
timm's ``forward_features`` and Hugging Face's ``last_hidden_state``; ``fusion=True`` runs the N fused block pairs
in lockstep (image block k and text layer k each read the other's states from before pair k). ``fusion_placement``
says where each gated cross-attention joins its block: before the block's MLP (FIBER, the paper) or after the block.

The computation below the fused blocks does not depend on the other modality, so it can be computed once and
reused across the loss passes (docs/method.md 4.8)::

    img = model.image_prefix(images)                 # once per image view
    txt = model.text_prefix(input_ids, attention_mask)
    dual = model.encode(img, txt, fusion=False)      # BT + GOT
    fused = model.encode(img.index(perm), txt, fusion=True)   # ITM with permuted images
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from volta.models.fusion import FUSION_PLACEMENTS, CrossModalFusion, FuseFn, FusionPlacement
from volta.models.heads import ITMHead, MLPProjector, TokenProjector, build_mlm_head, masked_mean
from volta.models.image_encoder import SwinImageEncoder
from volta.models.text_encoder import RobertaTextEncoder

__all__ = [
    "BTProjections",
    "GOTProjections",
    "ImagePrefix",
    "TextPrefix",
    "VoLTAModel",
    "VoLTAOutputs",
]


@dataclass(frozen=True)
class ImagePrefix:
    """Image activations below the fused blocks: the input of the first fused Swin block, ``(B, H, W, C)``."""

    tokens: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Samples in the batch."""
        return int(self.tokens.shape[0])

    def index(self, idx: torch.Tensor) -> ImagePrefix:
        """The prefix of batch rows ``idx`` (e.g. a permutation, to pair captions with other images)."""
        return ImagePrefix(self.tokens[idx])


@dataclass(frozen=True)
class TextPrefix:
    """Text activations below the fused layers, ``(B, T, D)``, with the ``(B, T)`` padding mask (1 = real)."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Samples in the batch."""
        return int(self.hidden.shape[0])

    def index(self, idx: torch.Tensor) -> TextPrefix:
        """The prefix of batch rows ``idx``."""
        return TextPrefix(self.hidden[idx], self.attention_mask[idx])


@dataclass(frozen=True)
class VoLTAOutputs:
    """Final token states of both encoders and their global features, as the heads and losses consume them.

    ``image_tokens (B, P, Di)`` are the normed last-stage Swin tokens, ``text_tokens (B, T, Dt)`` the last RoBERTa
    layer's states, ``text_mask (B, T)`` is True on real (non-padding) tokens, ``fused`` says whether the fused
    blocks exchanged information. ``image_global (B, Di)`` is the mean image token and ``text_global (B, Dt)``
    the mean over real text tokens.
    """

    image_tokens: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    fused: bool
    image_global: torch.Tensor = field(init=False)
    text_global: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_global", self.image_tokens.mean(dim=1))  # (B, Di)
        object.__setattr__(self, "text_global", masked_mean(self.text_tokens, self.text_mask))  # (B, Dt)


@dataclass(frozen=True)
class BTProjections:
    """Barlow Twins projector outputs of the global features, ``(B, out)`` each."""

    image: torch.Tensor
    text: torch.Tensor


@dataclass(frozen=True)
class GOTProjections:
    """Token-wise GOT projector outputs with validity masks (padding rows are zeros and masked False).

    ``image (B, P, D)`` with ``image_mask (B, P)`` (all True), ``text (B, T, D)`` with ``text_mask (B, T)``.
    Not L2-normalised: the GOT loss normalises.
    """

    image: torch.Tensor
    image_mask: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor


class VoLTAModel(nn.Module):
    """Swin image encoder + RoBERTa text encoder + CMAF in the last ``fusion_depth`` blocks + VoLTA heads.

    The fused image blocks are the last ``fusion_depth`` Swin blocks counted over all stages (stage downsampling
    between them still runs); the fused text layers are the last ``fusion_depth`` RoBERTa layers; pair k joins
    image block k and text layer k of those tails. ``fusion_placement`` is where the gated cross-attention joins
    each fused block's residual stream: ``"before_mlp"`` (between self-attention and MLP, as FIBER and the paper) or
    ``"after_block"`` (on the block's output). Heads: Barlow Twins projectors on the global features, token-wise
    GOT projectors, the MLM head (decoder tied to the word embeddings) and the ITM head.
    """

    def __init__(
        self,
        image_encoder: SwinImageEncoder,
        text_encoder: RobertaTextEncoder,
        *,
        fusion_depth: int,
        fusion_placement: FusionPlacement = "after_block",
        fusion_gate_init: float = 0.0,
        shared_dim: int = 768,
        projector_hidden_dim: int = 2048,
        projector_out_dim: int = 1024,
        got_projector_hidden_dim: int = 2048,
        got_projector_out_dim: int = 1024,
        got_projector_output_norm: bool = True,
        itm_input_norm: bool = False,
        itm_product: bool = False,
    ) -> None:
        super().__init__()
        available = min(image_encoder.num_blocks, text_encoder.num_layers)
        if (
            isinstance(fusion_depth, bool)
            or not isinstance(fusion_depth, int)
            or not 0 <= fusion_depth <= available
        ):
            raise ValueError(
                f"fusion_depth must be an integer between 0 and {available} (Swin has {image_encoder.num_blocks} "
                f"blocks, the text encoder {text_encoder.num_layers} layers), got {fusion_depth!r}"
            )
        if fusion_placement not in FUSION_PLACEMENTS:
            raise ValueError(
                f"fusion_placement must be one of {', '.join(FUSION_PLACEMENTS)}, got {fusion_placement!r}"
            )
        self.fusion_depth = fusion_depth
        self.fusion_placement: FusionPlacement = fusion_placement
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        first = image_encoder.num_blocks - fusion_depth
        fused_blocks = range(first, image_encoder.num_blocks)
        self.fusion = CrossModalFusion(
            image_dims=[image_encoder.block_dim(i) for i in fused_blocks],
            image_heads=[image_encoder.block_heads(i) for i in fused_blocks],
            text_dim=text_encoder.width,
            text_heads=text_encoder.num_heads,
            text_eps=text_encoder.config.layer_norm_eps,
            gate_init=fusion_gate_init,
        )
        di, dt = image_encoder.out_dim, text_encoder.width
        self.bt_image_projector = MLPProjector(di, projector_hidden_dim, projector_out_dim)
        self.bt_text_projector = MLPProjector(dt, projector_hidden_dim, projector_out_dim)
        got_kw = {"output_norm": got_projector_output_norm}
        self.got_image_projector = TokenProjector(
            di, got_projector_hidden_dim, got_projector_out_dim, **got_kw
        )
        self.got_text_projector = TokenProjector(
            dt, got_projector_hidden_dim, got_projector_out_dim, **got_kw
        )
        self.mlm_head = build_mlm_head(text_encoder.config, text_encoder.word_embeddings)
        self.itm_head = ITMHead(di, dt, shared_dim, input_norm=itm_input_norm, product=itm_product)

    # ------------------------------------------------------------------------------------------- properties
    @property
    def first_fused_image_block(self) -> int:
        """Index (over all stages) of the first Swin block with cross-attention."""
        return self.image_encoder.num_blocks - self.fusion_depth

    @property
    def first_fused_text_layer(self) -> int:
        """Index of the first RoBERTa layer with cross-attention."""
        return self.text_encoder.num_layers - self.fusion_depth

    @property
    def vocab_size(self) -> int:
        """Rows of the word embedding (MLM classes)."""
        return int(self.text_encoder.word_embeddings.num_embeddings)

    def set_grad_checkpointing(self, *, image: bool, text: bool) -> None:
        """Switch activation checkpointing of each backbone's blocks (and their cross-attention) while training."""
        self.image_encoder.grad_checkpointing = image
        self.text_encoder.grad_checkpointing = text

    # ------------------------------------------------------------------------------------------------ trunk
    def image_prefix(self, images: torch.Tensor) -> ImagePrefix:
        """Run the image encoder below the fused blocks: ``(B, 3, H, W)`` to the first fused block's input."""
        enc = self.image_encoder
        x = enc.run(enc.embed(images), 0, self.first_fused_image_block)  # (B, H, W, C)
        if self.fusion_depth:
            x = enc.enter(self.first_fused_image_block, x)  # the stage downsampling that may precede it
        return ImagePrefix(x)

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextPrefix:
        """Run the text encoder below the fused layers; ``attention_mask (B, T)`` is 1 on real tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        enc = self.text_encoder
        hidden = enc.run(enc.embed(input_ids, attention_mask), attention_mask, 0, self.first_fused_text_layer)
        return TextPrefix(hidden, attention_mask)  # (B, T, D)

    def encode(self, image_prefix: ImagePrefix, text_prefix: TextPrefix, *, fusion: bool) -> VoLTAOutputs:
        """Run the last ``fusion_depth`` blocks of both encoders, fused or not, and the final image norm."""
        if image_prefix.batch_size != text_prefix.batch_size:
            raise ValueError(
                f"image and text batches differ: {image_prefix.batch_size} vs {text_prefix.batch_size}"
            )
        img, txt = self.image_encoder, self.text_encoder
        x, t, mask = image_prefix.tokens, text_prefix.hidden, text_prefix.attention_mask
        layer_mask = txt.layer_mask(t, mask)
        i0, t0, where = self.first_fused_image_block, self.first_fused_text_layer, self.fusion_placement
        for k in range(self.fusion_depth):
            if k > 0:
                x = img.enter(i0 + k, x)
            fuse_x, fuse_t = self._pair_fusion(k, x, t, mask) if fusion else (None, None)
            x, t = (
                img.block(i0 + k, x, fuse_x, placement=where),  # (B, H, W, C)
                txt.layer(t0 + k, t, layer_mask, fuse_t, placement=where),  # (B, T, Dt)
            )
        image_tokens = img.norm(x).flatten(1, 2)  # (B, P, Di)
        return VoLTAOutputs(image_tokens, t, mask.bool(), fused=fusion)

    def encode_text(self, text_prefix: TextPrefix) -> tuple[torch.Tensor, torch.Tensor]:
        """The fusion-off text tokens ``(B, T, Dt)`` and mask ``(B, T)`` (bool) of :meth:`encode`, without the image
        side (fusion off, the text stream does not read it)."""
        txt, t, mask = self.text_encoder, text_prefix.hidden, text_prefix.attention_mask
        layer_mask = txt.layer_mask(t, mask)
        for k in range(self.fusion_depth):
            t = txt.layer(
                self.first_fused_text_layer + k, t, layer_mask, None, placement=self.fusion_placement
            )
        return t, mask.bool()

    def _pair_fusion(
        self, k: int, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor
    ) -> tuple[FuseFn, FuseFn]:
        """Pair k's fusions, bound to the states each side reads: the other stream's input to pair k."""
        return (
            partial(self.fusion.fuse_image, k, text=t, text_mask=mask),
            partial(self.fusion.fuse_text, k, image=x),
        )

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        fusion: bool,
    ) -> VoLTAOutputs:
        """Encode an image-caption batch end to end (no prefix sharing); same result as prefix + :meth:`encode`."""
        return self.encode(
            self.image_prefix(images), self.text_prefix(input_ids, attention_mask), fusion=fusion
        )

    # ------------------------------------------------------------------------------------------------ heads
    def bt_projections(self, out: VoLTAOutputs) -> BTProjections:
        """Barlow Twins projections of the global image and text features, ``(B, projector_out_dim)`` each."""
        return BTProjections(
            image=self.bt_image_projector(out.image_global), text=self.bt_text_projector(out.text_global)
        )

    def got_projections(self, out: VoLTAOutputs) -> GOTProjections:
        """Token-wise GOT projections of every image token and every real text token."""
        b, p, _ = out.image_tokens.shape
        image_mask = torch.ones(b, p, dtype=torch.bool, device=out.image_tokens.device)
        return GOTProjections(
            image=self.got_image_projector(out.image_tokens),
            image_mask=image_mask,
            text=self.got_text_projector(out.text_tokens, out.text_mask),
            text_mask=out.text_mask,
        )

    def mlm_logits(self, out: VoLTAOutputs, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits ``(B, T, V)``, or ``(N, V)`` for the N positions where ``positions (B, T)`` is true.

        Passing the masked positions avoids projecting every token onto the vocabulary.
        """
        tokens = out.text_tokens if positions is None else out.text_tokens[positions.bool()]
        return self.mlm_head(tokens)

    def itm_logits(self, out: VoLTAOutputs) -> torch.Tensor:
        """Image-text matching logits ``(B, 2)`` (class 1 = the caption matches the image)."""
        return self.itm_head(out.image_tokens, out.text_tokens)
