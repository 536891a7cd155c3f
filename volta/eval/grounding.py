"""Weakly-supervised grounding from GOT transport plans: the pointing game against phrase boxes.

For every sample whose JSON holds ``boxes`` (``{"phrase", "bbox": [x, y, w, h], "type"}`` in stored-image pixels)
the GOT plan between the image patches and the caption tokens is computed exactly as in training (GOT projectors,
``loss.*`` solver settings, special tokens and padding without mass). For each phrase that occurs in the caption
(case-insensitive, whole words), the plan mass of the tokens whose character spans overlap the phrase is summed
per patch; the phrase is a *hit* when the centre of the patch with the most mass, mapped back to the stored image,
lies inside one of the phrase's boxes (boxes sharing a phrase are one target). Two baselines are reported: the
expected hit rate of a uniformly random patch (the fraction of patch centres inside the target) and the centre
patch (row ``h // 2``, column ``w // 2`` of the grid). A miss whose patch lies inside the box of another
phrase of the same caption counts as *other* (the model found an object the caption names, but not this one): a
word that picks the right one of the named objects has a high hit rate and a low other rate, one that only finds
some named object has the two about equal. Each word of a phrase is also pointed alone at the
phrase's boxes (``word_*`` and :meth:`GroundingTally.words`): a two-word phrase can be a hit on one word's mass.

When the JSON also holds ``word_classes`` (lower-case caption word -> "attribute", "object", "relation", ...; the
synthetic generators write it), words are also reported per class (``word_acc/<class>``, ...). A classed word
outside every phrase is pointed at the phrases it is about (:func:`unboxed_word_targets`): a relation word such as
"above" at the phrases on either side of it, another word at the phrase that directly follows it ("small" in "a
small red circle"). Those words count only in the per-class figures, so ``word_*`` keep their meaning.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from volta.config import GOTLossConfig
from volta.data.batch import EvalBatch
from volta.losses.got import got_loss
from volta.models.volta_model import VoLTAModel, VoLTAOutputs

__all__ = [
    "GroundingTally",
    "PhraseResult",
    "PhraseTarget",
    "WordTarget",
    "center_patch_index",
    "find_phrase_spans",
    "got_text_mask",
    "grid_shape",
    "ground_batch",
    "inside_boxes",
    "patch_centers",
    "phrase_targets",
    "phrase_token_mask",
    "point_phrase",
    "transport_plans",
    "unboxed_word_targets",
    "word_classes",
    "word_spans",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- geometry
def grid_shape(num_patches: int) -> tuple[int, int]:
    """The ``(h, w)`` token grid of a square input with ``num_patches`` final Swin tokens (h = w)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} image tokens do not form a square grid")
    return side, side


def patch_centers(grid: tuple[int, int], width: float, height: float) -> Tensor:
    """Centres ``(P, 2)`` as (x, y) pixels of an ``h x w`` patch grid laid over a ``width x height`` image.

    The model sees the image resized whole (no crop) to a square, so the grid maps linearly onto the stored
    image; patches are flattened row-major as the model flattens its tokens.
    """
    h, w = grid
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (width / w)  # (w,)
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (height / h)  # (h,)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)  # (P, 2)


