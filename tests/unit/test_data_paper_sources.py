"""The paper's data as shards: COCO with the Karpathy split file and Visual Genome region descriptions."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from volta.cli import main
from volta.data.inspect import inspect_shards
from volta.data.sources import (
    SourceError,
    encode_record,
    karpathy_coco_ids,
    karpathy_records,
    visual_genome_records,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _data_commands_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # `volta` as the console script runs it (parsing, one-line errors), without importing the model and
    # training commands (seconds of transformers import that these tests do not use).
    monkeypatch.setattr("volta.cli._COMMAND_MODULES", ("volta.data.cli",))


def _jpeg(path: Path, size: tuple[int, int], color: tuple[int, int, int] = (90, 120, 150)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")


def _karpathy(root: Path) -> tuple[Path, Path]:
    """A dataset_coco.json with one image per split, a second train image whose file is missing."""
    images = root / "coco"
    _jpeg(images / "train2014/COCO_train2014_000000000001.jpg", (64, 48))
    _jpeg(images / "val2014/COCO_val2014_000000000002.jpg", (32, 32))
    _jpeg(images / "val2014/COCO_val2014_000000000003.jpg", (40, 30))
    _jpeg(images / "val2014/COCO_val2014_000000000004.jpg", (30, 40))

    def entry(cocoid: int, folder: str, split: str, *raws: str) -> dict[str, Any]:
        sentences = [
            {"raw": raw, "sentid": cocoid * 10 + i, "tokens": raw.split()} for i, raw in enumerate(raws)
        ]
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        return {
            "filepath": folder,
            "filename": name,
            "split": split,
            "cocoid": cocoid,
            "sentences": sentences,
        }

    data = {
        "images": [
            entry(1, "train2014", "train", "A dog on the grass. ", "A brown dog."),
            entry(2, "val2014", "restval", "A red car."),
            entry(3, "val2014", "val", "A cat on a sofa."),
            entry(4, "val2014", "test", "Two birds."),
            entry(5, "train2014", "train", "An image that is not there."),
        ],
        "dataset": "coco",
    }
    split_file = root / "dataset_coco.json"
    split_file.write_text(json.dumps(data))
    return split_file, images


def _visual_genome(root: Path) -> tuple[Path, Path, Path]:
    """Regions, image data and images: boxes to merge, clip, drop and rescale, a COCO image, a missing one."""
    images = root / "vg"
    _jpeg(images / "VG_100K/10.jpg", (200, 100))
    _jpeg(images / "VG_100K_2/11.jpg", (60, 40))  # image_data says 120x80: a half-size copy
    _jpeg(images / "12.jpg", (50, 50))

    def region(
        rid: int, image_id: int, phrase: str, x: float, y: float, w: float, h: float
    ) -> dict[str, Any]:
        return {
            "region_id": rid,
            "image_id": image_id,
            "phrase": phrase,
            "x": x,
            "y": y,
            "width": w,
            "height": h,
        }

    regions = [
        {
            "id": 10,
            "regions": [
                region(103, 10, "red ball", 180, 90, 40, 30),  # reaches past the 200x100 image
                region(101, 10, "a white dog", 10, 20, 50, 40),
                region(104, 10, "the sky", -8, -8, 5, 5),  # entirely outside: dropped
                region(102, 10, "A  white\ndog", 100, 10, 30, 30),  # the same phrase: one sample, two boxes
                region(105, 10, "   ", 0, 0, 10, 10),  # no phrase: ignored
            ],
        },
        {"id": 11, "regions": [region(201, 11, "a tall tree", 20, 10, 40, 80)]},
        {"id": 12, "regions": [region(301, 12, "a cat on a sofa", 5, 5, 20, 20)]},
        {"id": 13, "regions": [region(401, 13, "a missing picture", 0, 0, 5, 5)]},
    ]
    image_data = [
        {"image_id": 10, "width": 200, "height": 100, "url": "https://x/VG_100K/10.jpg", "coco_id": None},
        {"image_id": 11, "width": 120, "height": 80, "url": "https://x/VG_100K_2/11.jpg", "coco_id": 2},
        {"image_id": 12, "width": 50, "height": 50, "url": "https://x/VG_100K/12.jpg", "coco_id": 3},
        {"image_id": 13, "width": 10, "height": 10, "url": "https://x/VG_100K/13.jpg", "coco_id": None},
    ]
    regions_file, image_data_file = root / "region_descriptions.json", root / "image_data.json"
    regions_file.write_text(json.dumps(regions))
    image_data_file.write_text(json.dumps(image_data))
    return regions_file, image_data_file, images


def _read_shards(folder: Path) -> list[tuple[str, dict[str, Any], tuple[int, int]]]:
    """(caption, JSON, stored image size) of every sample, in key order."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member)
                assert data is not None
                members.setdefault(key, {})[ext] = data.read()
    samples = []
    for key in sorted(members):
        sample = members[key]
        image_ext = next(ext for ext in sample if ext in ("jpg", "png", "webp"))
        with Image.open(io.BytesIO(sample[image_ext])) as image:
            size = image.size
        samples.append((sample["txt"].decode(), json.loads(sample["json"]), size))
    return samples


