"""bench.alignment: arms, finished-run detection, the targets each run misses, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.alignment import final_validation, means_table, misses, parse_arm, table

pytestmark = pytest.mark.unit

# 256 images with one caption each: chance R@10 = 10/256 = 0.039 both ways
GOOD = {
    "val/grounding_acc": 0.80,
    "val/grounding_word_acc/attribute": 0.50, "val/grounding_word_random/attribute": 0.08,
    "val/grounding_word_acc/object": 0.20, "val/grounding_word_random/object": 0.08,
    "val/grounding_word_acc/relation": 0.10, "val/grounding_word_random/relation": 0.14,
    "val/itm_acc": 0.80,
    "val/retrieval_n_images": 256.0, "val/retrieval_n_texts": 256.0,
    **{f"val/{p}{d}_r{k}": 0.1 * k / 10 + 0.1 for p in ("", "local_") for d in ("i2t", "t2i") for k in (1, 5, 10)},
}  # fmt: skip
GOT_OFF = {**GOOD, "val/grounding_acc": 0.60, "val/itm_acc": 0.5}


def test_parse_arm() -> None:
    assert parse_arm("recipe") == ("recipe", ())
    assert parse_arm("got_off") == ("got_off", ("loss.got.weight=0",))
    assert parse_arm("norm=model.itm_input_norm=true,model.fusion_gate_init=0.5") == (
        "norm", ("model.itm_input_norm=true", "model.fusion_gate_init=0.5")
    )  # fmt: skip
    for bad in ("no name=x=1", "arm=novalue"):
        with pytest.raises(ValueError, match="--arm"):
            parse_arm(bad)


def test_a_run_meeting_every_target_misses_none() -> None:
    assert misses(GOOD, GOT_OFF) == []
    assert misses(GOT_OFF, None) == ["ITM 0.500 < 0.75"]  # the reference run: absolute targets only


@pytest.mark.parametrize(
    ("run", "reference", "expected"),
    [
        ({"val/grounding_word_acc/object": 0.15}, {}, "object words 0.150 < 2x random 0.080"),
        ({"val/grounding_word_acc/attribute": 0.1}, {}, "attribute words 0.100 < 2x random 0.080"),
        ({"val/itm_acc": 0.7}, {}, "ITM 0.700 < 0.75"),
        ({"val/local_t2i_r10": 0.1}, {"val/local_t2i_r10": 0.1}, "GOT-mean t2i R@10 0.100 < 3x chance 0.039"),
        ({}, {"val/local_i2t_r10": 0.21}, "retrieval worse than GOT-off: local_i2t_r10"),
        ({"val/grounding_acc": 0.74}, {}, "phrase 0.740 < GOT-off 0.600 + 0.15"),
        ({"val/i2t_r5": 0.1}, {}, "retrieval worse than GOT-off: i2t_r5"),
        ({"val/local_t2i_r1": 0.0}, {}, "retrieval worse than GOT-off: local_t2i_r1"),
    ],
)
def test_each_target_is_checked(run: dict[str, float], reference: dict[str, float], expected: str) -> None:
    assert misses({**GOOD, **run}, {**GOT_OFF, **reference}) == [expected]


def test_relation_words_have_no_target_and_missing_figures_are_misses() -> None:
    assert misses({**GOOD, "val/grounding_word_acc/relation": 0.0}, GOT_OFF) == []
    partial = {k: v for k, v in GOOD.items() if "object" not in k and "itm" not in k}
    assert misses(partial, None) == ["object words not measured", "ITM not measured"]


def test_final_validation_reads_the_last_step_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert final_validation(path) is None
    rows = [
        {"step": 100, "train/loss": 2.0, "val/grounding_acc": 0.3},
        {"step": 200, "train/loss": 1.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert final_validation(path) is None  # no validation at the last step: not finished
    with path.open("a") as f:
        f.write(json.dumps({"step": 200, "val/grounding_acc": 0.7, "val/itm_acc": 0.6}) + "\n")
    assert final_validation(path) == {"val/grounding_acc": 0.7, "val/itm_acc": 0.6}


def test_table_has_one_row_per_run_with_ratios() -> None:
    results = [
        {"arm": "recipe", "dataset": "shapes", "seed": 0, "metrics": GOOD, "misses": []},
        {"arm": "got_off", "dataset": "shapes", "seed": 0, "metrics": GOT_OFF, "misses": ["ITM"]},
    ]
    lines = table(results).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| arm | dataset | seed | phrase")
    assert "| recipe | shapes | 0 | 0.800 | 0.500 (6.2) | 0.200 (2.5) | 0.100 (0.7) | 0.800 |" in lines[2]
    assert lines[3].endswith("| - | 1 |")  # no backbone retrieval measured; one target missed


def test_means_table_averages_seeds_per_arm_and_dataset() -> None:
    other = {**GOOD, "val/grounding_acc": 0.6, "val/grounding_word_acc/object": 0.1, "val/itm_acc": 0.6}
    results = [
        {"arm": "recipe", "dataset": "shapes", "seed": 0, "metrics": GOOD, "misses": []},
        {"arm": "recipe", "dataset": "shapes", "seed": 1, "metrics": other, "misses": ["ITM"]},
        {"arm": "got_off", "dataset": "shapes", "seed": 0, "metrics": GOT_OFF, "misses": []},
    ]
    lines = means_table(results).splitlines()
    assert len(lines) == 4
    # phrase (0.8 + 0.6) / 2; object words (0.2 + 0.1) / 2 = 0.15 against random 0.08; ITM (0.8 + 0.6) / 2
    assert lines[2].startswith(
        "| recipe | shapes | 2 | 0.700 | 0.500 (6.2) | 0.150 (1.9) | 0.100 (0.7) | 0.700 |"
    )
    assert lines[2].endswith("| 1/2 |") and lines[3].startswith("| got_off | shapes | 1 |")


def test_class_cells_show_the_other_object_rate_where_measured() -> None:
    measured = {**GOOD, "val/grounding_word_other/object": 0.30}
    results = [
        {"arm": "a", "dataset": "shapes", "seed": 0, "metrics": measured, "misses": []},
        {"arm": "a", "dataset": "shapes", "seed": 1, "metrics": {**measured, "val/grounding_word_other/object": 0.1},
         "misses": []},
    ]  # fmt: skip
    assert "| 0.200 (2.5) o 0.300 |" in table(results).splitlines()[2]
    assert "| 0.200 (2.5) o 0.200 |" in means_table(results).splitlines()[2]  # (0.3 + 0.1) / 2
    # one seed without the figure (a run from before it existed): the mean leaves it out rather than guess
    results[1]["metrics"] = GOOD
    assert "| 0.200 (2.5) |" in means_table(results).splitlines()[2]


def test_finished_runs_are_stale_only_for_a_setting_that_changes_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from bench.alignment import Run
    from tests.conftest import REPO
    from volta.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "synth").mkdir(parents=True)
    config = str(REPO / "configs" / "debug.yaml")  # swap_negatives at its default there
    out = tmp_path / "study"
    run = Run("recipe", (), 0, "shapes", Path("data/synth"))
    saved = load_config(config, run.sets(out, [])).model_dump(mode="json")
    # trained from another folder naming the data by its absolute path, before swap_negatives existed, with
    # another Ray launch: none of it changes what `volta train` trains
    saved["data"]["train_shards"] = str(tmp_path / "data/synth/train")
    saved["data"]["val_shards"] = str(tmp_path / "data/synth/val")
    saved["data"]["tokenizer"] = str(tmp_path / "data/synth/tokenizer")
    del saved["loss"]["got"]["contrastive"]["swap_negatives"]
    saved["ray"]["cpus_per_worker"] = 7
    (out / run.name / "final").mkdir(parents=True)
    path = out / run.name / "final" / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert run.changed_settings(config, out, []) == []
    saved["loss"]["got"]["weight"] = 1.0  # this one does
    saved["loss"]["got"]["contrastive"]["swap_negatives"] = True
    path.write_text(yaml.safe_dump(saved))
    assert run.changed_settings(config, out, []) == ["loss.got.contrastive.swap_negatives", "loss.got.weight"]
    saved["loss"]["got"]["no_such_setting"] = 1
    path.write_text(yaml.safe_dump(saved))
    assert "no_such_setting" in run.changed_settings(config, out, [])[0]