def center_patch_index(grid: tuple[int, int]) -> int:
    """Row-major index of the centre patch (row ``h // 2``, column ``w // 2``)."""
    h, w = grid
    return (h // 2) * w + w // 2


def inside_boxes(points: Tensor, boxes: Sequence[Sequence[float]]) -> Tensor:
    """Whether each point ``(P, 2)`` lies inside (borders included) at least one ``[x, y, w, h]`` box: ``(P,)``."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for x, y, w, h in boxes:
        inside |= (
            (points[:, 0] >= x) & (points[:, 0] <= x + w) & (points[:, 1] >= y) & (points[:, 1] <= y + h)
        )
    return inside


def point_phrase(
    patch_mass: Tensor, centers: Tensor, boxes: Sequence[Sequence[float]], center_index: int
) -> tuple[bool, float, bool]:
    """Score one phrase: (hit of the max-mass patch, random-patch hit rate, hit of the centre patch).

    ``patch_mass (P,)`` is the phrase's transport mass per patch and ``centers (P, 2)`` the patch centres in the
    boxes' pixel frame.
    """
    inside = inside_boxes(centers, boxes)  # (P,)
    best = int(torch.argmax(patch_mass))
    return bool(inside[best]), float(inside.double().mean()), bool(inside[center_index])


# ------------------------------------------------------------------------------------------------- text
def find_phrase_spans(caption: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of every whole-word, case-insensitive occurrence of ``phrase``."""
    words = phrase.strip().split()
    if not words:
        return []
    # Any run of whitespace between the phrase's words; no letter or digit glued to either end.
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, caption, flags=re.IGNORECASE)]


def phrase_token_mask(offsets: Tensor, valid: Tensor, spans: Sequence[tuple[int, int]]) -> Tensor:
    """Tokens ``(T,)`` whose character span overlaps one of ``spans``, among the ``valid (T,)`` tokens.

    ``offsets (T, 2)`` are ``[start, end)`` character spans (special tokens and padding have empty spans, so
    they never overlap anything).
    """
    start, end = offsets[:, 0], offsets[:, 1]  # (T,) each
    hit = torch.zeros(offsets.shape[0], dtype=torch.bool)
    for s, e in spans:
        hit |= (start < e) & (end > s) & (end > start)
    return hit & valid.bool()


@dataclass(frozen=True)
class PhraseTarget:
    """One phrase of a caption to ground: its text, type, boxes ``[x, y, w, h]`` and caption spans."""

    phrase: str
    type: str
    boxes: tuple[tuple[float, float, float, float], ...]
    spans: tuple[tuple[int, int], ...]


def phrase_targets(caption: str, meta: Mapping[str, Any]) -> list[PhraseTarget]:
    """The groundable phrases of a sample: ``meta["boxes"]`` entries whose phrase occurs in ``caption``.

    Boxes with the same phrase (case-insensitive) are merged into one target; malformed entries are skipped.
    """
    raw = meta.get("boxes")
    if not isinstance(raw, list):
        return []
    grouped: dict[str, tuple[str, str, list[tuple[float, float, float, float]]]] = {}
    for entry in raw:
        if not isinstance(entry, Mapping):
            continue
        phrase, bbox = entry.get("phrase"), entry.get("bbox")
        if not isinstance(phrase, str) or not phrase.strip():
            continue
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            continue
        try:
            box = tuple(float(v) for v in bbox)
        except (TypeError, ValueError):
            continue
        if box[2] <= 0 or box[3] <= 0:
            continue
        kind = str(entry.get("type") or "phrase")
        key = " ".join(phrase.lower().split())
        grouped.setdefault(key, (phrase, kind, []))[2].append(box)  # type: ignore[arg-type]
    targets = []
    for phrase, kind, boxes in grouped.values():
        spans = find_phrase_spans(caption, phrase)
        if spans:
            targets.append(PhraseTarget(phrase, kind, tuple(boxes), tuple(spans)))
    return targets


def word_classes(meta: Mapping[str, Any]) -> dict[str, str]:
    """The sample's ``meta["word_classes"]`` (caption word -> class) with lower-case words; empty when absent or
    not a mapping of strings, so the sample's words get no class (never a guessed one)."""
    raw = meta.get("word_classes")
    if not isinstance(raw, Mapping):
        return {}
    return {
        w.lower(): c for w, c in raw.items() if isinstance(w, str) and isinstance(c, str) and w.strip() and c
    }


