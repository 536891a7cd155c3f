"""Save and reload whole VoLTA models, and export the trained encoders for timm and transformers users.

* :func:`save_volta_checkpoint` / :func:`load_volta_checkpoint`: a folder with ``model.safetensors`` (every
  parameter and persistent buffer), ``text_config.json`` (the exact RoBERTa architecture, vocabulary included) and
  ``config.yaml`` (the resolved volta config); reloading gives identical parameters and buffers, offline.
* :func:`find_volta_checkpoint`: the checkpoint folder a user points at, given the folder itself, a file in it, a
  run folder (its ``final/``) or an engine checkpoint folder (its ``volta/`` copy).
* :func:`export_encoders`: ``image_encoder.safetensors`` that plain timm loads, ``text_encoder/`` that
  ``RobertaModel.from_pretrained`` (or ``RobertaForMaskedLM``, MLM head included) loads, the volta config, the
  tokenizer when given, and a model card saying how to load them.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_file
from transformers import PreTrainedTokenizerBase, RobertaConfig, RobertaForMaskedLM

from volta.config import ModelConfig, VoltaConfig, dump_config, load_config
from volta.models.factory import build_model
from volta.models.volta_model import VoLTAModel

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILES",
    "checkpoint_subfolder",
    "export_encoders",
    "find_volta_checkpoint",
    "load_volta_checkpoint",
    "not_a_checkpoint_message",
    "save_volta_checkpoint",
    "timm_create_kwargs",
]

_WEIGHTS = "model.safetensors"
_TEXT_CONFIG = "text_config.json"
_CONFIG = "config.yaml"
CHECKPOINT_FILES = (_WEIGHTS, _TEXT_CONFIG, _CONFIG)
# Where a folder holds its checkpoint: the folder itself, a run folder's final model (``final/``), the
# safetensors copy inside an engine checkpoint (``volta/``); the first complete one wins.
_LAYOUTS = ("", "final", "volta")
_EXPORT_MARKER = "image_encoder.safetensors"


def _as_volta_config(cfg: VoltaConfig | ModelConfig) -> VoltaConfig:
    return cfg if isinstance(cfg, VoltaConfig) else VoltaConfig(model=cfg)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary folder into place (the old one, if any, is removed only afterwards)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _unique_cpu_state(model: VoLTAModel) -> dict[str, Any]:
    """Every parameter and persistent buffer once (tied weights under their first name), copied to own CPU memory.

    Copying matters under DeepSpeed, whose parameters are views into one flat buffer: safetensors refuses tensors
    that share storage. Tied weights are the same Parameter object; keeping one name lets ``load_model`` restore
    the tie.
    """
    seen: set[int] = set()
    state: dict[str, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        state[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return state


def save_volta_checkpoint(model: VoLTAModel, path: str | Path, cfg: VoltaConfig | ModelConfig) -> Path:
    """Write ``model`` and its config to the folder ``path`` (atomically replaced); returns the folder.

    ``cfg`` is the run's resolved config (a bare ``ModelConfig`` is wrapped with defaults for the other sections).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        save_file(
            _unique_cpu_state(model),
            str(tmp / _WEIGHTS),
            metadata={"format": "volta", "vocab_size": str(model.vocab_size)},
        )
        (tmp / _TEXT_CONFIG).write_text(model.text_encoder.config.to_json_string())
        dump_config(_as_volta_config(cfg), tmp / _CONFIG)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_volta_checkpoint(path: str | Path) -> tuple[VoLTAModel, VoltaConfig]:
    """Rebuild the model a :func:`save_volta_checkpoint` folder describes and load its weights (strictly).

    Needs no network and no pretrained files: the architecture comes from the folder itself.
    """
    folder = Path(path)
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: not a volta checkpoint (no {name})")
    cfg = load_config(folder / _CONFIG)
    text_config = RobertaConfig.from_json_file(str(folder / _TEXT_CONFIG))
    model = build_model(cfg.model, text_config=text_config)
    missing, unexpected = load_model(model, str(folder / _WEIGHTS), strict=True)
    if missing or unexpected:  # strict loading raises first; kept as a guard
        raise RuntimeError(f"checkpoint/model mismatch: missing {missing}, unexpected {unexpected}")
    return model, cfg


def checkpoint_subfolder(has_file: Callable[[str], bool]) -> str | None:
    """Which part of a folder holds a volta checkpoint: ``""`` (the folder), ``"final"`` or ``"volta"``, or None.

    ``has_file(relative_path)`` says whether the folder holds that file (``"final/model.safetensors"``), so the
    same rule serves local folders and S3 prefixes.
    """
    for sub in _LAYOUTS:
        if all(has_file(posixpath.join(sub, name)) for name in CHECKPOINT_FILES):
            return sub
    return None


def not_a_checkpoint_message(where: str, has_file: Callable[[str], bool]) -> str:
    """One line saying why ``where`` (a folder without a :func:`checkpoint_subfolder`) cannot be loaded."""
    if has_file(_EXPORT_MARKER):
        return (
            f"{where}: an encoder export ({_EXPORT_MARKER}, text_encoder/) lacks VoLTA's projection heads; "
            "load the run's final/ folder (or a checkpoint folder) instead"
        )
    return (
        f"{where}: not a volta checkpoint (no {', '.join(CHECKPOINT_FILES)} in it, its final/ or its volta/)"
    )


