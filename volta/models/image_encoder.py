"""A thin adapter over timm's Swin Transformer that exposes its blocks one at a time.

timm runs Swin as ``patch_embed -> stages (downsample, blocks) -> norm`` on NHWC tokens. The VoLTA model needs to
stop below the fused blocks, run the remaining blocks one by one (interleaved with the text encoder and the
cross-attention) and finish with the final norm. This adapter numbers the blocks over all stages and calls timm's
own modules in timm's order, so a full uni-modal pass is bit-identical to ``SwinTransformer.forward_features``.

A fused block can take the cross-modal fusion between its two residual branches (FIBER's placement): the adapter
then runs the block's own halves, timm's window attention (``_attn``: cyclic shift, padding, window partition and
mask, as timm does them) and its MLP, with the fusion between them, instead of the block's ``forward``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from torch import nn

from volta.models.checkpointing import call_checkpointed
from volta.models.fusion import FuseFn, FusionPlacement

__all__ = ["SwinImageEncoder", "create_swin"]


def _attention_branch(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's first residual step, as timm's ``forward`` runs it: ``x + drop_path1(W-MSA(norm1(x)))``."""
    return x + block.drop_path1(block._attn(block.norm1(x)))  # (B, H, W, C)


def _mlp_branch(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's second residual step on ``(B, H, W, C)`` tokens, on the flattened tokens as timm's ``forward``."""
    b, h, w, c = x.shape
    y = x.reshape(b, -1, c)  # (B, HW, C)
    y = y + block.drop_path2(block.mlp(block.norm2(y)))
    return y.reshape(b, h, w, c)


def _run_block(
    block: SwinTransformerBlock, x: torch.Tensor, fuse: FuseFn | None, placement: FusionPlacement
) -> torch.Tensor:
    if fuse is None:
        return block(x)
    if placement == "after_block":
        return fuse(block(x))
    if placement == "before_mlp":
        return _mlp_branch(block, fuse(_attention_branch(block, x)))
    raise ValueError(f"unknown fusion placement {placement!r}")


def create_swin(
    name: str, *, img_size: int, drop_path_rate: float = 0.0, timm_kwargs: dict[str, Any] | None = None
) -> SwinTransformer:
    """Create a randomly initialised timm Swin Transformer without a classifier (no I/O).

    ``timm_kwargs`` are passed to ``timm.create_model`` (embed_dim, depths, num_heads, window_size, ...); a
    classifier (``num_classes`` > 0) is refused because its parameters would never receive a gradient.
    """
    kwargs = dict(timm_kwargs or {})
    if kwargs.pop("num_classes", 0):
        raise ValueError("timm_kwargs.num_classes: the image encoder has no classifier; leave it unset or 0")
    model = timm.create_model(
        name, pretrained=False, num_classes=0, img_size=img_size, drop_path_rate=drop_path_rate, **kwargs
    )
    if not isinstance(model, SwinTransformer):
        raise ValueError(f"{name!r} is not a timm SwinTransformer (got {type(model).__name__})")
    return model


class SwinImageEncoder(nn.Module):
    """timm's ``SwinTransformer`` with its blocks numbered 0..num_blocks-1 over all stages.

    Block ``i`` is entered by :meth:`enter` (the stage's patch merging when ``i`` opens a stage after the first,
    nothing otherwise) and run by :meth:`block`; :meth:`embed` and :meth:`norm` are the patch embedding and the
    final norm. Tokens are NHWC, ``(B, H, W, C)``, as timm keeps them inside the stages.
    """

    def __init__(self, swin: SwinTransformer, *, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if not isinstance(swin, SwinTransformer):
            raise TypeError(f"expected a timm SwinTransformer, got {type(swin).__name__}")
        stages: list[SwinTransformerStage] = list(swin.layers)  # type: ignore[arg-type]
        if any(len(stage.blocks) == 0 for stage in stages):
            raise ValueError("every Swin stage needs at least one block")
        self.swin = swin
        self.grad_checkpointing = grad_checkpointing
        # (stage, block within stage) of each block, in execution order.
        self._where: list[tuple[int, int]] = [
            (s, b) for s, stage in enumerate(stages) for b in range(len(stage.blocks))
        ]

    def _stage(self, s: int) -> SwinTransformerStage:
        return self.swin.layers[s]  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        """Swin blocks over all stages."""
        return len(self._where)

    @property
    def out_dim(self) -> int:
        """Channels of the final tokens."""
        return int(self.swin.num_features)

    def get_block(self, i: int) -> SwinTransformerBlock:
        """Block ``i`` counted over all stages."""
        s, b = self._where[i]
        return self._stage(s).blocks[b]  # type: ignore[return-value]

    def block_dim(self, i: int) -> int:
        """Channels of the tokens that block ``i`` reads and writes."""
        return int(self.get_block(i).dim)

    def block_heads(self, i: int) -> int:
        """Attention heads of block ``i``."""
        return int(self.get_block(i).attn.num_heads)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding: ``(B, 3, H, W)`` images to ``(B, H/p, W/p, C0)`` tokens."""
        return self.swin.patch_embed(images)

    def enter(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Prepare the input of block ``i``: the stage's downsampling when block ``i`` opens a stage."""
        s, b = self._where[i]
        if b == 0:
            x = self._stage(s).downsample(x)  # identity for the first stage
        return x

    def block(
        self,
        i: int,
        x: torch.Tensor,
        fuse: FuseFn | None = None,
        *,
        placement: FusionPlacement = "after_block",
    ) -> torch.Tensor:
        """Run block ``i`` on ``(B, H, W, C)`` tokens, with ``fuse`` applied to its residual stream at ``placement``.

        Without ``fuse`` this is the timm block's own ``forward``. ``"after_block"`` applies ``fuse`` to the block's
        output; ``"before_mlp"`` to the state after the (shifted-)window attention step, so that the block's MLP
        reads the fused tokens. Block and fusion are checkpointed together when enabled and training.
        """
        return call_checkpointed(
            _run_block,
            self.get_block(i),
            x,
            fuse,
            placement,
            enabled=self.grad_checkpointing and self.training,
        )  # (B, H, W, C)

    def run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Enter and run blocks ``start..stop-1`` in order."""
        for i in range(start, stop):
            x = self.block(i, self.enter(i, x))
        return x

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of the last stage's tokens."""
        return self.swin.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The uni-modal encoder: images ``(B, 3, H, W)`` to normed tokens ``(B, P, C)``."""
        x = self.run(self.embed(images), 0, self.num_blocks)
        return self.norm(x).flatten(1, 2)  # (B, P, C)
