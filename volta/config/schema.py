"""The schema of the volta configuration: one pydantic model per section and the root :class:`VoltaConfig`.

Field constraints and cross-field rules live here; reading recipes, overrides and dumping are in
:mod:`volta.config.loading`. Errors name the dotted field path (:class:`ConfigError`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "RENAMED_LOSS_KEYS",
    "BarlowTwinsLossConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GOTContrastConfig",
    "GOTLossConfig",
    "ITMLossConfig",
    "ImageEncoderConfig",
    "LossConfig",
    "MLMLossConfig",
    "ModelConfig",
    "OptimConfig",
    "RayConfig",
    "SearchDim",
    "StorageConfig",
    "SweepConfig",
    "TextEncoderConfig",
    "TrackingConfig",
    "TrainConfig",
    "ViewConfig",
    "VoltaConfig",
    "image_block_count",
    "renamed_key_error",
    "text_layer_count",
]


class ConfigError(ValueError):
    """An invalid configuration: the message is one line naming the dotted field path and the expectation."""


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=False, frozen=False)


# ----------------------------------------------------------------------------------------------------- model
# Depths of the timm Swin families by name, used to bound the fusion depth without building the model.
_SWIN_DEPTHS: dict[str, tuple[int, ...]] = {
    "swin_tiny": (2, 2, 6, 2),
    "swin_small": (2, 2, 18, 2),
    "swin_base": (2, 2, 18, 2),
    "swin_large": (2, 2, 18, 2),
}
# Layer counts of common Hugging Face RoBERTa-family checkpoints by name.
_TEXT_LAYERS: dict[str, int] = {
    "roberta-base": 12,
    "FacebookAI/roberta-base": 12,
    "roberta-large": 24,
    "FacebookAI/roberta-large": 24,
    "distilroberta-base": 6,
    "distilbert/distilroberta-base": 6,
}


class ImageEncoderConfig(_Section):
    """A timm Swin Transformer: model name, input size and any extra ``timm.create_model`` arguments."""

    name: str = "swin_base_patch4_window12_384"
    img_size: int = Field(384, ge=32, le=2048)
    # False: random init; True: timm hub weights for `name`; a string: a local weights file (safetensors/.pth).
    pretrained: bool | str = True
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    # Extra keyword arguments for timm.create_model (embed_dim, depths, num_heads, window_size, ...).
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    grad_checkpointing: bool = False

    @field_validator("name")
    @classmethod
    def _swin_only(cls, v: str) -> str:
        if not v.startswith("swin"):
            raise ValueError(f"expected a timm Swin Transformer name (swin_*), got {v!r}")
        return v


class TextEncoderConfig(_Section):
    """A Hugging Face RoBERTa-family encoder: hub name or local path, optional config overrides."""

    name: str = "FacebookAI/roberta-base"
    # False: random init from the (overridden) config; True: from_pretrained(name); a string: a local folder.
    pretrained: bool | str = True
    # Overrides applied to the RobertaConfig (hidden_size, num_hidden_layers, vocab_size, ...).
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    max_length: int = Field(30, ge=4, le=512)
    grad_checkpointing: bool = False


class ModelConfig(_Section):
    """The VoLTA model: two backbones, the fusion depth and the head sizes."""

    image: ImageEncoderConfig = Field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    # N: number of last blocks of both backbones that carry gated cross-modal attention (0 = no fusion).
    fusion_depth: int = Field(6, ge=0)
    # Where each gated cross-attention joins its block (docs/model.md): "before_mlp" = between the block's
    # self-attention and its MLP, so the MLP reads the fused signal (FIBER's placement, the paper's);
    # "after_block" = added to the block's output.
    fusion_placement: Literal["before_mlp", "after_block"] = "after_block"
    # Initial value of every fusion gate. 0 (the paper's) makes the fused network start as the uni-modal one, and
    # the cross-attention under a gate at 0 gets no gradient until the gate moves (docs/model.md). Fusion off never
    # reads the gates, so the dual-encoder losses do not depend on this.
    fusion_gate_init: float = Field(0.0, ge=-1.0, le=1.0)
    shared_dim: int = Field(768, ge=8)
    projector_hidden_dim: int = Field(2048, ge=8)
    projector_out_dim: int = Field(1024, ge=8)
    got_projector_hidden_dim: int = Field(2048, ge=8)
    got_projector_out_dim: int = Field(1024, ge=8)
    # A final affine-free BatchNorm on the GOT projector: without it the projector, trained by GOT alone, can map
    # every token to one direction and drive WD/GWD to 0 (measured; see docs/losses.md). False = the paper's MLP.
    got_projector_output_norm: bool = True
    # Batch-standardise the ITM head's two pooled tokens (not in the paper; docs/model.md): from-scratch backbones
    # give pooled tokens that differ little between samples, and the paper's head then stays near chance.
    itm_input_norm: bool = False
    # The ITM classifier also reads the elementwise product of the two pooled tokens (not in the paper;
    # docs/model.md): a linear map of [text ; image] scores each stream alone and cannot compare them.
    itm_product: bool = False
    # Reuse the uni-modal activations below the fused blocks across the BT/GOT, MLM and ITM passes.
    share_unimodal_prefix: bool = True


def image_block_count(image: ImageEncoderConfig) -> int | None:
    """Number of Swin blocks over all stages, from ``timm_kwargs["depths"]`` or the family name; None if unknown."""
    depths = image.timm_kwargs.get("depths")
    if depths is None:
        family = "_".join(image.name.split("_")[:2])
        depths = _SWIN_DEPTHS.get(family)
    if depths is None:
        return None
    return int(sum(int(d) for d in depths))


def text_layer_count(text: TextEncoderConfig) -> int | None:
    """Number of transformer layers of the text encoder, from overrides, a local config.json or the name."""
    if "num_hidden_layers" in text.config_overrides:
        return int(text.config_overrides["num_hidden_layers"])
    source = text.pretrained if isinstance(text.pretrained, str) else text.name
    config_json = Path(source) / "config.json"
    if config_json.is_file():
        import json

        try:
            return int(json.loads(config_json.read_text())["num_hidden_layers"])
        except (KeyError, ValueError, OSError):
            return None
    return _TEXT_LAYERS.get(text.name)


# ------------------------------------------------------------------------------------------------------ loss
class BarlowTwinsLossConfig(_Section):
    """Barlow Twins on the global projections, fusion off: its weight, the off-diagonal factor and the pairs."""

    weight: float = Field(1.0, ge=0.0)
    lambd: float = Field(0.005, ge=0.0)  # barlow_twins_loss(lambd=): weight of the off-diagonal terms
    image_image: float = Field(0.25, ge=0.0)  # BT(I, I'): the two image views
    text_text: float = Field(0.25, ge=0.0)  # BT(T, T'): the two caption views
    image_text: float = Field(0.25, ge=0.0)  # BT(I, T): first views across modalities
    image_text_view2: float = Field(0.25, ge=0.0)  # BT(I', T'): second views across modalities


class GOTContrastConfig(_Section):
    """Not in the paper (weight 0 = off): the in-batch InfoNCE of Wasserstein distances, inside the GOT term
    (volta.losses.got.got_contrastive_loss). Balanced GOT on matched pairs alone lets words settle on the
    background patches every image has; docs/losses.md."""

    weight: float = Field(0.0, ge=0.0)
    temperature: float = Field(0.05, gt=0.0)
    ipot_iters: int = Field(1, ge=1)
    # Also not in the paper: each image's own caption with two words swapped as one more negative of the
    # image-to-text direction (the same words, so only where each word's mass lands tells them apart).
    swap_negatives: bool = False

    def kwargs(
        self, ipot_beta: float, image_marginal_kl: float | None = None, image_salience: float | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of :func:`volta.losses.got.got_contrastive_loss` (the IPOT step and marginals are GOT's)."""
        return {
            "temperature": self.temperature,
            "ipot_beta": ipot_beta,
            "ipot_iters": self.ipot_iters,
            "image_marginal_kl": image_marginal_kl,
            "image_salience": image_salience,
        }


