"""A thin adapter over Hugging Face's ``RobertaModel`` that exposes its layers one at a time.

``RobertaModel.forward`` runs ``embeddings -> bidirectional attention mask -> layers``; the VoLTA model needs to
stop below the fused layers and run the rest one by one, interleaved with the image encoder. This adapter calls
the model's own embedding module, transformers' own mask builder and the model's own layers, in that order, so a
full uni-modal pass is bit-identical to ``RobertaModel(input_ids, attention_mask).last_hidden_state``.

A fused layer can take the cross-modal fusion between its attention and feed-forward sublayers (FIBER's placement):
the adapter then calls the layer's own ``attention`` sublayer (self-attention, output projection, dropout, residual,
LayerNorm), the fusion, and the layer's own ``feed_forward_chunk`` through transformers' chunking helper, which is
what ``RobertaLayer.forward`` does for an encoder, with the fusion added between the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import RobertaConfig, RobertaModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.roberta.modeling_roberta import RobertaLayer
from transformers.pytorch_utils import apply_chunking_to_forward

from volta.models.checkpointing import call_checkpointed
from volta.models.fusion import FuseFn, FusionPlacement

__all__ = ["RobertaTextEncoder", "resolve_text_config"]


def _run_layer(
    layer: RobertaLayer,
    hidden: torch.Tensor,
    layer_mask: Any,
    fuse: FuseFn | None,
    placement: FusionPlacement,
) -> torch.Tensor:
    if fuse is None:
        return layer(hidden, layer_mask)
    if placement == "after_block":
        return fuse(layer(hidden, layer_mask))
    if placement == "before_mlp":
        attention_output, _ = layer.attention(hidden, layer_mask)  # (B, T, D), post-LN
        return apply_chunking_to_forward(
            layer.feed_forward_chunk, layer.chunk_size_feed_forward, layer.seq_len_dim, fuse(attention_output)
        )
    raise ValueError(f"unknown fusion placement {placement!r}")


# Architectures of common RoBERTa checkpoints, so that a model can be built (random init, parameter counts) without
# downloading anything. Values are those of the checkpoints' config.json files.
_ROBERTA_BASE: dict[str, Any] = dict(
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=514,
    type_vocab_size=1,
    initializer_range=0.02,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
_ROBERTA_LARGE = dict(
    _ROBERTA_BASE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
)
_DISTILROBERTA = dict(_ROBERTA_BASE, num_hidden_layers=6)
_KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "roberta-base": _ROBERTA_BASE,
    "FacebookAI/roberta-base": _ROBERTA_BASE,
    "roberta-large": _ROBERTA_LARGE,
    "FacebookAI/roberta-large": _ROBERTA_LARGE,
    "distilroberta-base": _DISTILROBERTA,
    "distilbert/distilroberta-base": _DISTILROBERTA,
}


def resolve_text_config(
    name: str,
    *,
    pretrained: bool | str = False,
    config_overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
) -> RobertaConfig:
    """The ``RobertaConfig`` of the text encoder: the checkpoint's architecture, then overrides, then vocab size.

    The architecture comes from the local folder when ``pretrained`` is a path, from a built-in table for the
    common RoBERTa names (no download), and otherwise from ``RobertaConfig.from_pretrained(name)`` (a local folder
    or the hub's config.json). Unknown override keys are errors (a typo would silently be ignored otherwise).
    """
    if isinstance(pretrained, str):
        config = RobertaConfig.from_pretrained(pretrained)
    elif name in _KNOWN_CONFIGS:
        config = RobertaConfig(**_KNOWN_CONFIGS[name])
    else:
        config = RobertaConfig.from_pretrained(name if not Path(name).is_dir() else str(Path(name)))
    for key, value in (config_overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"model.text.config_overrides.{key}: not a RobertaConfig field")
        setattr(config, key, value)
    if vocab_size is not None:
        config.vocab_size = int(vocab_size)
    if config.is_decoder or config.add_cross_attention:
        raise ValueError(
            "the text encoder must be a bidirectional encoder (is_decoder/add_cross_attention false)"
        )
    return config


class RobertaTextEncoder(nn.Module):
    """Hugging Face's ``RobertaModel`` (without pooler) with its layers numbered 0..num_layers-1.

    :meth:`embed` returns the embedding output; :meth:`layer_mask` builds the attention mask the layers take (the
    same call ``RobertaModel`` makes, so it follows the configured attention implementation); :meth:`layer` runs
    one layer. Position ids are derived from ``attention_mask`` (RoBERTa numbers real tokens from
    ``padding_idx + 1``), which equals Hugging Face's numbering from the pad id whenever padded positions hold the
    pad token, and keeps real tokens independent of whatever ids the padded positions hold.
    """

    def __init__(self, roberta: RobertaModel, *, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if not isinstance(roberta, RobertaModel):
            raise TypeError(f"expected a transformers RobertaModel, got {type(roberta).__name__}")
        if roberta.pooler is not None:
            raise ValueError(
                "build the RobertaModel with add_pooling_layer=False (VoLTA never uses its pooler)"
            )
        self.roberta = roberta
        self.grad_checkpointing = grad_checkpointing

    @classmethod
    def from_config(cls, config: RobertaConfig, *, grad_checkpointing: bool = False) -> RobertaTextEncoder:
        """A randomly initialised encoder of the given architecture (no I/O)."""
        return cls(RobertaModel(config, add_pooling_layer=False), grad_checkpointing=grad_checkpointing)

    @property
    def config(self) -> RobertaConfig:
        """The wrapped model's config."""
        return self.roberta.config

    @property
    def num_layers(self) -> int:
        """Transformer layers."""
        return len(self.roberta.encoder.layer)

    @property
    def width(self) -> int:
        """Hidden size."""
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        """Attention heads per layer."""
        return int(self.config.num_attention_heads)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The input token embedding (tied to the MLM decoder)."""
        return self.roberta.embeddings.word_embeddings

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token + position + type embeddings, ``(B, T)`` ids to ``(B, T, D)``."""
        padding_idx = self.roberta.embeddings.padding_idx
        real = attention_mask.int()
        position_ids = (torch.cumsum(real, dim=1).type_as(real) * real).long() + padding_idx  # (B, T)
        return self.roberta.embeddings(input_ids=input_ids, position_ids=position_ids)

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """The self-attention mask the layers take, built by transformers from the ``(B, T)`` padding mask."""
        return create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )

    def layer(
        self,
        i: int,
        hidden: torch.Tensor,
        layer_mask: Any,
        fuse: FuseFn | None = None,
        *,
        placement: FusionPlacement = "after_block",
    ) -> torch.Tensor:
        """Run layer ``i`` on ``(B, T, D)`` states, with ``fuse`` applied to its residual stream at ``placement``.

        Without ``fuse`` this is the layer's own ``forward``. ``"after_block"`` applies ``fuse`` to the layer's
        output; ``"before_mlp"`` to the attention sublayer's output, so that the feed-forward sublayer (and its
        residual and LayerNorm) reads the fused states. Layer and fusion are checkpointed together when enabled
        and training.
        """
        return call_checkpointed(
            _run_layer,
            self.roberta.encoder.layer[i],
            hidden,
            layer_mask,
            fuse,
            placement,
            enabled=self.grad_checkpointing and self.training,
        )  # (B, T, D)

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run layers ``start..stop-1`` in order."""
        mask = self.layer_mask(hidden, attention_mask)
        for i in range(start, stop):
            hidden = self.layer(i, hidden, mask)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The uni-modal encoder: ``(B, T)`` ids and padding mask to ``(B, T, D)`` token states."""
        return self.run(self.embed(input_ids, attention_mask), attention_mask, 0, self.num_layers)
