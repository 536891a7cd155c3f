"""Retrieval recall@K on constructed similarities and features with known ranks."""

from __future__ import annotations

import pytest
import torch

from volta.eval.features import EvalFeatures
from volta.eval.retrieval import evaluate_retrieval, group_by_image, recall_at_k, retrieval_metrics


def test_identity_similarity_is_perfect() -> None:
    out = recall_at_k(torch.eye(5), torch.arange(5), [1, 5])
    assert out == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}


def test_deliberate_swaps_give_exact_recalls() -> None:
    # 4 images x 4 captions (caption j belongs to image j). Image 0 prefers caption 1 (its own ranks 2nd);
    # caption 3 prefers images 1 and 2 over its own (its image ranks 3rd).
    sim = torch.tensor(
        [
            [0.8, 0.9, 0.0, 0.1],
            [0.1, 1.0, 0.0, 0.5],
            [0.0, 0.0, 1.0, 0.4],
            [0.0, 0.2, 0.0, 0.3],
        ]
    )
    out = recall_at_k(sim, torch.arange(4), [1, 2, 3])
    # i2t: image 0 rank 1 (caption 1 above), image 3 rank 0 (0.3 is its row max) -> 3/4 at K=1.
    assert out["i2t_r1"] == 0.75 and out["i2t_r2"] == 1.0
    # t2i: caption 0 (0.8 top), 1 (1.0 top), 2 (1.0 top) at rank 0; caption 3: 0.5, 0.4 above 0.3 -> rank 2.
    assert out["t2i_r1"] == 0.75 and out["t2i_r2"] == 0.75 and out["t2i_r3"] == 1.0


def test_several_captions_per_image_and_ties_count_against_the_query() -> None:
    e = torch.eye(3)
    # Samples: two captions of image 10 (the second describes image 20), one of 20, two of 30.
    image_ids = torch.tensor([10, 10, 20, 30, 30])
    images = e[[0, 0, 1, 2, 2]]  # (5, 3) the image of each sample
    texts = e[[0, 1, 1, 2, 2]]  # (5, 3)
    out = retrieval_metrics(images, texts, image_ids, [1, 2, 3])
    assert out["n_images"] == 3 and out["n_texts"] == 5
    # Image 10 finds its first caption; image 30 either of its two; image 20 ties with image 10's wrong
    # caption, and a tie counts against it -> rank 1.
    assert out["i2t_r1"] == pytest.approx(2 / 3) and out["i2t_r2"] == 1.0
    # The wrong caption of image 10 has similarity 0 with image 10 and ties with image 30 -> rank 2.
    assert out["t2i_r1"] == pytest.approx(4 / 5)
    assert out["t2i_r2"] == pytest.approx(4 / 5)
    assert out["t2i_r3"] == 1.0


def test_collapsed_features_score_zero_not_one() -> None:
    feats = torch.ones(6, 4)
    out = retrieval_metrics(feats, feats, torch.arange(6), [1, 5])
    assert out["i2t_r1"] == 0.0 and out["t2i_r1"] == 0.0
    assert out["i2t_r5"] == 0.0  # five other items tie with the match


def test_group_by_image_keeps_first_occurrence_order() -> None:
    gallery, text_image = group_by_image(torch.tensor([7, 3, 7, 9, 3]))
    assert gallery.tolist() == [0, 1, 3]
    assert text_image.tolist() == [0, 1, 0, 2, 1]


def test_standardisation_removes_a_modality_offset() -> None:
    # Large offsets per modality make raw cosine similarity uninformative (every query ranks the gallery by
    # the offset direction); per-modality standardisation removes them and retrieves exactly.
    torch.manual_seed(0)
    signal = torch.randn(8, 16)
    images = signal + 50 * torch.randn(16)
    texts = 2 * signal + 50 * torch.randn(16)
    raw = retrieval_metrics(images, texts, torch.arange(8), [1])
    std = retrieval_metrics(images, texts, torch.arange(8), [1], standardize_features=True)
    assert std["i2t_r1"] == 1.0 and std["t2i_r1"] == 1.0
    assert raw["i2t_r1"] < 0.5 and raw["t2i_r1"] < 0.5


def test_evaluate_retrieval_reports_backbone_means_only_when_comparable() -> None:
    n = 4
    same = EvalFeatures(torch.eye(n), torch.eye(n), torch.eye(n), torch.eye(n), torch.arange(n))
    out = evaluate_retrieval(same, [1])
    assert out["i2t_r1"] == 1.0 and out["global_i2t_r1"] == 1.0 and out["global_t2i_r1"] == 1.0
    wide = EvalFeatures(torch.randn(n, 6), torch.randn(n, 3), torch.eye(n), torch.eye(n), torch.arange(n))
    assert "global_i2t_r1" not in evaluate_retrieval(wide, [1])


def test_evaluate_retrieval_reports_got_token_means_standardised() -> None:
    # The token means carry a large offset per modality (as mean-pooled features do): standardised, they
    # retrieve exactly; the backbone means here are noise and do not.
    torch.manual_seed(0)
    n = 8
    signal = torch.randn(n, 16)
    features = EvalFeatures(
        torch.randn(n, 4), torch.randn(n, 4), torch.eye(n), torch.eye(n), torch.arange(n),
        image_local=signal + 50 * torch.randn(16), text_local=3 * signal + 50 * torch.randn(16),
    )  # fmt: skip
    out = evaluate_retrieval(features, [1])
    assert out["local_i2t_r1"] == 1.0 and out["local_t2i_r1"] == 1.0
    assert out["global_i2t_r1"] < 1.0
    without = EvalFeatures(torch.eye(n), torch.eye(n), torch.eye(n), torch.eye(n), torch.arange(n))
    assert "local_i2t_r1" not in evaluate_retrieval(without, [1])  # not extracted: not reported


def test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="width"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 5), torch.arange(3), [1])
    with pytest.raises(ValueError, match="text_image"):
        recall_at_k(torch.eye(3), torch.arange(2), [1])