class GOTLossConfig(_Section):
    """Graph optimal transport between patch and word tokens, fusion off. Every field but ``weight``,
    ``include_special_tokens`` and ``contrastive`` is a keyword argument of :func:`volta.losses.got.got_loss`."""

    weight: float = Field(100.0, ge=0.0)
    wd_weight: float = Field(0.1, ge=0.0)
    gwd_weight: float = Field(0.1, ge=0.0)
    ipot_beta: float = Field(0.5, gt=0.0)
    ipot_iters: int = Field(30, ge=1)
    gw_beta: float = Field(0.1, gt=0.0)
    gw_outer_iters: int = Field(5, ge=1)
    gw_inner_iters: int = Field(20, ge=1)
    prune_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    prune_scope: Literal["sample", "batch"] = "sample"
    # Treat the pruning threshold as a constant of the step (true) or differentiate through its min and max
    # (false, the authors' code), which lets the loss shrink by stretching the cost range: docs/losses.md.
    prune_detach: bool = True
    # Not in the paper (null = balanced WD plan, the paper's): the KL weight of a relaxed patch marginal, so words
    # naming one object can all put their mass on its patches (volta.losses.got.got_loss; docs/losses.md).
    image_marginal_kl: float | None = Field(None, ge=0.0)
    # Not in the paper (null = uniform patch marginal, the paper's): the temperature of a salience patch marginal,
    # most mass on the patches unlike the rest of their image (volta.losses.got.salience_marginal; docs/losses.md).
    image_salience: float | None = Field(None, gt=0.0)
    include_special_tokens: bool = False
    contrastive: GOTContrastConfig = Field(default_factory=GOTContrastConfig)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`volta.losses.got.got_loss`: every field of this block but the three above."""
        return self.model_dump(exclude={"weight", "include_special_tokens", "contrastive"})

    @property
    def swap_negatives_on(self) -> bool:
        """Whether training batches need swapped captions: the GOT term and its contrast on, swap negatives set."""
        return self.weight > 0 and self.contrastive.weight > 0 and self.contrastive.swap_negatives


class MLMLossConfig(_Section):
    """Masked language modelling with fusion on: its weight and the share of caption tokens corrupted."""

    weight: float = Field(1.0, ge=0.0)
    probability: float = Field(0.15, gt=0.0, lt=1.0)  # mask_tokens(probability=)


class ITMLossConfig(_Section):
    """Image-text matching with fusion on: its weight and how negatives are drawn (sample_itm_pairs(mode=))."""

    weight: float = Field(1.0, ge=0.0)
    negatives: Literal["uniform", "hard"] = "uniform"


# Flat keys of the loss section before it was nested, and where each setting lives now.
RENAMED_LOSS_KEYS: dict[str, str] = {
    "bt_weight": "bt.weight", "bt_lambda": "bt.lambd", "bt_w_ii": "bt.image_image", "bt_w_tt": "bt.text_text",
    "bt_w_it": "bt.image_text", "bt_w_it2": "bt.image_text_view2", "got_weight": "got.weight",
    "wd_weight": "got.wd_weight", "gwd_weight": "got.gwd_weight", "ipot_beta": "got.ipot_beta",
    "ipot_iters": "got.ipot_iters", "gw_beta": "got.gw_beta", "gw_outer_iters": "got.gw_outer_iters",
    "gw_inner_iters": "got.gw_inner_iters", "prune_fraction": "got.prune_fraction",
    "prune_scope": "got.prune_scope", "prune_detach": "got.prune_detach",
    "got_include_special_tokens": "got.include_special_tokens", "got_contrastive_weight": "got.contrastive.weight",
    "got_contrastive_temperature": "got.contrastive.temperature",
    "got_contrastive_ipot_iters": "got.contrastive.ipot_iters", "mlm_weight": "mlm.weight",
    "mlm_probability": "mlm.probability", "itm_weight": "itm.weight", "itm_negatives": "itm.negatives",
}  # fmt: skip


class LossConfig(_Section):
    """The four loss terms (docs/method.md section 2), one block each. A weight of 0 switches a term off."""

    bt: BarlowTwinsLossConfig = Field(default_factory=BarlowTwinsLossConfig)
    got: GOTLossConfig = Field(default_factory=GOTLossConfig)
    mlm: MLMLossConfig = Field(default_factory=MLMLossConfig)
    itm: ITMLossConfig = Field(default_factory=ITMLossConfig)

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        if self.bt.weight == 0 and self.got.weight == 0 and self.mlm.weight == 0 and self.itm.weight == 0:
            raise ValueError("at least one of bt.weight, got.weight, mlm.weight, itm.weight must be > 0")
        return self


def renamed_key_error(parts: Sequence[str]) -> ConfigError | None:
    """The one-line error for a dotted path that names a loss setting by its old flat key, else None."""
    if len(parts) >= 2 and parts[0] == "loss" and parts[1] in RENAMED_LOSS_KEYS:
        return ConfigError(f"loss.{parts[1]}: renamed; use loss.{RENAMED_LOSS_KEYS[parts[1]]}")
    return None


# ------------------------------------------------------------------------------------------------------ data
class ViewConfig(_Section):
    """Image view augmentation (docs/method.md section 3), shared by both views except blur and solarize."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = Field(0.8, ge=0.0, le=1.0)
    grayscale_p: float = Field(0.2, ge=0.0, le=1.0)
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    # Caption views (docs/method.md section 3): every view gets one EDA op (p 1.0) touching a share of its words
    # drawn from text_aug_rate. Before 2026-12-03 the default was p 0.1 at rate 0.1: 81% of view pairs were
    # identical, which made BT(T, T') nearly trivial.
    text_aug_p: float = Field(1.0, ge=0.0, le=1.0)
    text_aug_rate: tuple[float, float] = (0.1, 0.2)
    # Where the image views are rendered: "cpu" (OpenCV in the DataLoader workers) or "device" (the workers
    # only decode; crops, jitter, blur and solarisation run batched on the training device, for hosts with
    # too few cores per GPU). Same parameter distributions either way (docs/data.md).
    render_on: Literal["cpu", "device"] = "cpu"

    @field_validator("text_aug_rate")
    @classmethod
    def _rate(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] < 1.0:
            raise ValueError(f"expected 0 < low <= high < 1 (a share of the words), got {list(v)}")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"expected 0 < low <= high <= 1, got {list(v)}")
        return v


