"""What `make demo` prints for people: the summary table, the warning filters, the demo script's summary and
output filter, and the dashboard's --store option."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from orchestration.pretrain import (
    HARMLESS_WARNINGS,
    harmless_warnings_option,
    ignore_harmless_warnings,
    wants_verbose,
)
from volta.dashboard import register, store_locations
from volta.training.report import NOT_MEASURED, format_table, retrieval_chance, summary_rows

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

TRAINED = {
    "retrieval": {
        "i2t_r1": 0.25, "i2t_r5": 0.5, "i2t_r10": 0.75, "t2i_r1": 0.2, "t2i_r5": 0.4, "t2i_r10": 0.6,
        "n_images": 100.0, "n_texts": 100.0,
        "global_i2t_r1": 0.1, "global_i2t_r5": 0.2, "global_i2t_r10": 0.3,
        "global_t2i_r1": 0.1, "global_t2i_r5": 0.2, "global_t2i_r10": 0.3,
        "local_i2t_r1": 0.15, "local_i2t_r5": 0.35, "local_i2t_r10": 0.55,
        "local_t2i_r1": 0.15, "local_t2i_r5": 0.35, "local_t2i_r10": 0.55,
    },
    "grounding": {
        "acc": 0.6, "random": 0.2, "center": 0.3, "n": 50.0,
        "word_acc": 0.5, "word_random": 0.2, "word_center": 0.3, "word_n": 90.0,
        "word_acc/attribute": 0.45, "word_random/attribute": 0.19, "word_center/attribute": 0.28,
        "word_acc/object": 0.7, "word_random/object": 0.21, "word_center/object": 0.31, "word_other/object": 0.1,
        "word_acc/relation": 0.3, "word_random/relation": 0.4, "word_center/relation": 0.35,
    },
    "probe": {"acc": 0.8, "random_init_acc": 0.4},
}  # fmt: skip
UNTRAINED = {
    "retrieval": {"i2t_r1": 0.01, "i2t_r5": 0.05, "i2t_r10": 0.1, "t2i_r1": 0.02, "t2i_r5": 0.06, "t2i_r10": 0.1},
    "grounding": {"acc": 0.21, "random": 0.2, "center": 0.3, "word_acc": 0.2, "word_acc/object": 0.22,
                  "word_other/object": 0.19},
    "probe": None,
}  # fmt: skip


def _rows(trained: dict | None, untrained: dict | None) -> dict[str, tuple[str, str, str, str]]:
    return {r.metric: (r.trained, r.untrained, r.random, r.centre) for r in summary_rows(trained, untrained)}


def test_table_rows_values_and_baselines() -> None:
    rows = _rows(TRAINED, UNTRAINED)
    assert rows["phrase pointing"] == ("0.600", "0.210", "0.200", "0.300")
    assert rows["word pointing, all words"] == ("0.500", "0.200", "0.200", "0.300")
    assert rows["word pointing, object"] == ("0.700", "0.220", "0.210", "0.310")
    assert rows["word pointing, attribute"][:2] == ("0.450", NOT_MEASURED)  # the untrained eval lacks it
    assert rows["word pointing, relation"] == ("0.300", NOT_MEASURED, "0.400", "0.350")
    # the share pointed at another named object, where the trained eval measured it (not for attribute here)
    assert rows["  ... object words on another named object"] == ("0.100", "0.190", "-", "-")
    assert not any("attribute words on another" in name for name in rows)
    # One caption per image among 100: a random ranking finds it in the top K with probability K/100.
    assert rows["retrieval image->text R@1/5/10 (projector)"] == (
        "0.250 / 0.500 / 0.750", "0.010 / 0.050 / 0.100", "0.010 / 0.050 / 0.100", "-"
    )  # fmt: skip
    assert rows["retrieval text->image R@1/5/10 (projector)"][0] == "0.200 / 0.400 / 0.600"
    assert rows["retrieval image->text R@1/5/10 (backbone)"][:2] == ("0.100 / 0.200 / 0.300", NOT_MEASURED)
    assert rows["retrieval text->image R@1/5/10 (GOT token means)"][:3] == (
        "0.150 / 0.350 / 0.550", NOT_MEASURED, "0.010 / 0.050 / 0.100"
    )  # fmt: skip
    assert rows["linear probe accuracy"] == ("0.800", NOT_MEASURED, "-", "-")
    assert rows["ITM accuracy (held-out)"] == (NOT_MEASURED, NOT_MEASURED, "-", "-")


def test_missing_sections_print_not_measured() -> None:
    rows = _rows({"retrieval": {"i2t_r1": 0.5, "t2i_r1": 0.5}, "grounding": None}, None)
    assert rows["phrase pointing"] == (NOT_MEASURED,) * 4
    assert rows["word pointing, all words"][0] == NOT_MEASURED
    assert not any(name.startswith("word pointing, ") and "all" not in name for name in rows)
    assert rows["retrieval image->text R@1 (projector)"] == ("0.500", NOT_MEASURED, NOT_MEASURED, "-")
    assert not any("backbone" in name or "GOT" in name for name in rows)


def test_held_out_itm_when_the_eval_has_it() -> None:
    rows = _rows({**TRAINED, "itm": {"acc": 0.9, "chance": 0.5}}, {**UNTRAINED, "itm": {"acc": 0.5}})
    assert rows["ITM accuracy (held-out)"] == ("0.900", "0.500", "0.500", "-")


def test_table_is_aligned_one_line_per_row() -> None:
    rows = summary_rows(TRAINED, UNTRAINED)
    lines = format_table(rows).splitlines()
    assert len(lines) == len(rows) + 1 and lines[0].startswith("metric")
    ends = {len(line) for line in lines}
    assert len(ends) == 1  # right-aligned columns end together


def test_retrieval_chance() -> None:
    assert retrieval_chance(5, 50, 50, "t2i") == pytest.approx(0.1)
    assert retrieval_chance(5, 50, 50, "i2t") == pytest.approx(0.1)
    # Five captions per image among 100: 1 - P(the first caption ranked is another image's).
    assert retrieval_chance(1, 20, 100, "i2t") == pytest.approx(0.05)
    assert retrieval_chance(2, 20, 100, "i2t") == pytest.approx(1 - (95 / 100) * (94 / 99))


def test_known_harmless_warning_is_filtered_another_is_not() -> None:
    category, message = HARMLESS_WARNINGS[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ignore_harmless_warnings()
        warnings.warn(f"{message}. Please use something else instead.", category, stacklevel=1)
        warnings.warn("some.other.function is deprecated", FutureWarning, stacklevel=1)
        warnings.warn(message, UserWarning, stacklevel=1)  # same text, another category
    assert [(w.category, str(w.message)) for w in seen] == [
        (FutureWarning, "some.other.function is deprecated"),
        (UserWarning, message),
    ]


def test_pythonwarnings_carries_the_filters_to_a_new_process() -> None:
    category, message = HARMLESS_WARNINGS[1]
    code = (
        "import warnings\n"
        f"warnings.warn({message!r} + ', use x instead', {category.__name__})\n"
        "warnings.warn('another message', FutureWarning)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": harmless_warnings_option("default::UserWarning")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "another message" in out.stderr
    assert message not in out.stderr


def test_verbose_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLTA_VERBOSE", raising=False)
    assert not wants_verbose(False) and wants_verbose(True)
    monkeypatch.setenv("VOLTA_VERBOSE", "1")
    assert wants_verbose(False)


def test_quiet_mode_sets_only_the_variables_the_test_suite_restores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # tests/conftest.py puts these back after every test: quiet mode is read when Ray starts, and an in-process
    # main() once left RAY_LOGGER_LEVEL=warning behind for every later Ray cluster of the pytest worker.
    from orchestration.pretrain import main
    from tests.conftest import QUIET_MODE_ENV_KEYS

    monkeypatch.delenv("VOLTA_VERBOSE", raising=False)
    for key in QUIET_MODE_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2  # quiet mode, then the config error
    changed = {k for k in os.environ.keys() | before.keys() if os.environ.get(k) != before.get(k)}
    assert changed == set(QUIET_MODE_ENV_KEYS)


def _fixture_run(run: Path) -> None:
    run.mkdir(parents=True)
    lines = [
        {"step": s, "train/loss": 10.0 - s, "train/bt_loss": 5.0, "train/itm_acc": 0.5 + s / 100}
        for s in (1, 2)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "eval-trained.json").write_text(json.dumps(TRAINED))
    (run / "eval-untrained.json").write_text(json.dumps(UNTRAINED))
    (run / "final").mkdir()
    (run / "export").mkdir()


def test_demo_summary_step_on_fixture_outputs(tmp_path: Path) -> None:
    run = tmp_path / "volta-demo"
    _fixture_run(run)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/demo.sh"), "summary", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "steps trained: 2; loss 9.000 -> 8.000" in out
    assert "word pointing, object" in out and "0.700" in out
    assert "ITM accuracy (held-out)" in out and NOT_MEASURED in out
    assert "ITM accuracy on training batches (last logged, chance 0.5): 0.520" in out
    assert "final model:" in out and "exported encoders:" in out and "loss-curves.png" in out
    assert out.rstrip().splitlines()[-1].strip() == ".venv/bin/volta dashboard --store runs/demo/mlflow"
    assert (run / "loss-curves.png").is_file()


def test_demo_filter_keeps_progress_and_drops_known_noise() -> None:
    keep = [
        "\x1b[36m(RayTrainWorker pid=1)\x1b[0m step 10/200 | loss 421.4054 | lr 0.000579 | ETA 0:01:23",
        "volta-pretrain: training failed: boom; last good checkpoint: none",
        "== summary (300s)",
        "{",
        '  "final": "runs/demo/ray/volta-demo/final",',
        '  "run_name": "volta-demo"',
        "}",
    ]
    drop = [
        "2026-12-03 08:02:31,019\tINFO cli.py:330 -- \x1b[36mNext steps\x1b[39m",
        "Running entrypoint for job raysubmit_QPfedfFBRaXcG9ib: bash -c 'cd /work/main'",
        "[2026-12-03 08:02:39,600 W 1 1] network_util.cc:330: Failed to determine local IP via external "
        "connectivity to: 8.8.8.8:53",
        "\x1b[36m(RayTrainWorker pid=1)\x1b[0m DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
        "\x1b[36m(RayTrainWorker pid=1)\x1b[0m [W1203 08:03:12.3 socket.cpp:207] [c10d] The hostname of the client "
        "socket cannot be retrieved. err=-3",
        "\x1b[36m(RayTrainWorker pid=1)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, "
        "metrics={'train/bt_loss': 337.4}, validation=False) from rank 0",
    ]
    metrics_block = ['  "metrics": {', '    "step": 20.0,', '    "train/loss": 383.5', "  },"]
    env = {k: v for k, v in os.environ.items() if k != "VOLTA_VERBOSE"}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/demo.sh"), "filter"],
        input="\n".join(keep[:4] + metrics_block + keep[4:] + drop) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    ).stdout
    assert out.splitlines() == keep
    verbose = subprocess.run(
        ["bash", str(ROOT / "scripts/demo.sh"), "filter"],
        input="\n".join(drop) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "VOLTA_VERBOSE": "1"},
        check=True,
    ).stdout
    assert verbose.splitlines() == drop


def test_dashboard_store_option(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboard", "--store", str(tmp_path / "mlflow")])
    assert args.store == str(tmp_path / "mlflow")
    uri, artifacts = store_locations(tmp_path / "mlflow")
    assert uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert artifacts == str(tmp_path / "mlflow" / "artifacts")
