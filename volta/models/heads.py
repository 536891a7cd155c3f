"""VoLTA's heads (docs/method.md section 1): pooling, Barlow Twins and GOT projectors, MLM and ITM heads."""

from __future__ import annotations

import torch
from torch import nn
from transformers import RobertaConfig
from transformers.models.roberta.modeling_roberta import RobertaLMHead

__all__ = ["ITMHead", "MLPProjector", "TokenProjector", "build_mlm_head", "masked_mean"]


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens (B, L, D)`` over the positions where ``mask (B, L)`` is true; padding never contributes."""
    keep = mask.bool().unsqueeze(-1)  # (B, L, 1)
    total = tokens.masked_fill(~keep, 0.0).sum(dim=1)  # (B, D)
    count = keep.sum(dim=1).clamp_min(1).to(total.dtype)  # (B, 1)
    return total / count


class MLPProjector(nn.Sequential):
    """Barlow Twins projector: Linear(d->h)-BN-ReLU-Linear(h->h)-BN-ReLU-Linear(h->out), all without bias.

    A bias before BatchNorm is cancelled by the batch mean (it would never learn), and the last layer's output is
    batch-standardised by the Barlow Twins loss, so none of the three linears carries one (as in Barlow Twins).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, output_norm: bool = False) -> None:
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim, bias=False),
        ]
        if output_norm:
            # Standardise every output channel (no affine): the outputs cannot all point the same way.
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)


class TokenProjector(MLPProjector):
    """The projector MLP applied to every valid token; BatchNorm statistics over valid batch x token positions.

    Padded positions are left out of the computation altogether (not only out of a mean), so they change neither
    the statistics nor the outputs of real tokens; their outputs are zeros.
    """

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Project ``tokens (B, L, D)`` to ``(B, L, out)``; ``mask (B, L)`` marks the valid tokens (None = all)."""
        b, n, d = tokens.shape
        if mask is None:
            return super().forward(tokens.reshape(b * n, d)).reshape(b, n, -1)  # (B, L, out)
        keep = mask.bool()
        y = super().forward(tokens[keep])  # (N_valid, out)
        return y.new_zeros(b, n, y.shape[-1]).index_put((keep,), y)  # (B, L, out)


class ITMHead(nn.Module):
    """Image-text matching: linear maps of both streams to ``shared_dim``, tanh poolers, Linear(2*shared -> 2).

    The text pooler reads the first token (``<s>``, so captions are right-padded); the image pooler reads the mean
    image token. The classifier sees ``[pooled text ; pooled image]``.

    ``input_norm=True`` (not in the paper) batch-standardises the two pooled tokens first (a BatchNorm per stream).
    Backbones trained from scratch give pooled tokens whose part that differs between samples is small next to
    the part they all share (measured on the demo: per-dimension batch std ~0.1-0.2 against norms ~10), so the
    head's logits barely depend on the pair and Adam's bounded steps cannot grow the weights fast enough: the
    paper's head stayed near chance in 200 demo steps (0.54 held-out) while a linear probe on the same frozen fused features reached
    0.74 held-out (docs/benchmarks.md, "Every word").

    ``product=True`` (not in the paper) gives the classifier ``[text ; image ; text * image]``: on the
    concatenation alone its logit is a sum of a text score and an image score, so whether the two *match* must be
    written into the pooled tokens by the fused layers; the product lets the head compare the two streams itself.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        shared_dim: int,
        *,
        input_norm: bool = False,
        product: bool = False,
    ) -> None:
        super().__init__()
        self.image_norm = nn.BatchNorm1d(image_dim) if input_norm else nn.Identity()
        self.text_norm = nn.BatchNorm1d(text_dim) if input_norm else nn.Identity()
        self.image_proj = nn.Linear(image_dim, shared_dim)
        self.text_proj = nn.Linear(text_dim, shared_dim)
        self.image_pooler = nn.Linear(shared_dim, shared_dim)
        self.text_pooler = nn.Linear(shared_dim, shared_dim)
        self.product = product
        self.classifier = nn.Linear((3 if product else 2) * shared_dim, 2)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, P, Di)`` image and ``(B, T, Dt)`` text tokens to ``(B, 2)`` logits (class 1 = matching pair)."""
        # A linear map commutes with the mean: map the mean image token instead of every token.
        image = torch.tanh(
            self.image_pooler(self.image_proj(self.image_norm(image_tokens.mean(dim=1))))
        )  # (B, S)
        text = torch.tanh(self.text_pooler(self.text_proj(self.text_norm(text_tokens[:, 0]))))  # (B, S)
        features = [text, image, text * image] if self.product else [text, image]
        return self.classifier(torch.cat(features, dim=-1))  # (B, 2)


def build_mlm_head(config: RobertaConfig, word_embeddings: nn.Embedding) -> RobertaLMHead:
    """Transformers' ``RobertaLMHead`` (dense-GELU-LayerNorm-decoder) with the decoder tied to ``word_embeddings``.

    Initialised like Hugging Face initialises it inside ``RobertaForMaskedLM`` (normal(0, initializer_range)
    linears, unit LayerNorm, zero vocabulary bias); the decoder's bias is the head's ``bias`` parameter.
    """
    head = RobertaLMHead(config)
    std = config.initializer_range
    nn.init.normal_(head.dense.weight, std=std)
    nn.init.zeros_(head.dense.bias)
    nn.init.ones_(head.layer_norm.weight)
    nn.init.zeros_(head.layer_norm.bias)
    nn.init.zeros_(head.bias)
    head.decoder.weight = word_embeddings.weight
    head.decoder.bias = head.bias
    return head
