"""The VoLTA task: model + losses. ``forward(batch)`` returns every weighted loss term and their sum.

Per step (docs/method.md section 2), for both views v of every sample:
fusion off -> Barlow Twins on global projections and GOT (WD + GWD) between patch and word tokens;
fusion on  -> MLM on (image view v, masked caption v) and ITM on (image or a swapped image, caption v).
``L = bt_weight*L_BT + got_weight*L_GOT + mlm_weight*L_MLM + itm_weight*L_ITM`` with MLM and ITM averaged over
the two views and GOT summed over the two (image, caption) pairs. A term with weight 0 is not computed.
``loss.got.contrastive.weight > 0`` adds, inside the GOT term, the in-batch InfoNCE of Wasserstein distances
(not in the paper; its negatives are the local batch, like ITM's).

Distributed semantics (one rule for every term): each rank returns its share of the global objective, such that
the global loss is the MEAN over ranks of the returned losses and, with differentiable sum all-reduces in the
forward pass and gradients averaged over ranks (DeepSpeed/DDP), the gradient is that of the single-process loss
on the whole batch. Barlow Twins and the projector BatchNorms reduce statistics over ranks; MLM divides by the
global count of masked tokens; GOT and ITM are per-sample means over equal local batches. ITM negatives are drawn
from the local batch (like the authors' code), so ITM and the optional GOT contrast are the terms whose value
depends on how the global batch is split into local batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from volta.config import LossConfig, VoltaConfig
from volta.data.batch import View, VoltaBatch
from volta.data.masking import IGNORE_INDEX
from volta.data.views import normalize_images
from volta.dist import AllReduce
from volta.losses.barlow_twins import barlow_twins_loss
from volta.losses.got import got_contrastive_loss, got_loss
from volta.losses.itm import itm_loss, sample_itm_pairs
from volta.losses.mlm import mlm_loss
from volta.models.global_batchnorm import convert_to_global_batchnorm
from volta.models.volta_model import (
    BTProjections,
    ImagePrefix,
    TextPrefix,
    VoLTAModel,
    VoLTAOutputs,
)

Terms = dict[str, Tensor]


class ViewPasses:
    """The passes of one view through the model in one step, each computed when first needed.

    With ``share_prefix`` the uni-modal prefixes (the blocks below the fused ones) are computed once per view and
    reused by the dual, MLM and ITM passes; without it every pass runs its own prefixes (the baseline the
    benchmark compares against). The dual (fusion-off) pass and its projections are computed at most once.
    """

    def __init__(self, model: VoLTAModel, view: View, *, share_prefix: bool) -> None:
        self.model = model
        self.view = view
        self.share_prefix = share_prefix
        self._cache: dict[str, Any] = {}

    def _once(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _images(self) -> Tensor:
        images = self.view.images
        if images.dtype == torch.uint8:  # training views arrive as uint8 (a quarter of the bytes to ship)
            images = normalize_images(images)
        return images.to(dtype=next(self.model.image_encoder.parameters()).dtype)

    def image_prefix(self, index: Tensor | None = None) -> ImagePrefix:
        """The image prefix of this view's images, or of ``images[index]``."""
        if not self.share_prefix:
            images = self._images()
            return self.model.image_prefix(images if index is None else images[index])
        prefix: ImagePrefix = self._once("image_prefix", lambda: self.model.image_prefix(self._images()))
        return prefix if index is None else prefix.index(index)

    def text_prefix(self, *, masked: bool = False) -> TextPrefix:
        """The text prefix of the caption (``masked``: of its MLM corruption)."""
        ids = self.view.mlm_input_ids if masked else self.view.input_ids

        def compute() -> TextPrefix:
            return self.model.text_prefix(ids, self.view.attention_mask)

        if not self.share_prefix:
            return compute()
        return self._once("mlm_text_prefix" if masked else "text_prefix", compute)  # type: ignore[no-any-return]

    def dual(self) -> VoLTAOutputs:
        """The fusion-off (dual encoder) pass."""
        return self._once(  # type: ignore[no-any-return]
            "dual", lambda: self.model.encode(self.image_prefix(), self.text_prefix(), fusion=False)
        )

    def bt_projections(self) -> BTProjections:
        """Barlow Twins projections of the dual pass's global features."""
        return self._once("bt", lambda: self.model.bt_projections(self.dual()))  # type: ignore[no-any-return]


