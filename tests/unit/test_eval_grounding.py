"""Pointing game: phrase matching by character offsets, patch geometry, baselines and hits on constructed plans."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import volta.eval.grounding as grounding
from volta.config import GOTLossConfig
from volta.data.batch import EvalBatch
from volta.eval.grounding import (
    GroundingTally,
    PhraseResult,
    center_patch_index,
    find_phrase_spans,
    ground_batch,
    patch_centers,
    phrase_targets,
    phrase_token_mask,
    point_phrase,
    unboxed_word_targets,
    word_classes,
    word_spans,
)
from volta.models.volta_model import VoLTAOutputs


def test_find_phrase_spans_is_case_insensitive_and_whole_word() -> None:
    caption = "A Red  Circle near a reddish circle and a red circle"
    assert find_phrase_spans(caption, "red circle") == [(2, 13), (42, 52)]
    assert find_phrase_spans(caption, "red") == [(2, 5), (42, 45)]  # not inside "reddish"
    assert find_phrase_spans(caption, "blue star") == []


def test_phrase_token_mask_uses_offset_overlap_and_skips_specials() -> None:
    # "<s> a red cir cle </s> <pad>": the phrase "red circle" spans [2, 12).
    offsets = torch.tensor([[0, 0], [0, 1], [2, 5], [6, 9], [9, 12], [0, 0], [0, 0]])
    valid = torch.tensor([False, True, True, True, True, False, False])
    mask = phrase_token_mask(offsets, valid, [(2, 12)])
    assert mask.tolist() == [False, False, True, True, True, False, False]
    # A zero-length token at the span start (a trimmed space) does not overlap.
    offsets2 = torch.tensor([[2, 2], [2, 5]])
    assert phrase_token_mask(offsets2, torch.ones(2, dtype=torch.bool), [(2, 5)]).tolist() == [False, True]


def test_patch_centers_map_the_grid_onto_the_stored_image() -> None:
    centers = patch_centers((2, 2), 100, 50)
    assert centers.tolist() == [[25.0, 12.5], [75.0, 12.5], [25.0, 37.5], [75.0, 37.5]]
    assert center_patch_index((3, 3)) == 4
    assert center_patch_index((2, 2)) == 3


def test_point_phrase_hits_misses_and_baselines_by_hand() -> None:
    centers = patch_centers((3, 3), 90, 90)  # centres at 15, 45, 75 on both axes
    corner = [(0.0, 0.0, 40.0, 40.0)]  # holds only the centre (15, 15) of patch 0
    mass = torch.zeros(9)
    mass[0] = 1.0
    assert point_phrase(mass, centers, corner, 4) == (True, pytest.approx(1 / 9), False)
    mass = torch.zeros(9)
    mass[4] = 1.0
    assert point_phrase(mass, centers, corner, 4)[0] is False
    # Two boxes for one phrase: a hit in either counts; the random baseline is the union's share of centres.
    two = [(0.0, 0.0, 40.0, 40.0), (30.0, 30.0, 60.0, 20.0)]  # second holds (45, 45) and (75, 45)
    assert point_phrase(mass, centers, two, 4) == (True, pytest.approx(3 / 9), True)


def test_phrase_targets_merge_boxes_and_drop_absent_or_malformed() -> None:
    meta = {
        "boxes": [
            {"phrase": "red circle", "bbox": [0, 0, 10, 10], "type": "shape"},
            {"phrase": "Red Circle", "bbox": [20, 20, 5, 5], "type": "shape"},
            {"phrase": "green square", "bbox": [0, 0, 5, 5]},  # not in the caption
            {"phrase": "blue", "bbox": [1, 2]},  # malformed
            {"bbox": [0, 0, 1, 1]},  # no phrase
        ]
    }
    targets = phrase_targets("a red circle and a blue star", meta)
    assert len(targets) == 1
    assert targets[0].boxes == ((0, 0, 10, 10), (20, 20, 5, 5)) and targets[0].spans == ((2, 12),)
    assert phrase_targets("anything", {}) == []


def _batch() -> EvalBatch:
    # Word-level toy tokenisation of "a red circle and a blue star" with <s>, </s> and one padding token.
    caption = "a red circle and a blue star"
    spans = [(0, 0), (0, 1), (2, 5), (6, 12), (13, 16), (17, 18), (19, 23), (24, 28), (0, 0), (0, 0)]
    special = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    meta: dict[str, Any] = {
        "boxes": [
            {"phrase": "red circle", "bbox": [0, 0, 100, 50], "type": "object"},
            {"phrase": "blue star", "bbox": [100, 50, 100, 50], "type": "object"},
            {"phrase": "star", "bbox": [100, 50, 100, 50], "type": "word"},
            {"phrase": "green square", "bbox": [0, 0, 200, 100], "type": "object"},
        ]
    }
    return EvalBatch(
        images=torch.zeros(1, 3, 8, 8),
        input_ids=torch.arange(10)[None],
        attention_mask=torch.tensor([[1] * 9 + [0]]),
        special_tokens_mask=special,
        offsets=torch.tensor([spans]),
        orig_sizes=torch.tensor([[200, 100]]),  # 2x2 grid: centres (50,25) (150,25) (50,75) (150,75)
        image_ids=torch.tensor([0]),
        captions=[caption],
        metas=[meta],
        keys=["k0"],
    )


def test_ground_batch_on_a_constructed_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch()
    plan = torch.zeros(1, 4, 10)
    plan[0, 0, 2:4] = 0.1  # "red circle" -> patch 0, inside its box: hit
    plan[0, 3, 2:4] = 0.05  # some mass elsewhere, less than on patch 0
    plan[0, 1, 6:8] = 0.1  # "blue star" -> patch 1, outside its box (patch 3): miss
    plan[0, 3, 7] = 0.15  # ... but "star" alone peaks on patch 3: hit
    seen: dict[str, torch.Tensor] = {}

    def fake_plans(model: Any, outputs: Any, text_mask: torch.Tensor, loss: Any) -> torch.Tensor:
        seen["text_mask"] = text_mask
        return plan

    monkeypatch.setattr(grounding, "transport_plans", fake_plans)
    outputs = VoLTAOutputs(
        torch.zeros(1, 4, 2), torch.zeros(1, 10, 2), torch.ones(1, 10, dtype=torch.bool), False
    )
    results = ground_batch(None, batch, outputs, GOTLossConfig())  # type: ignore[arg-type]
    # Special tokens and padding never get mass (docs/method.md defect 2).
    assert seen["text_mask"].tolist() == [[False] + [True] * 7 + [False, False]]
    by_phrase = {r.phrase: r for r in results if r.word is None}
    assert set(by_phrase) == {"red circle", "blue star", "star"}
    assert by_phrase["red circle"].hit and not by_phrase["blue star"].hit and by_phrase["star"].hit
    assert by_phrase["red circle"].random == 0.25 and not by_phrase["red circle"].center
    assert by_phrase["blue star"].center  # the centre patch of a 2x2 grid is (1, 1) = patch 3

    tally = GroundingTally()
    tally.add(results)
    summary = tally.summary()
    assert summary["acc"] == pytest.approx(2 / 3) and summary["n"] == 3
    assert summary["acc/object"] == 0.5 and summary["n/object"] == 2
    assert summary["acc/word"] == 1.0 and summary["center/word"] == 1.0
    assert summary["random"] == 0.25
    # Each word pointed alone at its phrase's boxes: "blue" peaks on patch 1 (miss), "star" on patch 3 (hit),
    # "red" and "circle" on patch 0 (hits); the one-word phrase "star" is also its own word.
    by_word = {(r.phrase, r.word): r.hit for r in results if r.word is not None}
    assert by_word == {
        ("red circle", "red"): True,
        ("red circle", "circle"): True,
        ("blue star", "blue"): False,
        ("blue star", "star"): True,
        ("star", "star"): True,
    }
    assert summary["word_acc"] == pytest.approx(4 / 5) and summary["word_n"] == 5
    words = tally.words()
    assert list(words) == ["star", "blue", "circle", "red"]  # most frequent first, then alphabetical
    assert words["star"]["acc"] == 1.0 and words["star"]["n"] == 2 and words["blue"]["acc"] == 0.0


def test_a_miss_on_another_named_object_counts_as_other(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = torch.zeros(1, 4, 10)
    plan[0, 0, 2:4] = 0.1  # "red circle" on its own box (patch 0): hit
    plan[0, 0, 6] = 0.2  # "blue" on patch 0, the red circle's box: a miss on another named object
    plan[0, 2, 7] = (
        0.3  # "star" on patch 2, inside no named box ("green square" is not in the caption): a plain miss
    )
    monkeypatch.setattr(grounding, "transport_plans", lambda *args: plan)
    outputs = VoLTAOutputs(
        torch.zeros(1, 4, 2), torch.zeros(1, 10, 2), torch.ones(1, 10, dtype=torch.bool), False
    )
    results = ground_batch(None, _batch(), outputs, GOTLossConfig())  # type: ignore[arg-type]
    got = {(r.phrase, r.word): (r.hit, r.other) for r in results}
    assert got[("red circle", None)] == (True, False) and got[("red circle", "red")] == (True, False)
    assert got[("blue star", "blue")] == (False, True)
    assert got[("blue star", "star")] == (False, False) and got[("star", None)] == (False, False)
    # "blue star" together peaks on patch 2 (0.3 + 0 > 0.2): a plain miss
    assert got[("blue star", None)] == (False, False)
    tally = GroundingTally()
    tally.add(results)
    summary = tally.summary()
    assert summary["word_other"] == pytest.approx(1 / 5) and summary["other"] == 0.0
    assert tally.words()["blue"]["other"] == 1.0


def test_special_tokens_get_mass_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, torch.Tensor] = {}

    def fake_plans(model: Any, outputs: Any, text_mask: torch.Tensor, loss: Any) -> torch.Tensor:
        seen["text_mask"] = text_mask
        return torch.ones(1, 4, 10)

    monkeypatch.setattr(grounding, "transport_plans", fake_plans)
    outputs = VoLTAOutputs(
        torch.zeros(1, 4, 2), torch.zeros(1, 10, 2), torch.ones(1, 10, dtype=torch.bool), False
    )
    ground_batch(None, _batch(), outputs, GOTLossConfig(include_special_tokens=True))  # type: ignore[arg-type]
    assert seen["text_mask"].tolist() == [[True] * 9 + [False]]


def test_tally_is_empty_without_phrases() -> None:
    assert GroundingTally().summary() == {}
    tally = GroundingTally()
    tally.add([PhraseResult("k", "p", "a b", True, 0.5, False)])
    assert tally.summary()["acc/a_b"] == 1.0


def test_pointing_reads_an_unpruned_first_iterate_plan_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from volta.config import EvalConfig, VoltaConfig
    from volta.eval import validate

    loss = GOTLossConfig(prune_fraction=0.2, ipot_iters=30)
    default = EvalConfig().grounding_got(loss)
    assert (default.prune_fraction, default.ipot_iters) == (0.0, 1)
    assert default.model_dump() == loss.model_dump() | {
        "prune_fraction": 0.0,
        "ipot_iters": 1,
    }  # nothing else
    assert EvalConfig(grounding_prune_fraction=None, grounding_ipot_iters=None).grounding_got(loss) is loss
    assert EvalConfig(grounding_prune_fraction=0.3).grounding_got(loss).prune_fraction == 0.3
    assert EvalConfig(grounding_ipot_iters=None).grounding_got(loss).ipot_iters == 30
    # the validation pass hands the evaluation's settings to the pointing game
    seen: list[tuple[float, int]] = []
    monkeypatch.setattr(
        validate,
        "ground_batch",
        lambda m, b, o, settings: seen.append((settings.prune_fraction, settings.ipot_iters)) or [],
    )
    monkeypatch.setattr(validate, "build_config_eval_loader", lambda *a, **k: None)
    monkeypatch.setattr(
        validate, "extract_features", lambda m, loader, device, on_batch: on_batch(None, None)
    )
    cfg = VoltaConfig.model_validate(
        {
            "loss": {"got": {"prune_fraction": 0.2}},
            "eval": {"grounding_prune_fraction": 0.05, "grounding_ipot_iters": 7, "itm": False},
        }
    )
    validate.evaluate_pass(None, cfg, None, shards="x", device="cpu")  # type: ignore[arg-type]
    assert seen == [(0.05, 7)]


def test_word_spans_per_position_over_every_occurrence() -> None:
    caption = "Red  Circle, then a red circle"
    spans = find_phrase_spans(caption, "red circle")
    assert spans == [(0, 11), (20, 30)]
    assert word_spans(caption, spans) == [("red", [(0, 3), (20, 23)]), ("circle", [(5, 11), (24, 30)])]
    assert word_spans("a b", []) == []


# ------------------------------------------------------------------------------------- per word class
_CLASSED_CAPTION = "a small red circle above a blue star"
_CLASSES = {
    "small": "attribute",
    "red": "attribute",
    "circle": "object",
    "above": "relation",
    "blue": "attribute",
    "star": "object",
}


def _classed_batch() -> EvalBatch:
    # Word-level toy tokenisation of the caption, twice: sample 0 with a word-class map, sample 1 without one.
    spans = [(0, 0), (0, 1), (2, 7), (8, 11), (12, 18), (19, 24), (25, 26), (27, 31), (32, 36), (0, 0)]
    boxes = [
        {"phrase": "red circle", "bbox": [0, 0, 100, 50], "type": "object"},  # holds patch 0's centre
        {"phrase": "blue star", "bbox": [100, 50, 100, 50], "type": "object"},  # holds patch 3's centre
    ]
    return EvalBatch(
        images=torch.zeros(2, 3, 8, 8),
        input_ids=torch.arange(10).repeat(2, 1),
        attention_mask=torch.ones(2, 10, dtype=torch.long),
        special_tokens_mask=torch.tensor([[1] + [0] * 8 + [1]] * 2, dtype=torch.bool),
        offsets=torch.tensor([spans, spans]),
        # 2x2 grid: centres (50,25) (150,25) (50,75) (150,75)
        orig_sizes=torch.tensor([[200, 100], [200, 100]]),
        image_ids=torch.tensor([0, 1]),
        captions=[_CLASSED_CAPTION] * 2,
        metas=[{"boxes": boxes, "word_classes": _CLASSES}, {"boxes": boxes}],
        keys=["k0", "k1"],
    )


def test_unboxed_word_targets_point_relations_at_both_sides_and_attributes_at_the_next_phrase() -> None:
    meta = {
        "boxes": [
            {"phrase": "red circle", "bbox": [0, 0, 1, 1]},
            {"phrase": "blue star", "bbox": [5, 5, 1, 1]},
        ]
    }
    caption = "a small red circle above a large blue star, big, left"
    classes = {**_CLASSES, "large": "attribute", "big": "attribute", "left": "relation", "red": "attribute"}
    targets = phrase_targets(caption, meta)
    found = [
        (w.word, w.word_class, w.span, [p.phrase for p in w.phrases])
        for w in unboxed_word_targets(caption, targets, classes)
    ]
    assert found == [
        ("small", "attribute", (2, 7), ["red circle"]),  # directly before its phrase
        ("above", "relation", (19, 24), ["red circle", "blue star"]),  # between its two arguments
        ("large", "attribute", (27, 32), ["blue star"]),
        ("left", "relation", (49, 53), ["blue star"]),  # nothing after it: the phrase before only
    ]  # "red", "circle" are inside a phrase; "big" is followed by no phrase; "a" has no class
    assert unboxed_word_targets(caption, targets, {}) == []
    assert word_classes({"word_classes": {"Red": "attribute", "x": 3, "": "object"}}) == {"red": "attribute"}
    assert word_classes({"word_classes": ["red"]}) == {} and word_classes({}) == {}


def test_per_class_pointing_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = torch.zeros(2, 4, 10)  # (B, P, T); tokens 2..8 = small red circle above a blue star
    for b in range(2):
        plan[b, 0, 2] = 0.3  # "small" -> patch 0: inside red circle (hit)
        plan[b, 1, 3] = 0.1  # "red" -> patch 1: outside red circle (miss)
        plan[b, 0, 4] = 0.2  # "circle" -> patch 0 (hit); the phrase "red circle" peaks on patch 0 too (hit)
        plan[b, 3, 5] = 0.2  # "above" -> patch 3: inside blue star, part of its target (hit)
        plan[b, 3, 7] = 0.2  # "blue" -> patch 3 (hit); the phrase "blue star" peaks on patch 3 (hit)
        plan[b, 2, 8] = 0.1  # "star" -> patch 2 (miss)
    monkeypatch.setattr(grounding, "transport_plans", lambda *a: plan)
    outputs = VoLTAOutputs(
        torch.zeros(2, 4, 2), torch.zeros(2, 10, 2), torch.ones(2, 10, dtype=torch.bool), False
    )
    results = ground_batch(None, _classed_batch(), outputs, GOTLossConfig())  # type: ignore[arg-type]
    unboxed = [(r.key, r.word, r.phrase, r.random) for r in results if r.unboxed]
    assert unboxed == [("k0", "small", "red circle", 0.25), ("k0", "above", "red circle | blue star", 0.5)]
    assert {r.word_class for r in results if r.key == "k1"} == {None}  # no map: no class, none guessed
    tally = GroundingTally()
    tally.add(results)
    summary = tally.summary()
    # Unchanged meaning of the existing numbers: the 2 x 2 phrases and the 2 x 4 words of the phrases.
    assert (summary["acc"], summary["n"]) == (1.0, 4)
    assert (summary["word_acc"], summary["word_n"]) == (0.5, 8)
    assert set(tally.words()) == {"red", "circle", "blue", "star"}
    # Per class, from sample 0 only: attribute small (hit), red (miss), blue (hit); object circle (hit),
    # star (miss); relation above (hit, target = both boxes: 2 of 4 patch centres).
    expected = {
        "attribute": {"acc": 2 / 3, "random": 0.25, "center": 1 / 3, "n": 3},  # centre patch 3: blue only
        "object": {"acc": 0.5, "random": 0.25, "center": 0.5, "n": 2},  # centre patch 3: star
        "relation": {"acc": 1.0, "random": 0.5, "center": 1.0, "n": 1},
    }
    for word_class, rates in expected.items():
        for name, value in rates.items():
            assert summary[f"word_{name}/{word_class}"] == pytest.approx(value), (word_class, name)
    assert {k.split("/", 1)[1] for k in summary if k.startswith("word_") and "/" in k} == set(expected)
    # A class's baseline is the per-word random baseline (words()) averaged over its words, weighted by count.
    k0 = GroundingTally([r for r in results if r.key == "k0" and not r.unboxed])
    words = k0.words()
    assert summary["word_random/object"] == pytest.approx(
        sum(words[w]["random"] * words[w]["n"] for w in ("circle", "star")) / 2
    )


def test_per_class_metrics_are_absent_without_a_word_class_map(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grounding, "transport_plans", lambda *a: torch.rand(1, 4, 10))
    outputs = VoLTAOutputs(
        torch.zeros(1, 4, 2), torch.zeros(1, 10, 2), torch.ones(1, 10, dtype=torch.bool), False
    )
    tally = GroundingTally()
    tally.add(ground_batch(None, _batch(), outputs, GOTLossConfig()))  # type: ignore[arg-type]
    summary = tally.summary()
    assert "word_acc" in summary and not any("/" in k for k in summary if k.startswith("word_"))