def test_karpathy_records_give_one_sample_per_sentence_of_the_asked_splits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    split_file, images = _karpathy(tmp_path)
    with caplog.at_level(logging.WARNING):
        records = list(karpathy_records(split_file, images))
    assert [(r.caption, r.meta["image_id"], r.meta["caption_id"], r.meta["split"]) for r in records] == [
        ("A dog on the grass.", 1, 10, "train"),
        ("A brown dog.", 1, 11, "train"),
        ("A red car.", 2, 20, "restval"),
    ]
    assert records[0].image_path == images / "train2014/COCO_train2014_000000000001.jpg"
    assert records[2].meta["source"] == "val2014/COCO_val2014_000000000002.jpg"
    assert "1 of 3 images" in caplog.text  # cocoid 5 is missing: skipped and counted, not fatal

    assert [r.caption for r in karpathy_records(split_file, images, ("test", "val"))] == [
        "A cat on a sofa.",
        "Two birds.",
    ]
    assert karpathy_coco_ids(split_file) == {3, 4}
    assert karpathy_coco_ids(split_file, ("restval",)) == {2}


def test_from_karpathy_writes_the_asked_splits_into_shards(tmp_path: Path) -> None:
    split_file, images = _karpathy(tmp_path)
    out = tmp_path / "karpathy-train"
    argv = [
        "data",
        "from-karpathy",
        str(split_file),
        str(images),
        "--out",
        str(out),
        "--samples-per-shard",
        "2",
    ]
    assert main(argv) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 1}
    samples = _read_shards(out)
    assert [(caption, meta["split"]) for caption, meta, _ in samples] == [
        ("A dog on the grass.", "train"),
        ("A brown dog.", "train"),
        ("A red car.", "restval"),
    ]
    assert [size for _, _, size in samples] == [(64, 48), (64, 48), (32, 32)]

    test = tmp_path / "karpathy-test"
    assert (
        main(["data", "from-karpathy", str(split_file), str(images), "--split", "test", "--out", str(test)])
        == 0
    )
    assert [(caption, meta["image_id"]) for caption, meta, _ in _read_shards(test)] == [("Two birds.", 4)]


def test_visual_genome_records_are_phrases_with_their_boxes_in_image_pixels(tmp_path: Path) -> None:
    regions, image_data, images = _visual_genome(tmp_path)
    records = list(visual_genome_records(regions, images, image_data))
    by_caption = {r.caption: r for r in records}
    # Image id order, then region id order; the repeated phrase is one sample; "the sky" and the blank phrase
    # have no sample, nor has the missing image 13.
    assert [r.caption for r in records] == ["a white dog", "red ball", "a tall tree", "a cat on a sofa"]
    dog = by_caption["a white dog"]
    assert dog.meta["region_ids"] == [101, 102]
    assert dog.meta["boxes"] == [
        {"phrase": "a white dog", "bbox": [10.0, 20.0, 50.0, 40.0], "type": "vg_region"},
        {"phrase": "a white dog", "bbox": [100.0, 10.0, 30.0, 30.0], "type": "vg_region"},
    ]
    assert by_caption["red ball"].meta["boxes"][0]["bbox"] == [180.0, 90.0, 200 - 180, 100 - 90]  # clipped
    # image_data records 120x80 but the file is 60x40: (20, 10, 40, 80) * 0.5, then clipped to y + h <= 40.
    assert by_caption["a tall tree"].meta["boxes"][0]["bbox"] == [10.0, 5.0, 20.0, 40 - 5]
    assert by_caption["a tall tree"].meta["coco_id"] == 2
    assert by_caption["a tall tree"].meta["source"] == "VG_100K_2/11.jpg"
    assert all(
        box["phrase"] == r.caption for r in records for box in r.meta["boxes"]
    )  # the pointing game's key

    # Without image_data: images are still found, boxes are taken as they are (clipped to the file).
    plain = {r.caption: r for r in visual_genome_records(regions, images)}
    assert plain["a tall tree"].meta["boxes"][0]["bbox"] == [20.0, 10.0, 40.0, 30.0]
    assert "coco_id" not in plain["a tall tree"].meta

    capped = list(visual_genome_records(regions, images, image_data, max_phrases_per_image=1))
    assert [r.caption for r in capped] == ["a white dog", "a tall tree", "a cat on a sofa"]

    resized = encode_record(dog, max_size=50)  # 200x100 -> 50x25: every coordinate x 0.25
    assert (resized.meta["width"], resized.meta["height"]) == (50, 25)
    assert [b["bbox"] for b in resized.meta["boxes"]] == [[2.5, 5.0, 12.5, 10.0], [25.0, 2.5, 7.5, 7.5]]


