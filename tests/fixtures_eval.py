"""Evaluation test data: a tiny synthetic shard set with boxes, one without boxes, a BPE tokenizer, a checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset

from tests.conftest import REPO
from tests.fixtures_data import caption_for, draw_image
from volta.config import VoltaConfig, load_config
from volta.data.synth import write_synth_split
from volta.data.tokenizer import train_bpe_tokenizer
from volta.models import VoLTAModel
from volta.models.export import save_volta_checkpoint
from volta.models.factory import build_model


@dataclass(frozen=True)
class EvalAssets:
    """Paths of the evaluation test data and the in-memory model and config saved in ``checkpoint``."""

    shards: Path
    no_box_shards: Path
    tokenizer: Path
    checkpoint: Path
    model: VoLTAModel
    config: VoltaConfig


def write_no_box_shards(folder: Path, n: int = 6) -> Path:
    """A shard of captioned images whose JSON has no boxes (and no label)."""
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(folder / "00000.tar")) as sink:
        for i in range(n):
            sink.write(
                {
                    "__key__": f"n{i:03d}",
                    "png": draw_image(i),
                    "txt": caption_for(i).encode(),
                    "json": json.dumps({"width": 48}).encode(),
                }
            )
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": n}))
    return folder


def make_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE trained on synthetic captions, saved in ``folder``."""
    from volta.data.synth import synth_sample

    captions = [synth_sample(i, image_size=32).caption for i in range(200)]
    train_bpe_tokenizer(captions, folder, vocab_size=320)
    return folder


def eval_config(tokenizer: Path, shards: Path, *overrides: str) -> VoltaConfig:
    """configs/debug.yaml with captions long enough for the synthetic phrases and the test data paths."""
    return load_config(
        REPO / "configs" / "debug.yaml",
        [
            "model.text.max_length=40",
            f"data.tokenizer={tokenizer}",
            f"data.val_shards={shards}",
            "eval.batch_size=8",
            *overrides,
        ],
    )


def make_eval_assets(root: Path, *, samples: int = 24) -> EvalAssets:
    """Write the synthetic val split (64 px, 2 shards), a tokenizer trained on it and a random-init checkpoint."""
    shards = root / "val"
    write_synth_split(shards, samples, seed=3, split=1, image_size=64, samples_per_shard=samples // 2)
    from volta.data.inspect import iter_captions

    tok_dir = root / "tokenizer"
    tokenizer = train_bpe_tokenizer(iter_captions(shards), tok_dir, vocab_size=320)
    cfg = eval_config(tok_dir, shards)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(tokenizer))
    checkpoint = save_volta_checkpoint(model, root / "checkpoint", cfg)
    return EvalAssets(shards, write_no_box_shards(root / "nobox"), tok_dir, checkpoint, model, cfg)
