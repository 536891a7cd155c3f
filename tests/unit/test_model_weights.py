"""Weight loading from local timm / Hugging Face files, export round trip, checkpoints, `volta params/export`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import RobertaForMaskedLM, RobertaModel

from tests.conftest import REPO
from tests.fixtures_model import VOCAB, make_batch, model_config, set_gates, tiny_model
from volta.cli import main
from volta.config import load_config
from volta.models import build_model, load_pretrained_weights
from volta.models.export import export_encoders, load_volta_checkpoint, save_volta_checkpoint
from volta.models.factory import text_config_for
from volta.models.params import count_parameters


def _timm_classifier(cfg):  # a full timm classifier of the same architecture, head included
    return timm.create_model(
        cfg.image.name, pretrained=False, num_classes=10, img_size=cfg.image.img_size, **cfg.image.timm_kwargs
    )


# ------------------------------------------------------------------------------------------ image weights
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_classifier_checkpoint_loads_into_the_image_encoder(tmp_path: Path, suffix: str) -> None:
    cfg = model_config()
    torch.manual_seed(1)
    source = _timm_classifier(cfg)
    state = source.state_dict()
    assert "head.fc.weight" in state
    path = tmp_path / f"swin{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    cfg = cfg.model_copy(update={"image": cfg.image.model_copy(update={"pretrained": str(path)})})
    model = build_model(cfg, vocab_size=VOCAB)
    gates_before = [g.detach().clone() for g in model.fusion.gates()]
    report = load_pretrained_weights(model, cfg)
    image = report["image"]
    assert report["text"] is None
    assert image["dropped"] == ["head.fc.bias", "head.fc.weight"]
    assert image["missing"] == [] and image["unexpected"] == [] and image["mismatched"] == []
    ours = model.image_encoder.swin.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, state[key]), key
    assert all(torch.equal(a, b) for a, b in zip(gates_before, model.fusion.gates()))
    # The wrapped encoder now computes what the classifier's trunk computes.
    source.eval()
    model.eval()
    images, _, _ = make_batch(model)
    with torch.no_grad():
        assert torch.equal(model.image_encoder(images), source.forward_features(images).flatten(1, 2))


def test_partial_image_checkpoint_reports_missing_and_unexpected_keys(tmp_path: Path) -> None:
    cfg = model_config()
    state = {k: v.contiguous() for k, v in _timm_classifier(cfg).state_dict().items()}
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "partial.safetensors"))
    cfg = cfg.model_copy(
        update={"image": cfg.image.model_copy(update={"pretrained": str(tmp_path / "partial.safetensors")})}
    )
    model = build_model(cfg, vocab_size=VOCAB)
    report = load_pretrained_weights(model, cfg)["image"]
    assert report["missing"] == ["norm.weight"] and report["unexpected"] == ["extra.weight"]


def test_missing_image_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg = model_config()
    cfg = cfg.model_copy(
        update={"image": cfg.image.model_copy(update={"pretrained": str(tmp_path / "nope.pth")})}
    )
    model = build_model(cfg, vocab_size=VOCAB)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained_weights(model, cfg)


# ------------------------------------------------------------------------------------------- text weights
@pytest.mark.parametrize("kind", ["RobertaModel", "RobertaForMaskedLM"])
def test_hugging_face_folder_loads_into_the_text_encoder(tmp_path: Path, kind: str) -> None:
    cfg = model_config()
    hf_config = text_config_for(cfg, vocab_size=VOCAB)
    torch.manual_seed(2)
    source = RobertaModel(hf_config) if kind == "RobertaModel" else RobertaForMaskedLM(hf_config)
    source.save_pretrained(str(tmp_path / "roberta"))
    cfg = cfg.model_copy(
        update={"text": cfg.text.model_copy(update={"pretrained": str(tmp_path / "roberta")})}
    )
    torch.manual_seed(3)
    model = build_model(cfg, vocab_size=VOCAB)
    report = load_pretrained_weights(model, cfg)["text"]
    assert report["missing"] == [] and report["mismatched"] == [] and report["unexpected"] == []
    if kind == "RobertaModel":  # its pooler is dropped: VoLTA has its own ITM poolers
        assert report["dropped"] == ["pooler.dense.bias", "pooler.dense.weight"]
    encoder = source if kind == "RobertaModel" else source.roberta
    theirs = encoder.state_dict()
    for key, value in model.text_encoder.roberta.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    assert report["mlm_head"] is (kind == "RobertaForMaskedLM")
    if kind == "RobertaForMaskedLM":
        assert torch.equal(model.mlm_head.dense.weight, source.lm_head.dense.weight)
        assert torch.equal(model.mlm_head.bias, source.lm_head.bias)
    # The MLM decoder stays tied to the (loaded) word embeddings.
    assert model.mlm_head.decoder.weight is model.text_encoder.word_embeddings.weight
    assert torch.equal(model.mlm_head.decoder.weight, theirs["embeddings.word_embeddings.weight"])


# ------------------------------------------------------------------------------------------------ export
def test_exported_encoders_load_into_plain_timm_and_transformers(tmp_path: Path) -> None:
    vcfg = load_config(REPO / "configs" / "debug.yaml")
    cfg = model_config()
    model = tiny_model(fusion_depth=2)
    set_gates(model, 0.3)
    model.eval()
    paths = export_encoders(model, tmp_path / "export", vcfg.model_copy(update={"model": cfg}))
    assert {"image_encoder", "text_encoder", "config", "card"} <= paths.keys()
    images, ids, mask = make_batch(model)
    with torch.no_grad():
        ours = model(images, ids, mask, fusion=False)
        mlm = model.mlm_logits(ours)

    spec = json.loads(paths["image_encoder_json"].read_text())
    swin = timm.create_model(
        spec["timm_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(paths["image_encoder"])),
        **spec["create_kwargs"],
    ).eval()
    roberta = RobertaModel.from_pretrained(str(paths["text_encoder"]), add_pooling_layer=False).eval()
    masked_lm = RobertaForMaskedLM.from_pretrained(str(paths["text_encoder"])).eval()
    with torch.no_grad():
        assert torch.equal(swin.forward_features(images).flatten(1, 2), ours.image_tokens)
        assert torch.equal(roberta(input_ids=ids, attention_mask=mask).last_hidden_state, ours.text_tokens)
        assert torch.allclose(masked_lm(input_ids=ids, attention_mask=mask).logits, mlm, atol=1e-6, rtol=0)
    assert load_config(paths["config"]).model == cfg


# ------------------------------------------------------------------------------------------- checkpoints
def test_volta_checkpoint_reloads_every_parameter_and_buffer(tmp_path: Path) -> None:
    # The ITM head with both options (their extra BatchNorms and the wider classifier must round-trip too).
    cfg = model_config(fusion_depth=3).model_copy(update={"itm_input_norm": True, "itm_product": True})
    model = build_model(cfg, vocab_size=VOCAB)
    assert model.itm_head.classifier.in_features == 3 * cfg.shared_dim
    set_gates(model, 0.25)
    model.train()
    images, ids, mask = make_batch(model)
    with torch.no_grad():  # move the BatchNorm running statistics away from their initial values
        out = model(images, ids, mask, fusion=False)
        model.bt_projections(out), model.got_projections(out), model.itm_logits(out)
    folder = save_volta_checkpoint(model, tmp_path / "ckpt", cfg)
    save_volta_checkpoint(model, folder, cfg)  # overwriting an existing checkpoint works
    loaded, loaded_cfg = load_volta_checkpoint(folder)
    assert loaded_cfg.model == cfg and loaded.vocab_size == VOCAB
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), loaded.named_buffers(), strict=True):
        assert n1 == n2 and torch.equal(b1, b2), n1
    assert loaded.mlm_head.decoder.weight is loaded.text_encoder.word_embeddings.weight
    with pytest.raises(FileNotFoundError, match="not a volta checkpoint"):
        load_volta_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------------- CLI
def test_volta_params_counts_the_paper_setting_offline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "-c", str(REPO / "configs" / "base.yaml")]) == 0
    captured = capsys.readouterr()
    counts = json.loads(captured.out)
    assert "fusion (N=6" in captured.err and "total" in captured.err
    assert counts["image_encoder"] == 86_878_584  # timm swin_base_patch4_window12_384 without its classifier
    assert counts["text_encoder"] == 124_055_040  # roberta-base without its pooler
    assert counts["fusion_gates"] == 12
    parts = counts["image_encoder"] + counts["text_encoder"] + counts["fusion"] + counts["heads"]
    assert counts["total"] == parts == counts["trainable"]
    assert 0 < counts["fusion_share_pct"] < 100


def test_count_parameters_matches_the_model() -> None:
    model = tiny_model(fusion_depth=2)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["fusion"] == sum(p.numel() for p in model.fusion.parameters())
    assert counts["image_encoder"] == sum(p.numel() for p in model.image_encoder.parameters())
    zero = count_parameters(tiny_model(fusion_depth=0))
    assert zero["fusion"] == 0 and zero["fusion_share_pct"] == 0


def test_volta_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(REPO / "configs" / "debug.yaml")
    model = build_model(cfg.model, vocab_size=VOCAB)
    save_volta_checkpoint(model, tmp_path / "ckpt", cfg)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "image_encoder.safetensors").is_file()
    assert (tmp_path / "out" / "text_encoder" / "config.json").is_file()
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
