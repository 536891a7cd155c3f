"""Parameter budget of a VoLTA model by part: encoders, fusion modules, heads."""

from __future__ import annotations

from typing import Any

from volta.models.volta_model import VoLTAModel

__all__ = ["count_parameters", "format_parameter_table"]

# Top-level submodules of VoLTAModel and the part of the budget they belong to.
_HEADS = {
    "bt_image_projector": "bt_image",
    "bt_text_projector": "bt_text",
    "got_image_projector": "got_image",
    "got_text_projector": "got_text",
    "mlm_head": "mlm",
    "itm_head": "itm",
}


def count_parameters(model: VoLTAModel) -> dict[str, Any]:
    """Count parameters by part: ``total``, ``image_encoder``, ``text_encoder``, ``fusion`` (cross-attention and
    gates; ``fusion_gates`` alone), ``heads`` (sum) and ``heads_by_name`` (bt/got per modality, mlm, itm),
    ``fusion_share_pct`` (fusion / total, in %) and ``trainable``.

    Shared parameters count once, in the first part that owns them: the MLM decoder is tied to the word
    embeddings, which belong to the text encoder. Works on models built on the meta device.
    """
    parts = {"image_encoder": 0, "text_encoder": 0, "fusion": 0}
    heads = dict.fromkeys(_HEADS.values(), 0)
    gates = trainable = 0
    for name, param in model.named_parameters():  # deduplicated: tied tensors appear once
        n = param.numel()
        trainable += n if param.requires_grad else 0
        top = name.split(".", 1)[0]
        if top in parts:
            parts[top] += n
            gates += n if top == "fusion" and name.endswith(".gate") else 0
        elif top in _HEADS:
            heads[_HEADS[top]] += n
        else:  # a part this table does not know yet must not vanish from the total
            raise ValueError(f"parameter {name!r} belongs to no known part of the model")
    total = sum(parts.values()) + sum(heads.values())
    return {
        "total": total,
        **parts,
        "fusion_gates": gates,
        "heads": sum(heads.values()),
        "heads_by_name": heads,
        "fusion_share_pct": 100.0 * parts["fusion"] / total if total else 0.0,
        "trainable": trainable,
        "fusion_depth": model.fusion_depth,
    }


def format_parameter_table(counts: dict[str, Any]) -> str:
    """A human-readable table of :func:`count_parameters`' result (millions and share of the total)."""
    total = counts["total"]
    rows = [
        ("image encoder (Swin)", counts["image_encoder"]),
        ("text encoder (RoBERTa)", counts["text_encoder"]),
        (f"fusion (N={counts['fusion_depth']}, cross-attention + gates)", counts["fusion"]),
        *((f"  head: {k}", v) for k, v in counts["heads_by_name"].items()),
        ("heads", counts["heads"]),
        ("total", total),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'part':<{width}}  {'params':>14}  {'M':>9}  {'share':>7}"]
    for label, n in rows:
        share = 100.0 * n / total if total else 0.0
        lines.append(f"{label:<{width}}  {n:>14,}  {n / 1e6:>9.2f}  {share:>6.2f}%")
    return "\n".join(lines)
