"""Inputs for the shard tools: images, caption tables, COCO files and a deliberately broken shard set."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> bytes:
    """A flat-coloured image encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root: Path) -> dict[str, bytes]:
    """Three images (two JPEG, one PNG) under ``root/images``; returns their bytes by relative path."""
    images = {
        "a.jpg": image_bytes((200, 0, 0)),
        "sub/b.jpg": image_bytes((0, 200, 0), (64, 48)),
        "c.png": image_bytes((0, 0, 200), (20, 20), "PNG"),
    }
    for name, data in images.items():
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return images


def write_csv(path: Path, header: str = "image,caption") -> Path:
    """A captions CSV: ``a.jpg`` twice (two captions), ``sub/b.jpg`` once, one row naming a missing file."""
    path.write_text(
        f"{header}\n"
        'a.jpg,"a red picture, first caption"\n'
        "a.jpg,a second caption for the red picture\n"
        "sub/b.jpg,a green picture\n"
        "missing.jpg,this image does not exist\n",
        encoding="utf-8",
    )
    return path


def write_jsonl(path: Path) -> Path:
    """A captions JSONL using the ``file`` key and a caption list for one image."""
    rows = [
        {"file": "c.png", "caption": ["a blue square", "blue everywhere"]},
        {"file": "sub/b.jpg", "caption": "a green picture"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_coco(root: Path) -> tuple[Path, Path, Path]:
    """A two-image COCO subset (captions + instances JSON, images); returns (captions, instances, dir)."""
    images_dir = root / "coco"
    images_dir.mkdir(parents=True, exist_ok=True)
    (images_dir / "000000000001.jpg").write_bytes(image_bytes((120, 120, 120), (100, 80)))
    (images_dir / "000000000002.jpg").write_bytes(image_bytes((60, 60, 60), (50, 50)))
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "width": 100, "height": 80},
        {"id": 2, "file_name": "000000000002.jpg", "width": 50, "height": 50},
    ]
    captions = {
        "images": images,
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "Two dogs play with a frisbee."},
            {"id": 10, "image_id": 1, "caption": "A dog next to a person."},
            {"id": 20, "image_id": 2, "caption": "An empty street."},
        ],
    }
    instances = {
        "images": images,
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 34, "name": "frisbee"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 10, 30, 20], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 5, 20, 60], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 34, "bbox": [70, 40, 10, 10], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0},
        ],
    }
    captions_path, instances_path = root / "captions.json", root / "instances.json"
    captions_path.write_text(json.dumps(captions))
    instances_path.write_text(json.dumps(instances))
    return captions_path, instances_path, images_dir


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_broken_shards(folder: Path) -> dict[str, str]:
    """A one-shard set with one good sample and one sample per defect; returns ``{key: expected problem}``."""
    folder.mkdir(parents=True, exist_ok=True)
    good = image_bytes((10, 200, 10), (32, 32))
    meta = json.dumps({"width": 32, "height": 32, "boxes": [{"phrase": "green", "bbox": [0, 0, 32, 32]}]})
    samples = {
        "000000000": (good, b"a good sample", meta.encode(), None),
        "000000001": (good[: len(good) // 2], b"half a jpeg", meta.encode(), "undecodable_image"),
        "000000002": (good, b"   ", meta.encode(), "empty_caption"),
        "000000003": (good, "caf\u00e9".encode("latin-1"), meta.encode(), "non_utf8_caption"),
        "000000004": (good, b"bad json next", b"{not json", "bad_json"),
        "000000005": (
            good,
            b"box outside",
            json.dumps({"boxes": [{"phrase": "x", "bbox": [20, 0, 30, 5]}]}).encode(),
            "bad_boxes",
        ),
    }
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, (img, txt, js, _) in samples.items():
            _add(tar, f"{key}.jpg", img)
            _add(tar, f"{key}.txt", txt)
            _add(tar, f"{key}.json", js)
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": len(samples)}))
    return {key: problem for key, (*_, problem) in samples.items() if problem is not None}
