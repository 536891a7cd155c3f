"""`volta data ...` and `volta tokenizer train` as a user runs them (a subprocess per command)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures_cli import volta
from tests.fixtures_datatools import make_broken_shards, make_coco, make_image_folder, write_csv, write_jsonl

pytestmark = pytest.mark.timeout(240)


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def test_from_folder_with_csv_and_jsonl(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path)
    csv, jsonl = write_csv(tmp_path / "captions.csv"), write_jsonl(tmp_path / "captions.jsonl")
    run = volta("data", "from-folder", "--images", "images", "--captions", csv, "--out", "csv_out",
                "--samples-per-shard", "2", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "csv_out/sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 1}
    first, second = _members(tmp_path / "csv_out/00000.tar"), _members(tmp_path / "csv_out/00001.tar")
    assert first["000000000.jpg"] == first["000000001.jpg"] == images["a.jpg"]  # two captions, same bytes
    assert first["000000001.txt"].decode() == "a second caption for the red picture"
    assert json.loads(second["000000002.json"]) == {
        "key": "000000002",
        "source": "sub/b.jpg",
        "width": 64,
        "height": 48,
    }

    run = volta(
        "data", "from-folder", "--images", "images", "--captions", jsonl, "--out", "jsonl_out", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    members = _members(tmp_path / "jsonl_out/00000.tar")
    assert sorted(members) == sorted(
        f"00000000{i}.{e}" for i in range(3) for e in ("json", "txt", "png" if i < 2 else "jpg")
    )
    assert members["000000001.txt"].decode() == "blue everywhere"


def test_from_coco_keeps_image_ids_and_scales_category_boxes(tmp_path: Path) -> None:
    captions, instances, images_dir = make_coco(tmp_path)
    run = volta("data", "from-coco", "--captions", captions, "--instances", instances, "--images", images_dir,
                "--out", "coco", "--max-size", "50", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    members = _members(tmp_path / "coco/00000.tar")
    metas = [json.loads(members[f"00000000{i}.json"]) for i in range(3)]
    assert [(m["image_id"], m["width"], m["height"]) for m in metas] == [
        (1, 50, 40),
        (1, 50, 40),
        (2, 50, 50),
    ]
    assert metas[0]["boxes"] == [
        {"phrase": "dog", "bbox": [5.0, 5.0, 15.0, 10.0], "type": "coco_category"},
        {"phrase": "person", "bbox": [25.0, 2.5, 10.0, 30.0], "type": "coco_category"},
    ]
    assert metas[2]["boxes"] == []
    assert members["000000002.jpg"] == (images_dir / "000000000002.jpg").read_bytes()  # small enough: kept


def test_synth_writes_splits_and_a_tokenizer_and_tokenizer_train_works(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    run = volta("data", "synth", "--out", "synth", "--train-samples", "60", "--val-samples", "10",
                "--image-size", "64", "--samples-per-shard", "25", "--seed", "7", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = tmp_path / "synth"
    assert json.loads((out / "train/sizes.json").read_text()) == {
        "00000.tar": 25,
        "00001.tar": 25,
        "00002.tar": 10,
    }
    assert json.loads((out / "val/sizes.json").read_text()) == {"00000.tar": 10}
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tokenizer.mask_token == "<mask>" and tokenizer.pad_token == "<pad>"
    # Words of the synthetic vocabulary are single tokens after BPE training on its captions.
    assert len(tokenizer.tokenize(" red circle")) == 2

    run = volta(
        "tokenizer", "train", "--shards", out / "train", "--out", "tok", "--vocab-size", "400", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    trained = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = trained(" a small blue star")["input_ids"]
    assert trained.decode(ids, skip_special_tokens=True) == " a small blue star"
    assert 261 < len(trained) <= 400  # 256 bytes + 5 specials + merges learnt from the captions


def test_inspect_reports_every_defect_and_draws_a_grid(tmp_path: Path) -> None:
    expected = make_broken_shards(tmp_path / "broken")
    run = volta("data", "inspect", "broken", "--grid", "grid.png", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["total_samples"] == 6 and summary["shards"] == [
        {"name": "00000.tar", "samples": 6, "manifest": 6}
    ]
    assert summary["problems"] == {p: 1 for p in expected.values()}
    assert {item["key"]: item["problems"] for item in summary["problem_samples"]} == {
        key: [problem] for key, problem in expected.items()
    }
    assert summary["caption_words"]["histogram"]["1-5"] == 4  # non-UTF-8 has no words; blank has 0
    for problem in expected.values():
        assert problem in run.stderr  # the readable table
    grid = Image.open(tmp_path / "grid.png")
    assert grid.format == "PNG" and grid.size[0] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["data", "from-folder", "--images", "nowhere", "--captions", "c.csv", "--out", "o"],
            "images folder not found",
        ),
        (
            ["data", "from-folder", "--images", "images", "--captions", "bad.csv", "--out", "o"],
            "no image column",
        ),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    make_image_folder(tmp_path)
    write_csv(tmp_path / "bad.csv", header="picture,caption")
    run = volta(*args, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("volta: ") and message in run.stderr
    assert not (tmp_path / "o").exists()