class DataConfig(_Section):
    """Where the shards are and how the per-worker pipeline reads them."""

    # A local folder, a brace pattern, a list of either, or s3://bucket/prefix[/pattern].
    train_shards: str | list[str] = "data/synth/train"
    val_shards: str | list[str] | None = "data/synth/val"
    # A Hugging Face tokenizer name or local folder; None = the text encoder's name.
    tokenizer: str | None = None
    # Samples in one epoch of the training set; None = read from sizes.json next to the shards.
    samples_per_epoch: int | None = Field(None, ge=1)
    shuffle_buffer: int = Field(1000, ge=0)
    num_workers: int = Field(2, ge=0)
    max_image_pixels: int = Field(50_000_000, ge=1)
    views: ViewConfig = Field(default_factory=ViewConfig)


# ----------------------------------------------------------------------------------------------------- optim
class OptimConfig(_Section):
    """Optimiser and schedule. LARS learning rates follow the paper: ``lr * global_batch / 512``."""

    name: Literal["lars", "adamw"] = "lars"
    lr: float = Field(0.2, gt=0.0)
    bias_lr: float = Field(0.0048, gt=0.0)
    # Not in the paper (null = the gates train with bias_lr, as every other 1-D parameter): the fusion gates' own
    # learning rate. Gates start at 0, so the cross-attention under them gets no gradient until they move; a short
    # run whose ITM must learn moves them faster (docs/training.md).
    gate_lr: float | None = Field(None, gt=0.0)
    scale_lr_with_batch: bool = True
    weight_decay: float = Field(1e-6, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    lars_eta: float = Field(0.001, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    warmup_epochs: float = Field(2.0, ge=0.0)
    final_lr_ratio: float = Field(0.001, ge=0.0, le=1.0)
    grad_clip: float | None = Field(None, gt=0.0)


# ----------------------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    """The training loop: batch sizes, length, precision, checkpoints, logging, validation cadence."""

    global_batch_size: int = Field(256, ge=2)
    micro_batch_size: int = Field(32, ge=1)
    epochs: float | None = Field(200.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    zero_stage: Literal[0, 1, 2] = 2
    deepspeed_config: str | None = None
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    val_every: int | None = Field(None, ge=1)
    max_nonfinite_in_row: int = Field(10, ge=1)
    # Steps between returning the C heap's free pages to the OS (glibc malloc_trim; null: never): keeps a CPU
    # worker's memory from growing with heap allocation (volta.training.heap; docs/benchmarks.md "Demo time").
    heap_trim_every: int | None = Field(8, ge=1)
    # Where the run writes local files (metrics JSON lines, exported weights, pictures).
    output_dir: str = "runs"

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("one of train.epochs or train.max_steps must be set")
        return self


# ------------------------------------------------------------------------------------------------------ eval
class EvalConfig(_Section):
    """In-loop and offline evaluation: retrieval, grounding, linear probe, heat maps."""

    batch_size: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1)
    retrieval_ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    grounding: bool = True
    # Pruning of the cost the pointing game and heat maps read their plans from (None = loss.got.prune_fraction).
    # 0 by default: pruning zeroes every cost under the threshold, a third of all pairs in a trained model, and
    # the plan is then flat over them, so the best patch is a tie broken by chance (docs/evaluation.md).
    grounding_prune_fraction: float | None = Field(0.0, ge=0.0, lt=1.0)
    # IPOT iterations of the plan the pointing game and heat maps read (None = loss.got.ipot_iters). 1 by default:
    # the first IPOT iterate (kernel rescaled to both marginals once) says which patches each word is closest
    # to; the converged plan must give every word the same mass, so background patches are forced onto object
    # words and the best patch of a word is often background (measured on a held-out split: docs/evaluation.md).
    grounding_ipot_iters: int | None = Field(1, ge=1)
    heatmap_samples: int = Field(4, ge=0)
    # Held-out image-text matching accuracy in every evaluation pass (one fused forward per batch).
    itm: bool = True
    # Linear probe: held-out fraction when one shard set is split, and the inverse L2 strength of the probe.
    probe_test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    probe_c: float = Field(1.0, gt=0.0)

    def grounding_got(self, got: GOTLossConfig) -> GOTLossConfig:
        """The GOT settings the pointing game and heat maps use: ``got`` with the evaluation's pruning and iterations."""
        update: dict[str, Any] = {}
        if self.grounding_prune_fraction is not None:
            update["prune_fraction"] = self.grounding_prune_fraction
        if self.grounding_ipot_iters is not None:
            update["ipot_iters"] = self.grounding_ipot_iters
        return got.model_copy(update=update) if update else got

    @field_validator("retrieval_ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"expected a non-empty list of positive integers, got {v}")
        return sorted(set(v))


# ------------------------------------------------------------------------------------------------------- ray
class RayConfig(_Section):
    """How Ray places the workers and restarts them."""

    address: str | None = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    max_failures: int = Field(3, ge=-1)
    timeout_s: int = Field(1800, ge=10)
    run_name: str = "volta"

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError(f"expected letters, digits, '.', '_' or '-' (max 128), got {v!r}")
        return v


# --------------------------------------------------------------------------------------------------- storage
class StorageConfig(_Section):
    """Where checkpoints go and how S3 is reached (shards and checkpoints share the endpoint settings).

    Credentials are never part of the config: they come from the standard AWS variables or instance roles.
    """

    path: str = "runs/ray"
    endpoint_url: str | None = None
    region: str | None = None
    # One retry policy for every S3 client (shards, manifests, uploads, checkpoints): attempts per request, and
    # botocore's mode (adaptive also backs off on throttling; pyarrow's checkpoint client uses standard).
    s3_max_attempts: int = Field(10, ge=1)
    s3_retry_mode: Literal["standard", "adaptive"] = "adaptive"

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"expected http(s)://host[:port], got {v!r}")
        return v


class TrackingConfig(_Section):
    """The experiment tracker (MLflow) that the sweep dashboard reads; off when ``uri`` is None."""

    uri: str | None = None
    experiment: str = "volta"
    # Extra tags on the run (the sweep driver sets volta.sweep and volta.trial_id to group a sweep's trials).
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _mlflow_tag_limits(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.\-/ ]{1,250}", key):
                raise ValueError(f"tag names are 1-250 of [A-Za-z0-9_.-/ ], got {key!r}")
            if len(value) > 5000:
                raise ValueError(f"tag {key!r}: values are at most 5000 characters, got {len(value)}")
        return v


# ----------------------------------------------------------------------------------------------------- sweep
class SearchDim(_Section):
    """One dimension of the sweep's search space."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDim:
        if self.type == "choice":
            if not self.values:
                raise ValueError("type 'choice' needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"type {self.type!r} needs 'low' and 'high'")
            if not self.low < self.high:
                raise ValueError(f"expected low < high, got low={self.low} high={self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


class SweepConfig(_Section):
    """A Ray Tune sweep over dotted config fields (GOT weights, fusion depth, ...)."""

    space: dict[str, SearchDim] = Field(default_factory=dict)
    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: int = Field(8, ge=1)
    metric: str = "val/grounding_acc"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int | None = Field(None, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    name: str = "volta-sweep"


# ------------------------------------------------------------------------------------------------------ root
class VoltaConfig(_Section):
    """The root of the configuration tree."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-steps per optimizer step: global batch / (workers x micro batch)."""
        return self.train.global_batch_size // (self.ray.num_workers * self.train.micro_batch_size)

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer to load: ``data.tokenizer`` or, when unset, the text encoder's name or local folder."""
        if self.data.tokenizer:
            return self.data.tokenizer
        pretrained = self.model.text.pretrained
        return pretrained if isinstance(pretrained, str) else self.model.text.name

    @model_validator(mode="after")
    def _cross_checks(self) -> VoltaConfig:
        t, r = self.train, self.ray
        per_step = r.num_workers * t.micro_batch_size
        if t.global_batch_size % per_step:
            raise _FieldError(
                "train.global_batch_size",
                f"must be divisible by ray.num_workers x train.micro_batch_size = {per_step}, "
                f"got {t.global_batch_size}",
            )
        blocks = [
            n
            for n in (image_block_count(self.model.image), text_layer_count(self.model.text))
            if n is not None
        ]
        if blocks and self.model.fusion_depth > min(blocks):
            raise _FieldError(
                "model.fusion_depth",
                f"must be between 0 and {min(blocks)} (blocks available in both backbones), "
                f"got {self.model.fusion_depth}",
            )
        if t.precision == "fp16" and t.device == "cpu":
            raise _FieldError(
                "train.precision", "fp16 needs a GPU; use 'bf16' or 'fp32' with train.device=cpu"
            )
        if r.use_gpu and t.device == "cpu":
            raise _FieldError("train.device", "is 'cpu' but ray.use_gpu is true; use 'auto' or 'cuda'")
        if t.val_every is not None and not self.data.val_shards:
            raise _FieldError("data.val_shards", "must be set when train.val_every is set")
        if self.sweep.metric.split("/")[0] not in ("val", "train"):
            raise _FieldError(
                "sweep.metric", f"expected 'val/<name>' or 'train/<name>', got {self.sweep.metric!r}"
            )
        root = self.model_dump()
        for dotted in self.sweep.space:
            if not _has_path(root, dotted.split(".")) or dotted.startswith("sweep."):
                raise _FieldError(f"sweep.space.{dotted}", "is not a config field that a sweep can set")
        return self


class _FieldError(ValueError):
    """A cross-field failure that knows its dotted path (turned into ConfigError by the loader)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _has_path(tree: Any, parts: Sequence[str]) -> bool:
    node = tree
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True