def test_visual_genome_leaves_out_coco_images_of_the_karpathy_eval_splits(tmp_path: Path) -> None:
    regions, image_data, images = _visual_genome(tmp_path)
    split_file, _ = _karpathy(tmp_path)
    kept = list(
        visual_genome_records(regions, images, image_data, exclude_coco_ids=karpathy_coco_ids(split_file))
    )
    assert [r.meta["image_id"] for r in kept] == [10, 10, 11]  # image 12 is COCO 3, a Karpathy val image
    only_restval = karpathy_coco_ids(split_file, ("restval",))
    kept = list(visual_genome_records(regions, images, image_data, exclude_coco_ids=only_restval))
    assert [r.meta["image_id"] for r in kept] == [10, 10, 12]
    with pytest.raises(SourceError, match="image_data.json"):
        visual_genome_records(regions, images, exclude_coco_ids={3})


def test_from_vg_writes_resized_images_with_scaled_boxes_and_no_leakage(tmp_path: Path) -> None:
    regions, image_data, images = _visual_genome(tmp_path)
    split_file, _ = _karpathy(tmp_path)
    out = tmp_path / "vg"
    argv = ["data", "from-vg", str(regions), str(images), "--image-data", str(image_data),
            "--exclude-karpathy", str(split_file), "--max-size", "50", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    samples = _read_shards(out)
    assert [(caption, meta["image_id"]) for caption, meta, _ in samples] == [
        ("a white dog", 10),
        ("red ball", 10),
        ("a tall tree", 11),
    ]
    dog, ball, tree = samples
    assert dog[2] == (50, 25) and (dog[1]["width"], dog[1]["height"]) == (50, 25)
    assert [b["bbox"] for b in dog[1]["boxes"]] == [[2.5, 5.0, 12.5, 10.0], [25.0, 2.5, 7.5, 7.5]]
    assert ball[1]["boxes"][0]["bbox"] == [180 * 0.25, 90 * 0.25, 20 * 0.25, 10 * 0.25]
    scale = 50 / 60  # 60x40 file resized to 50 wide; its boxes were already halved from the 120x80 record
    assert tree[2] == (50, round(40 * scale))
    assert tree[1]["boxes"][0]["bbox"] == [round(v * scale, 2) for v in (10, 5, 20, 35)]

    summary = inspect_shards(str(out))
    assert summary["total_samples"] == 3 and summary["boxes"] == 4
    assert not any(summary["problems"].values())  # every box lies inside its stored image


@pytest.mark.parametrize(
    ("name", "content", "call", "expected"),
    [
        ("dataset_coco.json", [1, 2], "karpathy", "not a Karpathy split file"),
        (
            "dataset_coco.json",
            {"images": [{"split": "train", "cocoid": 1, "sentences": []}]},
            "karpathy",
            "'filename'",
        ),
        (
            "dataset_coco.json",
            {"images": [{"filename": "a.jpg", "split": "train", "cocoid": 1, "sentences": [{"text": "x"}]}]},
            "karpathy",
            "'raw'",
        ),
        ("dataset_coco.json", {"images": []}, "karpathy", "no image in split restval, train"),
        ("region_descriptions.json", {"regions": []}, "vg", "not a Visual Genome region descriptions file"),
        (
            "region_descriptions.json",
            [
                {
                    "id": 1,
                    "regions": [
                        {"region_id": 1, "phrase": "a", "x": "left", "y": 0, "width": 1, "height": 1}
                    ],
                }
            ],
            "vg",
            "entry 0",
        ),
        ("image_data.json", {"1": {}}, "vg-data", "not a Visual Genome image data file"),
        ("image_data.json", [{"width": 5}], "vg-data", "'image_id' or 'id'"),
        ("region_descriptions.json", "{not json", "vg", "not valid JSON"),
    ],
)
def test_bad_input_files_give_one_line_naming_the_file(
    tmp_path: Path, name: str, content: Any, call: str, expected: str
) -> None:
    bad = tmp_path / name
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    good_regions = tmp_path / "good_regions.json"
    good_regions.write_text("[]")
    with pytest.raises(SourceError) as caught:
        if call == "karpathy":
            karpathy_records(bad, tmp_path)
        elif call == "vg":
            visual_genome_records(bad, tmp_path)
        else:
            visual_genome_records(good_regions, tmp_path, bad)
    message = str(caught.value)
    assert str(bad) in message and expected in message and "\n" not in message


def test_cli_reports_a_bad_file_as_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "region_descriptions.json"
    bad.write_text(json.dumps({"not": "a list"}))
    (tmp_path / "images").mkdir()
    assert main(["data", "from-vg", str(bad), str(tmp_path / "images"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("volta: ") and err.count("\n") == 1 and str(bad) in err
    assert not (tmp_path / "o").exists()

    split_file, images = _karpathy(tmp_path)
    argv = [
        "data",
        "from-karpathy",
        str(split_file),
        str(images),
        "--split",
        "tran",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "split tran" in err and "restval, test, train, val" in err

    regions, _, vg_images = _visual_genome(tmp_path)
    argv = [
        "data",
        "from-vg",
        str(regions),
        str(vg_images),
        "--exclude-karpathy",
        str(split_file),
        "--out",
        "o",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--exclude-karpathy needs --image-data" in err