@dataclass(frozen=True)
class WordTarget:
    """A classed caption word outside every phrase: the word, its class, its character span and the phrases
    whose boxes it is pointed at."""

    word: str
    word_class: str
    span: tuple[int, int]
    phrases: tuple[PhraseTarget, ...]

    @property
    def boxes(self) -> tuple[tuple[float, float, float, float], ...]:
        """The boxes of all its phrases (one target: a hit in any counts)."""
        return tuple(box for p in self.phrases for box in p.boxes)


def unboxed_word_targets(
    caption: str, targets: Sequence[PhraseTarget], classes: Mapping[str, str]
) -> list[WordTarget]:
    """The words of ``caption`` (``\\w+`` runs) that ``classes`` classes and no phrase of ``targets`` covers, each
    with the phrases it is about.

    A "relation" word is pointed at the nearest phrase occurrence ending before it and the nearest one starting
    after it (its two arguments, as in "a cup above a boat"; one of them when the other side has none); a word
    of any other class at the phrase that follows it with only whitespace between ("small" in "a small red
    circle"). Words with no such phrase are left out.
    """
    occurrences = [(s, e, t) for t in targets for s, e in t.spans]
    found = []
    for m in re.finditer(r"\w+", caption):
        word_class = classes.get(m.group(0).lower())
        start, end = m.span()
        if word_class is None or any(s < end and start < e for s, e, _ in occurrences):
            continue
        # nearest occurrences on either side (the longer one on a tie)
        before = max((o for o in occurrences if o[1] <= start), key=lambda o: (o[1], -o[0]), default=None)
        after = min((o for o in occurrences if o[0] >= end), key=lambda o: (o[0], -o[1]), default=None)
        if word_class == "relation":
            sides = [o[2] for o in (before, after) if o is not None]
            phrases = tuple(dict.fromkeys(sides))  # one phrase on both sides counts once
        elif after is not None and not caption[end : after[0]].strip():
            phrases = (after[2],)
        else:
            phrases = ()
        if phrases:
            found.append(WordTarget(m.group(0).lower(), word_class, (start, end), phrases))
    return found


# ------------------------------------------------------------------------------------------------ model
def got_text_mask(
    attention_mask: Tensor, special_tokens_mask: Tensor, *, include_special: bool = False
) -> Tensor:
    """Text tokens that receive transport mass ``(B, T)``: real tokens, minus special tokens unless included."""
    real = attention_mask.bool()
    return real if include_special else real & ~special_tokens_mask.bool()


def transport_plans(
    model: VoLTAModel, outputs: VoLTAOutputs, text_mask: Tensor, got: GOTLossConfig
) -> Tensor:
    """GOT transport plans ``(B, P, T)`` (float32) between image patches and caption tokens, as in training.

    Uses the model's GOT projectors and :func:`~volta.losses.got.got_loss` with the ``loss`` settings;
    ``text_mask (B, T)`` marks the tokens that get mass (see :func:`got_text_mask`).
    """
    g = model.got_projections(outputs)
    res = got_loss(
        g.image,
        g.text,
        g.image_mask,
        text_mask.to(g.text.device) & g.text_mask,
        **got.kwargs(),
    )
    return res["plan"].float()  # (B, P, T)


@dataclass(frozen=True)
class PhraseResult:
    """The pointing-game outcome of one phrase: model hit, random-patch hit rate, centre-patch hit."""

    key: str
    phrase: str
    type: str
    hit: bool
    random: float
    center: bool
    # None: the whole phrase; else one word of it (lower case), pointed alone at the phrase's boxes
    word: str | None = None
    # the word's class from the sample's ``word_classes`` (None: no map, or the word is not in it)
    word_class: str | None = None
    # a classed word outside every phrase, pointed at its phrases' boxes (counted only per class)
    unboxed: bool = False
    # a miss on the box of another phrase of the same caption
    other: bool = False