def find_volta_checkpoint(path: str | Path) -> Path:
    """The :func:`save_volta_checkpoint` folder that ``path`` points at.

    ``path`` may be that folder or a file in it, a run folder (its ``final/``) or an engine checkpoint folder
    (its ``volta/`` copy). Raises ``FileNotFoundError`` with a one-line reason otherwise.
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent  # a file inside the checkpoint folder (model.safetensors, config.yaml)
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder or file")

    def has_file(relative: str) -> bool:
        return (folder / relative).is_file()

    sub = checkpoint_subfolder(has_file)
    if sub is None:
        raise FileNotFoundError(not_a_checkpoint_message(str(path), has_file))
    return folder / sub if sub else folder


def timm_create_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments that make ``timm.create_model(cfg.image.name, **kwargs)`` build the exported encoder."""
    return {"img_size": cfg.image.img_size, "num_classes": 0, **cfg.image.timm_kwargs}


_CARD = """# VoLTA encoders

Exported by `volta export` from a VoLTA pre-training run (Swin image encoder + RoBERTa text encoder trained with
Barlow Twins, graph optimal transport, MLM and ITM). The encoders are the uni-modal (fusion off) networks; the
cross-modal fusion modules are not part of this export (they live in the full volta checkpoint).

## Image encoder (timm)

```python
import timm
model = timm.create_model(
    "{name}", pretrained=True,
    pretrained_cfg_overlay=dict(file="image_encoder.safetensors"),
    **{kwargs},
)
tokens = model.forward_features(images)   # (B, H, W, C), final norm applied
```

`num_classes=0` matters: the export has no classifier. Input: {img_size}x{img_size} RGB, ImageNet mean/std.

## Text encoder (transformers)

```python
from transformers import RobertaModel, RobertaForMaskedLM
model = RobertaModel.from_pretrained("text_encoder", add_pooling_layer=False)
hidden = model(input_ids, attention_mask=attention_mask).last_hidden_state
mlm = RobertaForMaskedLM.from_pretrained("text_encoder")   # with VoLTA's MLM head
```

{tokenizer}

`volta_config.yaml` is the resolved config of the run.
"""


def export_encoders(
    model: VoLTAModel,
    out_dir: str | Path,
    cfg: VoltaConfig | ModelConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Path]:
    """Export the uni-modal encoders of ``model`` to ``out_dir`` for plain timm / transformers use.

    Writes ``image_encoder.safetensors`` (+ ``image_encoder.json`` with the timm name and create arguments),
    ``text_encoder/`` (a ``RobertaForMaskedLM`` folder: the encoder and VoLTA's MLM head), ``volta_config.yaml``,
    ``tokenizer/`` when a tokenizer is given, and ``README.md``. Returns the written paths by name.
    """
    vcfg = _as_volta_config(cfg)
    mcfg = vcfg.model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    # Own copies: under DeepSpeed parameters are views of one flat buffer, which safetensors refuses.
    swin_state = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in model.image_encoder.swin.state_dict().items()
    }
    paths["image_encoder"] = out / "image_encoder.safetensors"
    save_file(swin_state, str(paths["image_encoder"]), metadata={"timm_name": mcfg.image.name})
    kwargs = timm_create_kwargs(mcfg)
    paths["image_encoder_json"] = out / "image_encoder.json"
    paths["image_encoder_json"].write_text(
        json.dumps({"timm_name": mcfg.image.name, "create_kwargs": kwargs}, indent=2)
    )

    text_config = RobertaConfig.from_dict(model.text_encoder.config.to_dict())
    text_config.architectures = ["RobertaForMaskedLM"]
    mlm = RobertaForMaskedLM(text_config)  # its decoder is tied to its word embeddings, as in ours
    mlm.roberta.load_state_dict(model.text_encoder.roberta.state_dict(), strict=True)
    head_state = {k: v for k, v in model.mlm_head.state_dict().items() if not k.startswith("decoder.")}
    mlm.lm_head.load_state_dict(head_state, strict=False)
    paths["text_encoder"] = out / "text_encoder"
    mlm.save_pretrained(str(paths["text_encoder"]))

    paths["config"] = out / "volta_config.yaml"
    dump_config(vcfg, paths["config"])
    if tokenizer is not None:
        paths["tokenizer"] = out / "tokenizer"
        tokenizer.save_pretrained(str(paths["tokenizer"]))
        tok_note = 'The caption tokenizer is in `tokenizer/` (`AutoTokenizer.from_pretrained("tokenizer")`).'
    else:
        tok_note = f"Tokenizer: `{vcfg.tokenizer_name}` (not copied into this export)."
    paths["card"] = out / "README.md"
    paths["card"].write_text(
        _CARD.format(name=mcfg.image.name, kwargs=kwargs, img_size=mcfg.image.img_size, tokenizer=tok_note)
    )
    log.info("exported encoders to %s", out)
    return paths
