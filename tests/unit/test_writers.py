"""Shard writing: layout read by webdataset and tarfile, resume, atomic shards, image encoding, sources."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures_datatools import image_bytes, make_coco, make_image_folder, write_csv, write_jsonl
from volta.data.sources import SourceError, coco_records, encode_record, folder_records, read_caption_table
from volta.data.writers import ShardSample, ShardWriter, count_shard_samples, encode_image, read_sizes


def _sample(i: int) -> ShardSample:
    return ShardSample(
        image_bytes((i * 20 % 255, 0, 0)), "jpg", f"caption number {i}", {"width": 40, "height": 30}
    )


def _write(out: Path, n: int, per_shard: int, calls: list[int] | None = None) -> ShardWriter:
    def encode(i: int) -> ShardSample:
        if calls is not None:
            calls.append(i)
        return _sample(i)

    with ShardWriter(out, per_shard) as writer:
        writer.write_all(range(n), encode)
    return writer


def test_shards_have_the_img2dataset_layout_and_read_with_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    _write(tmp_path, 7, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "00000.tar": 3,
        "00001.tar": 3,
        "00002.tar": 1,
    }
    with tarfile.open(tmp_path / "00001.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000004.json").read())  # type: ignore[union-attr]
    assert names[:3] == ["000000003.jpg", "000000003.txt", "000000003.json"] and len(names) == 9
    assert meta == {"key": "000000004", "width": 40, "height": 30}

    urls = [str(tmp_path / f"0000{i}.tar") for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    assert samples[5]["txt"].decode() == "caption number 5"
    assert samples[5]["jpg"] == _sample(5).image
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (40, 30)


def test_same_input_gives_byte_identical_shards(tmp_path: Path) -> None:
    _write(tmp_path / "a", 5, 2)
    _write(tmp_path / "b", 5, 2)
    for name in ("00000.tar", "00002.tar", "sizes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_rerun_skips_complete_shards_and_rewrites_broken_ones(tmp_path: Path) -> None:
    _write(tmp_path, 7, 3)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        os.utime(tmp_path / name, (1_000_000, 1_000_000))
    good = (tmp_path / "00001.tar").read_bytes()
    # Shard 1 loses its tail (a crash of some other tool, a bad copy): its entry no longer matches the file.
    (tmp_path / "00001.tar").write_bytes(good[: len(good) // 2])

    calls: list[int] = []
    writer = _write(tmp_path, 7, 3, calls)
    assert calls == [3, 4, 5, 6]  # shard 0 skipped without encoding; shard 2 (short, last) is re-encoded
    assert os.stat(tmp_path / "00000.tar").st_mtime == 1_000_000
    assert os.stat(tmp_path / "00002.tar").st_mtime == 1_000_000  # identical short last shard kept as it was
    assert (tmp_path / "00001.tar").read_bytes() == good
    assert (writer.shards_written, writer.shards_skipped) == (1, 2)
    assert read_sizes(tmp_path) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1}


def test_rerun_with_a_wrong_manifest_entry_rewrites_the_shard(tmp_path: Path) -> None:
    _write(tmp_path, 6, 3)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 3, "00001.tar": 2}))
    calls: list[int] = []
    _write(tmp_path, 6, 3, calls)
    assert calls == [3, 4, 5]
    assert read_sizes(tmp_path) == {"00000.tar": 3, "00001.tar": 3}


def test_a_crash_never_leaves_a_partial_shard_under_its_final_name(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, 3) as writer:
        for i in range(5):
            writer.write(_sample(i))
        assert (tmp_path / "00001.tar.partial").exists()  # shard 1 is being written under a temporary name
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "sizes.json"]
    assert read_sizes(tmp_path) == {"00000.tar": 3}
    assert count_shard_samples(tmp_path / "00000.tar") == 3

    calls: list[int] = []
    _write(tmp_path, 5, 3, calls)  # resume: shard 0 is complete, shard 1 is written
    assert calls == [3, 4]
    assert read_sizes(tmp_path) == {"00000.tar": 3, "00001.tar": 2}


def test_a_failed_rename_leaves_no_final_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import volta.data.writers as writers

    real_replace = os.replace

    def failing_replace(src: str | Path, dst: str | Path) -> None:
        if str(dst).endswith(".tar"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(writers.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"), ShardWriter(tmp_path, 2) as writer:
        for i in range(3):
            writer.write(_sample(i))
    assert not list(tmp_path.glob("*.tar"))


def test_shrinking_a_dataset_drops_the_shards_it_no_longer_has(tmp_path: Path) -> None:
    _write(tmp_path, 9, 3)
    _write(tmp_path, 4, 3)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert read_sizes(tmp_path) == {"00000.tar": 3, "00001.tar": 1}


def test_encode_image_keeps_original_bytes_and_resizes_with_scale() -> None:
    jpeg = image_bytes((1, 2, 3), (200, 100))
    kept = encode_image(jpeg)
    assert (kept.data, kept.ext, kept.width, kept.height, kept.scale) == (jpeg, "jpg", 200, 100, 1.0)
    png = image_bytes((1, 2, 3), (20, 10), "PNG")
    assert encode_image(png).data == png and encode_image(png).ext == "png"

    small = encode_image(jpeg, max_size=50)
    assert (small.width, small.height, small.scale, small.ext) == (50, 25, 0.25, "jpg")
    assert Image.open(io.BytesIO(small.data)).size == (50, 25)

    bmp = encode_image(image_bytes((9, 9, 9), (8, 8), "BMP"))
    assert bmp.ext == "jpg" and Image.open(io.BytesIO(bmp.data)).format == "JPEG"
    with pytest.raises(ValueError, match="not a readable image"):
        encode_image(b"definitely not an image")


def test_folder_records_from_csv_and_jsonl(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path)
    records = list(folder_records(tmp_path / "images", write_csv(tmp_path / "c.csv")))
    assert [(r.image_path.name, r.caption) for r in records] == [
        ("a.jpg", "a red picture, first caption"),
        ("a.jpg", "a second caption for the red picture"),
        ("b.jpg", "a green picture"),
    ]
    first, second = encode_record(records[0]), encode_record(records[1])
    assert first.image == second.image == images["a.jpg"]  # one sample per caption, same image bytes
    assert first.meta == {"source": "a.jpg", "width": 40, "height": 30}

    records = list(folder_records(tmp_path / "images", write_jsonl(tmp_path / "c.jsonl")))
    assert [(r.meta["source"], r.caption) for r in records] == [
        ("c.png", "a blue square"),
        ("c.png", "blue everywhere"),
        ("sub/b.jpg", "a green picture"),
    ]
    assert encode_record(records[0]).image_ext == "png"


def test_caption_table_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no image column"):
        read_caption_table(write_csv(tmp_path / "bad.csv", header="picture,caption"))
    with pytest.raises(SourceError, match="not found"):
        read_caption_table(tmp_path / "nope.csv")
    with pytest.raises(SourceError, match="images folder not found"):
        folder_records(tmp_path / "nowhere", write_csv(tmp_path / "ok.csv"))


def test_coco_records_carry_image_ids_and_category_boxes_named_in_the_caption(tmp_path: Path) -> None:
    captions, instances, images_dir = make_coco(tmp_path)
    records = list(coco_records(captions, images_dir, instances))
    assert [(r.meta["image_id"], r.meta["caption_id"], r.caption) for r in records] == [
        (1, 10, "A dog next to a person."),
        (1, 11, "Two dogs play with a frisbee."),
        (2, 20, "An empty street."),
    ]
    assert records[0].meta["boxes"] == [
        {"phrase": "dog", "bbox": [10.0, 10.0, 30.0, 20.0], "type": "coco_category"},
        {"phrase": "person", "bbox": [50.0, 5.0, 20.0, 60.0], "type": "coco_category"},
    ]
    assert [b["phrase"] for b in records[1].meta["boxes"]] == ["dog", "frisbee"]  # plural "dogs" matches
    assert records[2].meta["boxes"] == []  # "person" is in the image but not in the caption

    resized = encode_record(records[0], max_size=50)  # 100x80 -> 50x40: boxes halve
    assert (resized.meta["width"], resized.meta["height"]) == (50, 40)
    assert resized.meta["boxes"][0]["bbox"] == [5.0, 5.0, 15.0, 10.0]
    assert "boxes" not in next(iter(coco_records(captions, images_dir))).meta  # no instances: no boxes
