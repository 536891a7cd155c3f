"""The VoLTA task: model + losses. ``forward(batch)`` returns every weighted loss term and their sum.

Per step (VOLTA.md section 2), for both views v of every sample:
fusion off -> Barlow Twins on global projections and GOT (WD + GWD) between patch and word tokens;
fusion on  -> MLM on (image view v, masked caption v) and ITM on (image or a swapped image, caption v).
``L = bt_weight*L_BT + got_weight*L_GOT + mlm_weight*L_MLM + itm_weight*L_ITM`` with MLM and ITM averaged over
the two views and GOT summed over the two (image, caption) pairs. A term with weight 0 is not computed.
``loss.got_contrastive_weight > 0`` adds, inside the GOT term, the in-batch InfoNCE of Wasserstein distances
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from volta.config import LossConfig, VoltaConfig
from volta.losses.barlow_twins import barlow_twins_loss
from volta.losses.got import got_contrastive_loss, got_loss
from volta.losses.itm import itm_loss, sample_itm_pairs
from volta.losses.mlm import IGNORE_INDEX
from volta.models.global_batchnorm import convert_to_global_batchnorm
from volta.models.volta_model import ImagePrefix, TextPrefix, VoLTAModel, VoLTAOutputs

AllReduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _View:
    images: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    special_tokens_mask: Tensor
    mlm_input_ids: Tensor
    mlm_labels: Tensor


def _views(batch: Any) -> tuple[_View, _View]:
    return tuple(  # type: ignore[return-value]
        _View(
            images=getattr(batch, f"images{v}"),
            input_ids=getattr(batch, f"input_ids{v}"),
            attention_mask=getattr(batch, f"attention_mask{v}"),
            special_tokens_mask=getattr(batch, f"special_tokens_mask{v}"),
            mlm_input_ids=getattr(batch, f"mlm_input_ids{v}"),
            mlm_labels=getattr(batch, f"mlm_labels{v}"),
        )
        for v in (1, 2)
    )


class VoLTATask(nn.Module):
    """VoLTA's pre-training objective around a :class:`VoLTAModel`.

    ``all_reduce`` is a differentiable sum over ranks (None in one process); it is injected, never looked up.
    ``share_prefix`` reuses the uni-modal activations below the fused blocks across the dual, MLM and ITM passes.
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

    # ---------------------------------------------------------------------------------------------- helpers
    def _world_sum(self, x: Tensor) -> Tensor:
        return self.all_reduce(x) if self.all_reduce is not None else x

    def _prefixes(self, view: _View, ids: Tensor | None = None) -> tuple[ImagePrefix, TextPrefix]:
        images = view.images.to(dtype=next(self.model.image_encoder.parameters()).dtype)
        return (
            self.model.image_prefix(images),
            self.model.text_prefix(view.input_ids if ids is None else ids, view.attention_mask),
        )

    def _got_text_mask(self, view: _View, out_mask: Tensor) -> Tensor:
        if self.loss_cfg.got_include_special_tokens:
            return out_mask
        return out_mask & ~view.special_tokens_mask.bool()

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, batch: Any) -> dict[str, Tensor]:
        """Compute the weighted loss terms of one batch (a ``VoltaBatch`` or anything with the same fields)."""
        c = self.loss_cfg
        views = _views(batch)
        need_dual = c.bt_weight > 0 or c.got_weight > 0
        device = views[0].input_ids.device
        zero = torch.zeros((), device=device)
        out: dict[str, Tensor] = {}
        bt_z: list[tuple[Tensor, Tensor]] = []
        wd_sum, gwd_sum, got_sum, nce_sum = zero, zero, zero, zero
        nce_acc: list[Tensor] = []
        mlm_terms: list[Tensor] = []
        itm_terms: list[Tensor] = []
        itm_acc: list[Tensor] = []
        for v in views:
            img_p, txt_p = self._prefixes(v) if self.share_prefix else (None, None)
            dual: VoLTAOutputs | None = None
            if need_dual:
                ip, tp = (img_p, txt_p) if self.share_prefix else self._prefixes(v)
                assert ip is not None and tp is not None
                dual = self.model.encode(ip, tp, fusion=False)
                if c.bt_weight > 0:
                    proj = self.model.bt_projections(dual)
                    bt_z.append((proj.image, proj.text))
                if c.got_weight > 0:
                    g = self.model.got_projections(dual)
                    got_text_mask = self._got_text_mask(v, g.text_mask)
                    res = got_loss(g.image, g.text, g.image_mask, got_text_mask, **c.got_kwargs())
                    wd_sum = wd_sum + res["wd"].mean()
                    gwd_sum = gwd_sum + res["gwd"].mean()
                    got_sum = got_sum + res["loss"]
                    if c.got_contrastive_weight > 0:
                        nce = got_contrastive_loss(
                            g.image,
                            g.text,
                            g.image_mask,
                            got_text_mask,
                            temperature=c.got_contrastive_temperature,
                            ipot_beta=c.ipot_beta,
                            ipot_iters=c.got_contrastive_ipot_iters,
                        )
                        nce_sum = nce_sum + nce["loss"]
                        nce_acc.append(nce["acc"])
                        got_sum = got_sum + c.got_contrastive_weight * nce["loss"]
            if c.mlm_weight > 0:
                mlm_terms.append(self._mlm(v, img_p))
            if c.itm_weight > 0:
                loss_v, acc_v = self._itm(batch, v, img_p, txt_p, dual)
                itm_terms.append(loss_v)
                itm_acc.append(acc_v)

        total = zero
        if bt_z:
            (i1, t1), (i2, t2) = bt_z
            lam = c.bt_lambda
            bt = (
                c.bt_w_ii * barlow_twins_loss(i1, i2, lambd=lam, all_reduce=self.all_reduce)
                + c.bt_w_tt * barlow_twins_loss(t1, t2, lambd=lam, all_reduce=self.all_reduce)
                + c.bt_w_it * barlow_twins_loss(i1, t1, lambd=lam, all_reduce=self.all_reduce)
                + c.bt_w_it2 * barlow_twins_loss(i2, t2, lambd=lam, all_reduce=self.all_reduce)
            )
            out["bt_loss"] = c.bt_weight * bt
            total = total + out["bt_loss"]
        if c.got_weight > 0:
            out["got_loss"] = c.got_weight * got_sum
            out["wd"] = wd_sum.detach()
            out["gwd"] = gwd_sum.detach()
            if nce_acc:
                out["got_nce"] = nce_sum.detach()
                out["got_nce_acc"] = torch.stack(nce_acc).mean()
            total = total + out["got_loss"]
        if mlm_terms:
            out["mlm_loss"] = c.mlm_weight * torch.stack(mlm_terms).mean()
            total = total + out["mlm_loss"]
        if itm_terms:
            out["itm_loss"] = c.itm_weight * torch.stack(itm_terms).mean()
            out["itm_acc"] = torch.stack(itm_acc).mean().detach()
            total = total + out["itm_loss"]
        out["loss"] = total
        return out

    def _mlm(self, v: _View, img_p: ImagePrefix | None) -> Tensor:
        """Fusion-on MLM on (image view, masked caption): this rank's share of the global token mean."""
        if img_p is None:
            img_p, txt_p = self._prefixes(v, v.mlm_input_ids)
        else:
            txt_p = self.model.text_prefix(v.mlm_input_ids, v.attention_mask)
        fused = self.model.encode(img_p, txt_p, fusion=True)
        positions = v.mlm_labels != IGNORE_INDEX  # (B, T)
        logits = self.model.mlm_logits(fused, positions).float()  # (N, V)
        ce_sum = nn.functional.cross_entropy(logits, v.mlm_labels[positions], reduction="sum")
        local = positions.sum().to(ce_sum.dtype)
        world = self._world_sum(torch.stack([local, torch.ones_like(local)])).detach()  # (count, ranks)
        if world[0] == 0:
            return ce_sum * 0.0
        return ce_sum * world[1] / world[0]

    def _itm(
        self,
        batch: Any,
        v: _View,
        img_p: ImagePrefix | None,
        txt_p: TextPrefix | None,
        dual: VoLTAOutputs | None,
    ) -> tuple[Tensor, Tensor]:
        """Fusion-on ITM on pairs where half the images are swapped for another image of the batch."""
        c = self.loss_cfg
        similarity = None
        if c.itm_negatives == "hard" and dual is not None:
            ti = nn.functional.normalize(dual.text_global.detach().float(), dim=-1)
            ii = nn.functional.normalize(dual.image_global.detach().float(), dim=-1)
            similarity = ti @ ii.T  # (B, B): caption i vs image j
        image_index, labels = sample_itm_pairs(
            batch.image_ids.to(v.input_ids.device),
            generator=None,
            mode=c.itm_negatives,
            similarity=similarity,
        )
        if img_p is None:
            images = v.images.to(dtype=next(self.model.image_encoder.parameters()).dtype)
            fused = self.model(images[image_index], v.input_ids, v.attention_mask, fusion=True)
        else:
            assert txt_p is not None
            fused = self.model.encode(img_p.index(image_index), txt_p, fusion=True)
        logits = self.model.itm_logits(fused).float()  # (B, 2)
        acc = (logits.argmax(-1) == labels).float().mean()
        return itm_loss(logits, labels), acc


def build_task(config: VoltaConfig, tokenizer: Any, *, all_reduce: AllReduce | None = None) -> VoLTATask:
    """The task for a config: model sized to the tokenizer's vocabulary, gradient checkpointing as configured."""
    from volta.models.factory import build_model

    model = build_model(config.model, vocab_size=len(tokenizer))
    model.set_grad_checkpointing(
        image=config.model.image.grad_checkpointing, text=config.model.text.grad_checkpointing
    )
    return VoLTATask(
        model, config.loss, share_prefix=config.model.share_unimodal_prefix, all_reduce=all_reduce
    )
