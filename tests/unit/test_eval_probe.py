"""Linear probe: separable features are learned, random labels stay at chance; the random-encoder baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures_model import model_config
from volta.eval.features import EvalFeatures
from volta.eval.linear_probe import fresh_model_like, labelled, linear_probe, split_indices
from volta.models.factory import build_model


def test_separable_features_give_high_accuracy() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    centres = rng.normal(0, 5, size=(3, 16))
    x = centres[labels] + rng.normal(0, 1, size=(300, 16))
    tr, te = split_indices(300, 0.3, seed=0)
    out = linear_probe(x[tr], labels[tr], x[te], labels[te])
    assert out["acc"] >= 0.95
    assert out["n_train"] == 210 and out["n_test"] == 90 and out["classes"] == 3


def test_random_labels_stay_at_chance() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(800, 16))
    labels = rng.integers(0, 2, size=800)
    tr, te = split_indices(800, 0.5, seed=0)
    out = linear_probe(x[tr], labels[tr], x[te], labels[te])
    assert 0.4 <= out["acc"] <= 0.6
    assert 0.4 <= out["majority"] <= 0.6


def test_string_labels_and_single_class_error() -> None:
    x = np.array([[0.0], [0.1], [5.0], [5.1]])
    out = linear_probe(x, ["cat", "cat", "dog", "dog"], x, ["cat", "cat", "dog", "dog"])
    assert out["acc"] == 1.0
    with pytest.raises(ValueError, match="2 classes"):
        linear_probe(x, ["cat"] * 4, x, ["cat"] * 4)


def test_split_indices_partition_deterministically() -> None:
    tr, te = split_indices(10, 0.3, seed=5)
    assert len(te) == 3 and len(tr) == 7
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(10))
    tr2, te2 = split_indices(10, 0.3, seed=5)
    assert tr.tolist() == tr2.tolist() and te.tolist() == te2.tolist()
    assert split_indices(10, 0.3, seed=6)[1].tolist() != te.tolist()
    assert len(split_indices(2, 0.01)[1]) == 1 and len(split_indices(2, 0.99)[0]) == 1


def test_labelled_keeps_only_samples_with_a_label() -> None:
    feats = EvalFeatures(
        torch.arange(8.0).reshape(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2),
        torch.arange(4), labels=[1, None, "x", 0], keys=["a", "b", "c", "d"],
    )  # fmt: skip
    x, y = labelled(feats)
    assert y == [1, "x", 0] and x[:, 0].tolist() == [0.0, 4.0, 6.0]


def test_fresh_model_like_has_the_architecture_but_new_weights() -> None:
    cfg = model_config()
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=300)
    state = torch.random.get_rng_state()
    fresh = fresh_model_like(model, cfg, seed=123)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert fresh.vocab_size == 300
    assert not torch.equal(
        a["image_encoder.swin.patch_embed.proj.weight"], b["image_encoder.swin.patch_embed.proj.weight"]
    )
    again = fresh_model_like(model, cfg, seed=123)
    assert all(torch.equal(b[k], again.state_dict()[k]) for k in b)  # seeded
