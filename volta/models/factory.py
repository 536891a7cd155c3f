"""Build a VoLTA model from the validated config: the one place where model settings are read.

``build_model`` only constructs (random initialisation, no weight files read); loading pretrained backbone
weights is the separate step :func:`load_pretrained_weights` (re-exported here from :mod:`volta.models.weights`).
"""

from __future__ import annotations

from transformers import RobertaConfig

from volta.config import ModelConfig
from volta.models.image_encoder import SwinImageEncoder, create_swin
from volta.models.text_encoder import RobertaTextEncoder, resolve_text_config
from volta.models.volta_model import VoLTAModel
from volta.models.weights import load_pretrained_weights

__all__ = ["build_model", "load_pretrained_weights", "text_config_for"]


def text_config_for(cfg: ModelConfig, *, vocab_size: int | None = None) -> RobertaConfig:
    """The text encoder's ``RobertaConfig`` for a model config (architecture, overrides, vocabulary size)."""
    return resolve_text_config(
        cfg.text.name,
        pretrained=cfg.text.pretrained,
        config_overrides=cfg.text.config_overrides,
        vocab_size=vocab_size,
    )


def build_model(
    cfg: ModelConfig, *, vocab_size: int | None = None, text_config: RobertaConfig | None = None
) -> VoLTAModel:
    """A randomly initialised :class:`VoLTAModel` as ``cfg`` describes it.

    ``vocab_size`` overrides the text encoder's vocabulary (pass ``len(tokenizer)``); ``text_config`` replaces
    the resolved ``RobertaConfig`` altogether (used when reloading a checkpoint). Reads no weights; the text
    architecture comes from a built-in table for the common RoBERTa names, so the paper setting builds offline.
    Wrap the call in ``with torch.device("meta"):`` to build without allocating memory (e.g. to count parameters).
    """
    if text_config is None:
        text_config = text_config_for(cfg, vocab_size=vocab_size)
    elif vocab_size is not None:
        text_config = RobertaConfig.from_dict({**text_config.to_dict(), "vocab_size": int(vocab_size)})
    swin = create_swin(
        cfg.image.name,
        img_size=cfg.image.img_size,
        drop_path_rate=cfg.image.drop_path_rate,
        timm_kwargs=cfg.image.timm_kwargs,
    )
    return VoLTAModel(
        SwinImageEncoder(swin, grad_checkpointing=cfg.image.grad_checkpointing),
        RobertaTextEncoder.from_config(text_config, grad_checkpointing=cfg.text.grad_checkpointing),
        fusion_depth=cfg.fusion_depth,
        fusion_placement=cfg.fusion_placement,
        fusion_gate_init=cfg.fusion_gate_init,
        shared_dim=cfg.shared_dim,
        projector_hidden_dim=cfg.projector_hidden_dim,
        projector_out_dim=cfg.projector_out_dim,
        got_projector_hidden_dim=cfg.got_projector_hidden_dim,
        got_projector_out_dim=cfg.got_projector_out_dim,
        got_projector_output_norm=cfg.got_projector_output_norm,
        itm_input_norm=cfg.itm_input_norm,
        itm_product=cfg.itm_product,
    )
