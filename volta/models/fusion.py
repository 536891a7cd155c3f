"""CMAF: gated cross-modal attention fusion (docs/method.md section 1).

Each fused block pair owns two :class:`GatedCrossAttention` modules: the image block's (queries = image tokens,
keys/values = text tokens, padding masked out) and the text layer's (queries = text tokens, keys/values = the
flattened image tokens). Their outputs are added through learnable scalar gates initialised to 0, so at
initialisation the fused network computes exactly the uni-modal one.

Where the gated term joins the block's residual stream is a :data:`FusionPlacement`: ``"before_mlp"`` between the
block's self-attention and its MLP, so the fused signal goes through the MLP (FIBER's placement, which VoLTA follows),
or ``"after_block"`` on the block's output. The encoder adapters apply the fusion at the placement they are given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
from torch import nn

__all__ = ["FUSION_PLACEMENTS", "CrossModalFusion", "FuseFn", "FusionPlacement", "GatedCrossAttention"]

# "before_mlp": x = x + attn(x); x = x + gate * xattn(x, other); x = x + mlp(x)   (FIBER, the paper)
# "after_block": x = block(x); x = x + gate * xattn(x, other)
FusionPlacement = Literal["before_mlp", "after_block"]
FUSION_PLACEMENTS: tuple[str, ...] = get_args(FusionPlacement)
# The fusion of one block: its residual stream in, the same stream with the gated cross-attention added out.
FuseFn = Callable[[torch.Tensor], torch.Tensor]


class GatedCrossAttention(nn.Module):
    """``x + gate * MHA(LN(x), LN(context))``: cross-attention from ``dim`` queries to ``context_dim`` keys/values.

    ``gate`` is a learnable scalar initialised to ``gate_init`` (0, the paper's: the fused network starts as the
    uni-modal one; the cross-attention under a gate at 0 gets no gradient until the gate moves). Keys and values are projected from the other modality's
    width by ``nn.MultiheadAttention`` (``kdim = vdim = context_dim``). The context is layer-normed too because
    Swin's residual stream is not normalised between blocks.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_heads: int,
        *,
        eps: float = 1e-5,
        dropout: float = 0.0,
        gate_init: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by {num_heads} heads")
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.context_norm = nn.LayerNorm(context_dim, eps=eps)
        self.attn = nn.MultiheadAttention(
            dim, num_heads, dropout=dropout, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        # Shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters (its comm op views them as bytes).
        self.gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from ``x (B, L, D)`` to ``context (B, S, Dc)``; ``context_mask (B, S)`` is True/1 on real tokens."""
        padding = None if context_mask is None else ~context_mask.bool()  # (B, S) True = ignore
        kv = self.context_norm(context)  # (B, S, Dc)
        y, _ = self.attn(self.norm(x), kv, kv, key_padding_mask=padding, need_weights=False)  # (B, L, D)
        return x + self.gate * y


class CrossModalFusion(nn.Module):
    """The cross-attention modules of the N fused block pairs (pair k = image block k, text layer k of the tail).

    ``image[k]`` lets image block k (``image_dims[k]`` channels, ``image_heads[k]`` heads) attend to text tokens
    of width ``text_dim``; ``text[k]`` lets text layer k attend to the image tokens that image block k reads.
    With N = 0 it holds no modules.
    """

    def __init__(
        self,
        image_dims: Sequence[int],
        image_heads: Sequence[int],
        text_dim: int,
        text_heads: int,
        *,
        image_eps: float = 1e-5,
        text_eps: float = 1e-5,
        gate_init: float = 0.0,
    ) -> None:
        super().__init__()
        if len(image_dims) != len(image_heads):
            raise ValueError("image_dims and image_heads must have one entry per fused image block")
        self.image = nn.ModuleList(
            GatedCrossAttention(d, text_dim, h, eps=image_eps, gate_init=gate_init)
            for d, h in zip(image_dims, image_heads)
        )
        self.text = nn.ModuleList(
            GatedCrossAttention(text_dim, d, text_heads, eps=text_eps, gate_init=gate_init)
            for d in image_dims
        )

    @property
    def depth(self) -> int:
        """Number of fused block pairs."""
        return len(self.image)

    def gates(self) -> list[nn.Parameter]:
        """Every gate, image side first then text side."""
        modules: list[GatedCrossAttention] = [*self.image, *self.text]  # type: ignore[list-item]
        return [m.gate for m in modules]

    def fuse_image(
        self, k: int, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Pair k, image side: ``x (B, H, W, C)`` attends to ``text (B, T, Dt)`` with padding masked out."""
        b, h, w, c = x.shape
        y = self.image[k](x.reshape(b, h * w, c), text, text_mask)  # (B, HW, C)
        return y.reshape(b, h, w, c)

    def fuse_text(self, k: int, t: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Pair k, text side: ``t (B, T, Dt)`` attends to the ``(B, H, W, C)`` image tokens, flattened."""
        return self.text[k](t, image.flatten(1, 2))  # (B, T, Dt)