def ground_batch(
    model: VoLTAModel, batch: EvalBatch, outputs: VoLTAOutputs, got: GOTLossConfig
) -> list[PhraseResult]:
    """Play the pointing game on every groundable phrase of ``batch`` from the model's dual-encoder ``outputs``.

    Only samples with at least one groundable phrase are sent through OT. Phrases whose tokens were all cut by
    truncation are left out. With a ``word_classes`` map, words carry their class and the classed words outside
    every phrase are scored too (:func:`unboxed_word_targets`).
    """
    targets = [phrase_targets(c, m) for c, m in zip(batch.captions, batch.metas)]
    rows = [i for i, t in enumerate(targets) if t]
    if not rows:
        return []
    text_mask = got_text_mask(
        batch.attention_mask, batch.special_tokens_mask, include_special=got.include_special_tokens
    )
    if len(rows) < batch.batch_size:
        index = torch.tensor(rows, device=outputs.image_tokens.device)
        outputs = VoLTAOutputs(
            outputs.image_tokens[index], outputs.text_tokens[index], outputs.text_mask[index], outputs.fused
        )
        text_mask = text_mask[rows]
    plans = transport_plans(model, outputs, text_mask, got).cpu()  # (R, P, T)
    grid = grid_shape(plans.shape[1])
    center = center_patch_index(grid)
    results: list[PhraseResult] = []
    for r, i in enumerate(rows):
        width, height = (float(v) for v in batch.orig_sizes[i].tolist())
        centers = patch_centers(grid, width, height)  # (P, 2) in stored-image pixels
        valid = text_mask[r].cpu()
        classes = word_classes(batch.metas[i])
        point = partial(_point_spans, plans[r], batch.offsets[i], valid, centers, center)
        for target in targets[i]:
            others = _other_boxes(targets[i], target.boxes)
            # the whole phrase (word None), then each of its words alone, against the phrase's boxes
            for word, spans in [(None, list(target.spans)), *word_spans(batch.captions[i], target.spans)]:
                scored = point(spans, target.boxes, others)
                if scored is None:
                    if word is None:  # its words are cut too
                        log.debug("%s: phrase %r lost to truncation", batch.keys[i], target.phrase)
                        break
                    continue
                word_class = classes.get(word) if word is not None else None
                hit, random, on_center, other = scored
                results.append(
                    PhraseResult(
                        batch.keys[i],
                        target.phrase,
                        target.type,
                        hit,
                        random,
                        on_center,
                        word,
                        word_class,
                        other=other,
                    )
                )
        for extra in unboxed_word_targets(batch.captions[i], targets[i], classes):
            scored = point([extra.span], extra.boxes, _other_boxes(targets[i], extra.boxes))
            if scored is not None:
                # phrase: the phrases it is pointed at, "red circle | blue star"; type: the first one's
                phrase, kind = " | ".join(p.phrase for p in extra.phrases), extra.phrases[0].type
                hit, random, on_center, other = scored
                results.append(
                    PhraseResult(
                        batch.keys[i],
                        phrase,
                        kind,
                        hit,
                        random,
                        on_center,
                        extra.word,
                        extra.word_class,
                        unboxed=True,
                        other=other,
                    )
                )
    return results


def _other_boxes(
    targets: Sequence[PhraseTarget], own: Sequence[Sequence[float]]
) -> list[tuple[float, float, float, float]]:
    # the boxes of the caption's phrases that are not among ``own``
    mine = {tuple(b) for b in own}
    return [box for t in targets for box in t.boxes if tuple(box) not in mine]


def _point_spans(
    plan: Tensor,
    offsets: Tensor,
    valid: Tensor,
    centers: Tensor,
    center: int,
    spans: Sequence[tuple[int, int]],
    boxes: Sequence[Sequence[float]],
    others: Sequence[Sequence[float]],
) -> tuple[bool, float, bool, bool] | None:
    # point_phrase on the plan mass (P, T) of the valid tokens overlapping spans, and whether a miss lies on one of
    # the ``others`` boxes; None when truncation cut them all
    tokens = phrase_token_mask(offsets, valid, spans)  # (T,)
    if not bool(tokens.any()):
        return None
    mass = plan[:, tokens].sum(dim=-1)  # (P,)
    hit, random, on_center = point_phrase(mass, centers, boxes, center)
    best = centers[int(torch.argmax(mass))][None]  # (1, 2)
    other = not hit and bool(others) and bool(inside_boxes(best, others)[0])
    return hit, random, on_center, other


