"""Zero-shot classification on the tiny debug checkpoint: the prompt classifier against a naive loop, accuracy
against a hand-computed argmax and a set whose answer is known, and `volta eval zeroshot` (JSON, one-line errors)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset
from PIL import Image

from tests.fixtures_data import draw_image
from tests.fixtures_eval import EvalAssets, make_eval_assets
from volta.api import VoltaDualEncoder, load
from volta.cli import main
from volta.data.factory import build_config_eval_loader
from volta.data.synth import SHAPES
from volta.data.tokenizer import load_tokenizer
from volta.eval.features import extract_features
from volta.eval.zeroshot import DEFAULT_TEMPLATES, label_index, zeroshot_accuracy, zeroshot_classifier

pytestmark = pytest.mark.timeout(120)

TEMPLATES = ("a photo of a {}.", "a {} on a plain background", "{}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> EvalAssets:
    return make_eval_assets(tmp_path_factory.mktemp("zeroshot"), samples=16)


@pytest.fixture(scope="module")
def model(assets: EvalAssets) -> VoltaDualEncoder:
    return load(assets.checkpoint)[0]


def write_labelled(folder: Path, labels: list[object], name: str = "00000.tar") -> Path:
    """One shard of distinct pictures whose JSON carries ``labels[i]`` (None: no label field)."""
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(folder / name)) as sink:
        for i, label in enumerate(labels):
            meta = {} if label is None else {"label": label}
            sink.write({"__key__": f"s{i:03d}", "png": draw_image(i * 5), "txt": b"a picture",
                        "json": json.dumps(meta).encode()})  # fmt: skip
    return folder


def test_classifier_is_the_mean_of_normalised_prompt_embeddings(model: VoltaDualEncoder) -> None:
    classes = ["circle", "red square", "star"]
    classifier = zeroshot_classifier(model, model.tokenizer, classes, TEMPLATES)
    assert classifier.shape == (3, model.config.model.projector_out_dim)
    for c, name in enumerate(classes):  # naive: one prompt at a time
        total = torch.zeros(classifier.shape[1])
        for template in TEMPLATES:
            emb = model.encode_text([template.replace("{}", name)])[0]
            total += emb / emb.norm()
        torch.testing.assert_close(classifier[c], total / total.norm(), atol=1e-5, rtol=1e-5)
    assert len(DEFAULT_TEMPLATES) >= 5 and all("{}" in t for t in DEFAULT_TEMPLATES)
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        zeroshot_classifier(model, model.tokenizer, classes, ["a photo"])


def test_accuracy_matches_a_hand_computed_argmax(model: VoltaDualEncoder, assets: EvalAssets) -> None:
    # The synthetic data's label is the shape index of the largest object.
    classifier = zeroshot_classifier(model, model.tokenizer, SHAPES, TEMPLATES)
    result = zeroshot_accuracy(model, classifier, SHAPES, str(assets.shards), batch_size=5)
    tokenizer = load_tokenizer(str(assets.tokenizer))
    loader = build_config_eval_loader(assets.config, tokenizer, str(assets.shards), batch_size=8)
    features = extract_features(assets.model, loader, device="cpu")
    labels = torch.tensor(features.labels)  # (N,)
    scores = F.normalize(features.image_bt, dim=-1) @ classifier.T  # (N, C)
    assert result["n"] == 16 and result["classes"] == len(SHAPES)
    assert result["top1"] == pytest.approx(float((scores.argmax(dim=-1) == labels).float().mean()))
    top5 = (scores.topk(5, dim=-1).indices == labels[:, None]).any(dim=-1)
    assert result["top5"] == pytest.approx(float(top5.float().mean()))
    assert result["majority"] == pytest.approx(
        max(features.labels.count(c) for c in set(features.labels)) / 16
    )
    capped = zeroshot_accuracy(model, classifier, SHAPES, str(assets.shards), max_samples=7, batch_size=5)
    assert capped["n"] == 7


def test_accuracy_is_perfect_when_each_class_is_its_own_image(
    model: VoltaDualEncoder, tmp_path: Path
) -> None:
    # Class i's embedding is image i's feature: every image is its own best class (labels by index or name).
    names = ["zero", "one", "two", "three"]
    shards = write_labelled(tmp_path / "own", [0, "one", 2, "three"])
    pictures = [Image.open(io.BytesIO(draw_image(i * 5))) for i in range(4)]
    classifier = model.encode_image(torch.stack([model.preprocess(p) for p in pictures]))  # (4, D)
    result = zeroshot_accuracy(model, classifier, names, str(shards), ks=(1, 2))
    assert result == {"top1": 1.0, "top2": 1.0, "majority": 0.25, "n": 4.0, "classes": 4.0}


def test_label_index_reads_indices_and_names() -> None:
    assert label_index(2, ["a", "b", "c"]) == 2 and label_index("b", ["a", "b", "c"]) == 1
    for bad, text in (
        (None, "no label"),
        (3, "not a class index"),
        ("d", "not one of the classes"),
        (True, "neither"),
    ):
        with pytest.raises(ValueError, match=text):
            label_index(bad, ["a", "b", "c"])


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_json_and_stops_on_bad_labels_with_one_line(
    assets: EvalAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "classes.txt").write_text("# the synthetic shapes\n" + "\n".join(SHAPES) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    code, out, err = run_cli(capsys, "eval", "zeroshot", "--checkpoint", assets.checkpoint, "--shards", assets.shards,
                             "--classes", tmp_path / "classes.txt", "--templates", tmp_path / "templates.txt")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["samples"] == 16 and summary["class_names"] == list(SHAPES) and summary["templates"] == 3
    assert set(summary["zeroshot"]) == {"top1", "top5", "majority", "n", "classes"}
    assert 0.0 <= summary["zeroshot"]["top1"] <= summary["zeroshot"]["top5"] <= 1.0
    assert "zeroshot:" in err and "top1" in err

    for labels, fragment in (([0, None], "no label"), ([0, "cat"], "'cat' is not one of the classes"), ([9], "9 is not a class index")):  # fmt: skip
        shards = write_labelled(tmp_path / f"bad{len(fragment)}", labels)
        code, out, err = run_cli(capsys, "eval", "zeroshot", "--checkpoint", assets.checkpoint, "--shards", shards,
                                 "--classes", ",".join(SHAPES))  # fmt: skip
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and out == "" and len(lines) == 1, err
        assert lines[0].startswith("volta: ") and fragment in lines[0] and "00000.tar" in lines[0], lines[0]
        assert f"s{len(labels) - 1:03d}" in lines[0]

    code, _, err = run_cli(capsys, "eval", "zeroshot", "--checkpoint", assets.checkpoint, "--classes", "a,b",
                           "--templates", "no placeholder")  # fmt: skip
    assert code == 2 and "--templates" in err
