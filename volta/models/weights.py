"""Load pretrained backbone weights into a built VoLTA model (the I/O step separate from construction).

Image: timm's own loader (``timm.models.load_pretrained``) with timm's Swin checkpoint filter, so hub weights,
local safetensors/.pth files, old-layout Swin checkpoints and other resolutions or window sizes load as timm loads
them; classifier weights (``head.*``) are dropped. Text: Hugging Face's ``from_pretrained`` (hub name or local
folder; a ``RobertaModel`` or ``RobertaForMaskedLM`` checkpoint, whose ``roberta.`` prefix transformers strips);
when the checkpoint carries an MLM head (``lm_head.*``) it initialises VoLTA's MLM head too. The fusion modules
and the other heads keep their initialisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from timm.models import load_pretrained
from timm.models.swin_transformer import checkpoint_filter_fn
from transformers import RobertaForMaskedLM

from volta.config import ModelConfig
from volta.models.volta_model import VoLTAModel

log = logging.getLogger(__name__)

__all__ = ["load_image_weights", "load_pretrained_weights", "load_text_weights"]


def _split_by_shape(
    incoming: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the tensors whose shape matches the target's (or whose key the target lacks); list the others."""
    kept, mismatched = {}, []
    for key, value in incoming.items():
        if key in target and tuple(target[key].shape) != tuple(value.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            kept[key] = value
    return kept, mismatched


def load_image_weights(model: VoLTAModel, source: bool | str) -> dict[str, Any]:
    """Load Swin weights: ``True`` = timm's pretrained weights for the model's name, a path = a local file.

    Returns a report: ``source``, ``missing`` (model keys the checkpoint did not provide), ``unexpected``
    (checkpoint keys the model lacks), ``dropped`` (classifier keys) and ``mismatched`` (shape conflicts, skipped).
    """
    swin = model.image_encoder.swin
    pretrained_cfg = dict(getattr(swin, "pretrained_cfg", None) or {})
    if isinstance(source, str):
        if not Path(source).is_file():
            raise FileNotFoundError(f"model.image.pretrained: no such weights file {source!r}")
        pretrained_cfg.update(file=str(source), state_dict=None)
        where = str(source)
    else:
        where = f"timm:{pretrained_cfg.get('hf_hub_id') or pretrained_cfg.get('architecture', '?')}"
    report: dict[str, Any] = {"source": where, "dropped": [], "mismatched": []}
    target = swin.state_dict()

    def _filter(state_dict: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
        state_dict = checkpoint_filter_fn(state_dict, module)  # timm's remapping and resizing for Swin
        report["dropped"] = sorted(k for k in state_dict if k.startswith("head."))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        state_dict, report["mismatched"] = _split_by_shape(state_dict, target)
        report["missing"] = sorted(set(target) - set(state_dict))
        report["unexpected"] = sorted(set(state_dict) - set(target))
        return state_dict

    load_pretrained(swin, pretrained_cfg=pretrained_cfg, num_classes=0, filter_fn=_filter, strict=False)
    return report


def load_text_weights(model: VoLTAModel, source: str) -> dict[str, Any]:
    """Load RoBERTa weights from a hub name or a local folder (``from_pretrained``), plus its MLM head if present.

    Returns a report like :func:`load_image_weights` (``dropped`` = the checkpoint's pooler), with ``mlm_head``
    true when ``lm_head.*`` was loaded too.
    """
    result_and_info: Any = RobertaForMaskedLM.from_pretrained(source, output_loading_info=True)
    loaded: RobertaForMaskedLM = result_and_info[0]
    info: dict[str, Any] = result_and_info[1]
    not_in_checkpoint = set(info.get("missing_keys", []))
    encoder = model.text_encoder.roberta
    target = encoder.state_dict()
    incoming = {
        k: v for k, v in loaded.roberta.state_dict().items() if f"roberta.{k}" not in not_in_checkpoint
    }
    incoming, mismatched = _split_by_shape(incoming, target)
    result = encoder.load_state_dict(incoming, strict=False)
    unexpected = set(result.unexpected_keys) | set(info.get("unexpected_keys", []))
    # VoLTA has no pooler (its ITM head has its own): a checkpoint's pooler is dropped, not unexpected.
    pooler = {k for k in unexpected if k.removeprefix("roberta.").startswith("pooler.")}
    report: dict[str, Any] = {
        "source": source,
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(unexpected - pooler),
        "dropped": sorted(pooler),
        "mismatched": mismatched,
        "mlm_head": False,
    }
    if not any(k.startswith("lm_head.") for k in not_in_checkpoint):
        head = model.mlm_head
        lm_state = {k: v for k, v in loaded.lm_head.state_dict().items() if not k.startswith("decoder.")}
        lm_state, lm_mismatched = _split_by_shape(lm_state, head.state_dict())
        if lm_mismatched:
            report["mismatched"] += [f"lm_head.{m}" for m in lm_mismatched]
        else:
            head.load_state_dict(lm_state, strict=False)  # decoder weight/bias are tied: already loaded
            report["mlm_head"] = True
    return report


def load_pretrained_weights(model: VoLTAModel, cfg: ModelConfig) -> dict[str, Any]:
    """Load the backbone weights ``cfg.image.pretrained`` / ``cfg.text.pretrained`` ask for into ``model``.

    ``False`` leaves a backbone at its random initialisation, ``True`` downloads the named checkpoint (timm hub /
    Hugging Face hub), a string is a local file (image) or folder (text). Returns ``{"image": report, "text":
    report}`` (None for a backbone left alone); missing and unexpected keys are also logged.
    """
    reports: dict[str, Any] = {"image": None, "text": None}
    if cfg.image.pretrained is not False:
        reports["image"] = load_image_weights(model, cfg.image.pretrained)
    if cfg.text.pretrained is not False:
        source = cfg.text.pretrained if isinstance(cfg.text.pretrained, str) else cfg.text.name
        reports["text"] = load_text_weights(model, source)
    for part, report in reports.items():
        if report is None:
            continue
        log.info(
            "%s encoder: loaded %s (%d missing, %d unexpected, %d dropped, %d shape mismatches)",
            part,
            report["source"],
            len(report["missing"]),
            len(report["unexpected"]),
            len(report["dropped"]),
            len(report["mismatched"]),
        )
        for kind in ("missing", "unexpected", "mismatched"):
            if report[kind]:
                log.warning("%s encoder: %s keys: %s", part, kind, ", ".join(report[kind][:20]))
    return reports