class VoLTATask(nn.Module):
    """VoLTA's pre-training objective around a :class:`VoLTAModel`.

    One method per loss term, each returning its weighted ``*_loss`` tensor and detached statistics; ``forward``
    sums every ``*_loss`` entry into ``loss``. A term with weight 0 is not computed. ``all_reduce`` is a
    differentiable sum over ranks (None in one process); it is injected, never looked up. ``share_prefix`` reuses
    the uni-modal activations below the fused blocks across the dual, MLM and ITM passes (:class:`ViewPasses`).
    """

    def __init__(
        self,
        model: VoLTAModel,
        loss: LossConfig,
        *,
        share_prefix: bool = True,
        all_reduce: AllReduce | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_cfg = loss
        self.share_prefix = share_prefix
        self.all_reduce = all_reduce
        # Projector statistics over the global batch (a no-op conversion semantics-wise in one process).
        convert_to_global_batchnorm(self.model, all_reduce)
        # The terms in the order they are computed and summed; adding a loss = a method here + a config weight.
        self.terms: list[tuple[float, Callable[[VoltaBatch, list[ViewPasses]], Terms]]] = [
            (loss.bt.weight, self.barlow_twins_terms),
            (loss.got.weight, self.got_terms),
            (loss.mlm.weight, self.mlm_terms),
            (loss.itm.weight, self.itm_terms),
        ]

    def forward(self, batch: VoltaBatch) -> Terms:
        """Every weighted loss term of one batch (``*_loss``), their statistics, and their sum ``loss``."""
        batch = (
            batch.rendered()
        )  # image views left to the device (data.views.render_on: device) are made here
        passes = [ViewPasses(self.model, view, share_prefix=self.share_prefix) for view in batch.views]
        out: Terms = {}
        for weight, term in self.terms:
            if weight > 0:
                out.update(term(batch, passes))
        out["loss"] = sum(
            (v for k, v in out.items() if k.endswith("_loss")), torch.zeros((), device=batch.image_ids.device)
        )
        return out

    # ------------------------------------------------------------------------------------------------ terms
    def barlow_twins_terms(self, batch: VoltaBatch, passes: list[ViewPasses]) -> Terms:
        """Fusion off: BT(I, I'), BT(T, T'), BT(I, T), BT(I', T') on the global projections, weighted."""
        c = self.loss_cfg.bt
        (i1, t1), (i2, t2) = ((p.bt_projections().image, p.bt_projections().text) for p in passes)

        def bt(a: Tensor, b: Tensor) -> Tensor:
            return barlow_twins_loss(a, b, lambd=c.lambd, all_reduce=self.all_reduce)

        loss = (
            c.image_image * bt(i1, i2)
            + c.text_text * bt(t1, t2)
            + c.image_text * bt(i1, t1)
            + c.image_text_view2 * bt(i2, t2)
        )
        return {"bt_loss": c.weight * loss}

    def got_terms(self, batch: VoltaBatch, passes: list[ViewPasses]) -> Terms:
        """Fusion off: GOT (WD + GWD) between patch and word tokens, summed over both views, plus the optional
        in-batch contrast of Wasserstein distances inside the same term."""
        c = self.loss_cfg.got
        zero = torch.zeros((), device=batch.image_ids.device)
        wd, gwd, total, nce = zero, zero, zero, zero
        nce_acc: list[Tensor] = []
        swap_acc: list[Tensor] = []
        for p in passes:
            g = self.model.got_projections(p.dual())
            text_mask = g.text_mask
            if not c.include_special_tokens:
                text_mask = text_mask & ~p.view.special_tokens_mask.bool()
            res = got_loss(g.image, g.text, g.image_mask, text_mask, **c.kwargs())
            wd, gwd, total = wd + res["wd"].mean(), gwd + res["gwd"].mean(), total + res["loss"]
            if c.contrastive.weight > 0:
                contrast = got_contrastive_loss(
                    g.image,
                    g.text,
                    g.image_mask,
                    text_mask,
                    **c.contrastive.kwargs(c.ipot_beta, c.image_marginal_kl, c.image_salience),
                    **self._swap_tokens(p),  # swap_tokens, swap_mask
                )
                nce = nce + contrast["loss"]
                nce_acc.append(contrast["acc"])
                if "swap_acc" in contrast:
                    swap_acc.append(contrast["swap_acc"])
                total = total + c.contrastive.weight * contrast["loss"]
        out = {"got_loss": c.weight * total, "wd": wd.detach(), "gwd": gwd.detach()}
        if nce_acc:
            out["got_nce"] = nce.detach()
            out["got_nce_acc"] = torch.stack(nce_acc).mean()
        if swap_acc:
            out["got_swap_acc"] = torch.stack(swap_acc).mean()
        return out

    def _swap_tokens(self, p: ViewPasses) -> dict[str, Any]:
        """The GOT text projections of the view's swapped captions (``swap_tokens``/``swap_mask`` of
        :func:`got_contrastive_loss`; ``{}`` when the config does not ask for them). The swapped captions run the
        text encoder alone (fusion off) and the GOT text projector in its own call."""
        v = p.view
        if not self.loss_cfg.got.swap_negatives_on:
            return {}
        if (
            v.swap_input_ids is None
            or v.swap_attention_mask is None
            or v.swap_special_tokens_mask is None
            or v.swap_valid is None
        ):
            raise ValueError(
                "loss.got.contrastive.swap_negatives is on but the batch has no swapped captions "
                "(volta.data.build_train_loader makes them for such a config)"
            )
        tokens, mask = self.model.encode_text(self.model.text_prefix(v.swap_input_ids, v.swap_attention_mask))
        if not self.loss_cfg.got.include_special_tokens:
            mask = mask & ~v.swap_special_tokens_mask.bool()
        # Projected with every real token (so every rank makes the same projector call, whose BatchNorm
        # statistics may be all-reduced); captions without a swap are then masked out of the contrast.
        projected = self.model.got_text_projector(tokens, mask)
        return {"swap_tokens": projected, "swap_mask": mask & v.swap_valid.bool().unsqueeze(1)}

    def mlm_terms(self, batch: VoltaBatch, passes: list[ViewPasses]) -> Terms:
        """Fusion on: MLM on (image view, masked caption view), this rank's share of the global token mean,
        averaged over the two views."""
        losses = []
        for p in passes:
            fused = self.model.encode(p.image_prefix(), p.text_prefix(masked=True), fusion=True)
            positions = p.view.mlm_labels != IGNORE_INDEX  # (B, T)
            logits = self.model.mlm_logits(fused, positions)  # (N, V)
            losses.append(mlm_loss(logits, p.view.mlm_labels[positions], all_reduce=self.all_reduce))
        return {"mlm_loss": self.loss_cfg.mlm.weight * torch.stack(losses).mean()}

    def itm_terms(self, batch: VoltaBatch, passes: list[ViewPasses]) -> Terms:
        """Fusion on: ITM on pairs where about half the images are swapped for another image of the batch,
        averaged over the two views."""
        c = self.loss_cfg.itm
        losses, accuracies = [], []
        for p in passes:
            similarity = None
            if c.negatives == "hard":
                # Cosine of the Barlow Twins projections: one space for both modalities (the backbones' global
                # features have different widths), aligned by the inter-modal BT terms.
                proj = p.bt_projections()
                ti = nn.functional.normalize(proj.text.detach().float(), dim=-1)
                ii = nn.functional.normalize(proj.image.detach().float(), dim=-1)
                similarity = ti @ ii.T  # (B, B): caption i vs image j
            image_index, labels = sample_itm_pairs(
                batch.image_ids.to(p.view.input_ids.device),
                generator=None,
                mode=c.negatives,
                similarity=similarity,
            )
            fused = self.model.encode(p.image_prefix(image_index), p.text_prefix(), fusion=True)
            logits = self.model.itm_logits(fused).float()  # (B, 2)
            losses.append(itm_loss(logits, labels))
            accuracies.append((logits.argmax(-1) == labels).float().mean())
        return {
            "itm_loss": c.weight * torch.stack(losses).mean(),
            "itm_acc": torch.stack(accuracies).mean().detach(),
        }


def build_task(config: VoltaConfig, vocab_size: int, *, all_reduce: AllReduce | None = None) -> VoLTATask:
    """The task for a config with random weights: the MLM head sized to ``vocab_size`` (the tokenizer's length),
    gradient checkpointing as configured; ``all_reduce`` is the differentiable sum over ranks (None in one
    process)."""
    from volta.models.factory import build_model

    model = build_model(config.model, vocab_size=vocab_size)
    model.set_grad_checkpointing(
        image=config.model.image.grad_checkpointing, text=config.model.text.grad_checkpointing
    )
    return VoLTATask(
        model, config.loss, share_prefix=config.model.share_unimodal_prefix, all_reduce=all_reduce
    )