def word_spans(caption: str, spans: Sequence[tuple[int, int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each word of a phrase (lower case) with its character spans in every occurrence ``spans`` of the phrase.

    Words are the whitespace-separated pieces of the caption inside an occurrence, in order; a word repeated in
    the phrase is scored once per position.
    """
    per_position: list[tuple[str, list[tuple[int, int]]]] = []
    for s, e in spans:
        for k, m in enumerate(re.finditer(r"\S+", caption[s:e])):
            if k == len(per_position):
                per_position.append((m.group(0).lower(), []))
            per_position[k][1].append((s + m.start(), s + m.end()))
    return per_position


# ------------------------------------------------------------------------------------------------ tally
def _metric_name(kind: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", kind) or "phrase"


@dataclass
class GroundingTally:
    """Running pointing-game totals, overall and per phrase type."""

    results: list[PhraseResult] = field(default_factory=list)

    def add(self, results: Iterable[PhraseResult]) -> None:
        """Add the outcomes of some phrases."""
        self.results.extend(results)

    @property
    def count(self) -> int:
        """Number of phrases scored."""
        return sum(r.word is None for r in self.results)

    def summary(self) -> dict[str, float]:
        """``acc``, ``random``, ``center``, ``other`` (fractions) and ``n`` overall, and ``acc/<type>``, ``random/<type>``,
        ``center/<type>``, ``n/<type>`` per phrase type, all over whole phrases; ``word_acc``, ``word_random``,
        ``word_center``, ``word_n`` over the words of the phrases pointed one at a time; ``word_acc/<class>``,
        ``word_random/<class>``, ``word_center/<class>``, ``word_n/<class>`` per word class (``attribute``,
        ``object``, ``relation``, ...) over every classed word scored, those of the phrases and the unboxed ones;
        a class's baseline is the mean random-patch rate of its words, as for ``word_random``. A class no scored
        word has (no sample's ``word_classes`` gives it) is absent. Empty when no phrase was scored."""
        phrases = [r for r in self.results if r.word is None]
        if not phrases:
            return {}
        out = _rates(phrases)
        kinds = sorted({r.type for r in phrases})
        for kind in kinds:
            for name, value in _rates([r for r in phrases if r.type == kind]).items():
                out[f"{name}/{_metric_name(kind)}"] = value
        words = [r for r in self.results if r.word is not None and not r.unboxed]
        if words:
            out.update({f"word_{name}": value for name, value in _rates(words).items()})
        classed = [r for r in self.results if r.word is not None and r.word_class is not None]
        for word_class in sorted({str(r.word_class) for r in classed}):
            rates = _rates([r for r in classed if r.word_class == word_class])
            out.update({f"word_{name}/{_metric_name(word_class)}": value for name, value in rates.items()})
        return out

    def words(self) -> dict[str, dict[str, float]]:
        """Per word of the phrases: ``acc``, ``random``, ``center``, ``n`` of the word pointed alone at its
        phrase's boxes, most frequent words first (ties by word)."""
        grouped: dict[str, list[PhraseResult]] = {}
        for r in self.results:
            if r.word is not None and not r.unboxed:
                grouped.setdefault(r.word, []).append(r)
        order = sorted(grouped, key=lambda w: (-len(grouped[w]), w))
        return {w: _rates(grouped[w]) for w in order}


def _rates(results: Sequence[PhraseResult]) -> dict[str, float]:
    n = len(results)
    return {
        "acc": sum(r.hit for r in results) / n,
        "random": sum(r.random for r in results) / n,
        "center": sum(r.center for r in results) / n,
        "other": sum(r.other for r in results) / n,
        "n": float(n),
    }
