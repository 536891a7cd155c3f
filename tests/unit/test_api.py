"""volta.load and the dual-encoder API on the tiny debug checkpoint: loading layouts (local and a moto S3 server),
features equal to the retrieval evaluation's, similarity, grounding maps equal to the heat maps' plan masses."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import volta
import volta.data.s3
from tests.conftest import REPO
from tests.fixtures_data import aws_env, moto_endpoint, upload_folder
from tests.fixtures_eval import EvalAssets, make_eval_assets
from volta.api import VoltaDualEncoder, load
from volta.data.batch import EvalCollate
from volta.data.factory import build_config_eval_loader
from volta.data.s3 import S3Location
from volta.data.tokenizer import load_tokenizer
from volta.errors import UsageError
from volta.eval.features import evaluating, extract_features, forward_dual
from volta.eval.grounding import got_text_mask, grid_shape, phrase_token_mask, transport_plans
from volta.eval.heatmap import content_words

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> EvalAssets:
    return make_eval_assets(tmp_path_factory.mktemp("api"), samples=16)


@pytest.fixture(scope="module")
def loaded(assets: EvalAssets) -> VoltaDualEncoder:
    model, _, _ = load(assets.checkpoint)
    return model


def read_shards(folder: Path) -> list[tuple[bytes, str]]:
    """(image bytes, caption) of every sample of a shard folder, in reading order, straight from the tars."""
    out = []
    for shard in sorted(folder.glob("*.tar")):
        parts: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member)
                assert data is not None
                parts[key][ext] = data.read()
        out += [(p["jpg"], p["txt"].decode().strip()) for p in parts.values()]
    return out


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_import_volta_stays_free_of_torch_and_exposes_load() -> None:
    code = "import sys, volta; assert 'torch' not in sys.modules, 'torch imported'; print(volta.__version__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert volta.load is load


def test_load_returns_model_preprocess_tokenizer(assets: EvalAssets, tmp_path: Path) -> None:
    model, preprocess, tokenizer = load(assets.checkpoint / "config.yaml", device="cpu")
    assert same_state(model.model, assets.model) and not model.model.training
    size = assets.config.model.image.img_size
    gray = Image.new("L", (30, 20), 128)  # any mode and size: converted to RGB, resized whole
    assert preprocess(gray).shape == (3, size, size)
    tokens = tokenizer(["a red circle", "a blue star on a green background"])
    assert tokens["input_ids"].shape == (2, assets.config.model.text.max_length)
    assert torch.equal(
        model.encode_text(tokens), model.encode_text(["a red circle", "a blue star on a green background"])
    )

    # A run folder (its final/) and an engine checkpoint folder (its volta/ copy) load the same model.
    for layout in ("run/final", "checkpoint_000002/volta"):
        shutil.copytree(assets.checkpoint, tmp_path / layout)
        other, _, _ = load(tmp_path / layout.split("/")[0])
        assert same_state(other.model, assets.model)

    with pytest.raises(UsageError, match="nowhere: no such checkpoint"):
        load(tmp_path / "nowhere")
    export = tmp_path / "export"
    export.mkdir()
    (export / "image_encoder.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="encoder export") as err:
        load(export)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="tokenizer"):
        load(assets.checkpoint, tokenizer=str(tmp_path / "no-tokenizer"))


def test_load_from_s3_prefix_caches_the_checkpoint(
    assets: EvalAssets, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_folder(moto_endpoint, assets.checkpoint, "volta-api", "runs/r1/final")
    upload_folder(moto_endpoint, assets.checkpoint, "volta-api", "runs/r1/checkpoint_000002/volta")
    # The endpoint comes from AWS_ENDPOINT_URL (no per-process client made for another endpoint yet).
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setattr(volta.data.s3, "_clients", {})
    cache = tmp_path / "cache"
    model, _, _ = load("s3://volta-api/runs/r1", cache_dir=cache)  # the run prefix: its final/
    assert same_state(model.model, assets.model)
    weights = cache / "volta-api" / "runs" / "r1" / "final" / "model.safetensors"
    assert weights.is_file()
    before = weights.stat().st_ino
    load("s3://volta-api/runs/r1/final/", cache_dir=cache)
    assert weights.stat().st_ino == before  # already cached: not fetched again

    # An explicit location; an engine checkpoint prefix loads its volta/ copy.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    other, _, _ = load(
        "s3://volta-api/runs/r1/checkpoint_000002", cache_dir=cache, s3=S3Location(moto_endpoint, "us-east-1")
    )
    assert same_state(other.model, assets.model)
    with pytest.raises(UsageError, match="not a volta checkpoint"):
        load("s3://volta-api/runs/none", cache_dir=cache, s3=S3Location(moto_endpoint, "us-east-1"))


def test_encoders_give_the_retrieval_evaluation_features(
    assets: EvalAssets, loaded: VoltaDualEncoder
) -> None:
    # Independent path: the evaluation loader + extract_features, as `volta eval retrieval` computes them.
    tokenizer = load_tokenizer(str(assets.tokenizer))
    loader = build_config_eval_loader(assets.config, tokenizer, str(assets.shards), batch_size=8)
    features = extract_features(assets.model, loader, device="cpu")
    samples = read_shards(assets.shards)
    assert len(samples) == len(features) == 16

    images = torch.stack([loaded.preprocess(Image.open(io.BytesIO(b))) for b, _ in samples])  # (N, 3, S, S)
    image_features = loaded.encode_image(images)
    text_features = loaded.encode_text([c for _, c in samples])
    assert image_features.shape == (16, assets.config.model.projector_out_dim)
    torch.testing.assert_close(image_features, F.normalize(features.image_bt, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_features, F.normalize(features.text_bt, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(16))

    sim = loaded.similarity(image_features[:5], text_features)
    assert sim.shape == (5, 16)
    for i in range(5):
        for j in range(16):
            assert abs(float(sim[i, j]) - float(torch.dot(image_features[i], text_features[j]))) < 1e-5

    with pytest.raises(ValueError, match="preprocess"):
        loaded.encode_image(torch.zeros(1, 3, 32, 32))


def test_local_features_are_means_of_the_unit_got_tokens_of_words(assets: EvalAssets) -> None:
    # A naive per-sample loop over the GOT projections, from the tokenizer's own special-token mask.
    tokenizer = load_tokenizer(str(assets.tokenizer))
    loader = build_config_eval_loader(assets.config, tokenizer, str(assets.shards), batch_size=8)
    features = extract_features(assets.model, loader, device="cpu")
    assert features.image_local is not None and features.text_local is not None
    row = 0
    with evaluating(assets.model):
        for batch in build_config_eval_loader(assets.config, tokenizer, str(assets.shards), batch_size=8):
            got = assets.model.got_projections(forward_dual(assets.model, batch, "cpu"))
            for i in range(batch.batch_size):
                patches = [got.image[i, p] / got.image[i, p].norm() for p in range(got.image.shape[1])]
                ids = batch.input_ids[i].tolist()
                words = [
                    got.text[i, j] / got.text[i, j].norm()
                    for j in range(len(ids))
                    if batch.attention_mask[i, j] and ids[j] not in tokenizer.all_special_ids
                ]
                assert words, "every caption has a word"
                torch.testing.assert_close(features.image_local[row], torch.stack(patches).mean(0))
                torch.testing.assert_close(features.text_local[row], torch.stack(words).mean(0))
                row += 1
    assert row == len(features)


def test_ground_gives_each_content_word_its_plan_mass(assets: EvalAssets, loaded: VoltaDualEncoder) -> None:
    picture = Image.new("RGB", (90, 60), (120, 120, 120))
    picture.paste((220, 30, 30), (10, 10, 40, 40))
    caption = "a red square on a grey background"
    maps = loaded.ground(picture, caption)
    assert (
        [w for w, _ in maps]
        == [w for w, _, _ in content_words(caption)]
        == ["red", "square", "grey", "background"]
    )

    # Independently: the GOT plan of the same pair, summed over each word's tokens.
    cfg = assets.config
    tokenizer = load_tokenizer(str(assets.tokenizer))
    sample = {"key": "k", "image": loaded.preprocess(picture), "caption": caption, "meta": {},
              "orig_size": picture.size, "image_id": 0}  # fmt: skip
    batch = EvalCollate(tokenizer, max_length=cfg.model.text.max_length)([sample])
    mask = got_text_mask(
        batch.attention_mask, batch.special_tokens_mask, include_special=cfg.loss.got.include_special_tokens
    )
    with evaluating(assets.model):
        out = forward_dual(assets.model, batch, "cpu")
        plan = transport_plans(assets.model, out, mask, cfg.eval.grounding_got(cfg.loss.got))[0]  # (P, T)
    grid = grid_shape(plan.shape[0])
    for (word, heat), (_, start, end) in zip(maps, content_words(caption)):
        tokens = phrase_token_mask(batch.offsets[0], mask[0], [(start, end)])
        assert heat.shape == grid, word
        torch.testing.assert_close(heat, plan[:, tokens].sum(dim=-1).reshape(grid))
        assert float(heat.min()) >= 0.0
    assert sum(float(h.sum()) for _, h in maps) <= float(plan.sum()) + 1e-6

    upsampled = loaded.ground(picture, caption, upsample=True)
    for (word, big), (_, small) in zip(upsampled, maps):
        assert big.shape == (60, 90), word
        expected = F.interpolate(small[None, None], size=(60, 90), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(big, expected)
