"""ITM pair sampling (half negatives, never the same image, uniform or hard, seeded) and the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from volta.losses.itm import itm_loss, sample_itm_pairs


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bsz", [2, 7, 16])
def test_half_negatives_and_never_the_same_image(bsz: int) -> None:
    ids = torch.arange(bsz) // 2  # two captions per image
    if bsz == 2:
        ids = torch.tensor([0, 1])
    if bsz == 7:
        ids = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    gen = _gen()
    for _ in range(50):
        index, labels = sample_itm_pairs(ids, generator=gen)
        assert int((labels == 0).sum()) == bsz // 2
        positives = labels == 1
        assert (index[positives] == torch.arange(bsz)[positives]).all()
        assert (ids[index[~positives]] != ids[~positives]).all()


def test_rows_without_another_image_stay_positive() -> None:
    ids = torch.tensor([5, 5, 5, 5, 5, 9])  # only row 5 (and rows pointing at it) can be negatives
    index, labels = sample_itm_pairs(ids, generator=_gen())
    assert int((labels == 0).sum()) == 3
    assert (ids[index[labels == 0]] != ids[labels == 0]).all()
    index, labels = sample_itm_pairs(torch.zeros(4, dtype=torch.long), generator=_gen())
    assert (labels == 1).all() and (index == torch.arange(4)).all()


def test_uniform_mode_is_roughly_uniform() -> None:
    ids = torch.arange(8)
    counts = torch.zeros(8, 8)
    gen = _gen(1)
    for _ in range(2000):
        index, labels = sample_itm_pairs(ids, generator=gen)
        for i in torch.nonzero(labels == 0).squeeze(1).tolist():
            counts[i, index[i]] += 1
    off = counts[~torch.eye(8, dtype=torch.bool)].view(8, 7)
    freq = off / off.sum(1, keepdim=True)
    assert (counts.diagonal() == 0).all()
    assert (freq - 1 / 7).abs().max() < 0.05  # ~1000 draws per row


def test_hard_mode_prefers_similar_rows() -> None:
    ids = torch.arange(6)
    similarity = torch.zeros(6, 6)
    similarity[:, 3] = 4.0  # every caption finds image 3 very similar
    similarity[3, 4] = 4.0
    picks = torch.zeros(6)
    gen = _gen(2)
    for _ in range(300):
        index, labels = sample_itm_pairs(ids, generator=gen, mode="hard", similarity=similarity)
        for i in torch.nonzero(labels == 0).squeeze(1).tolist():
            picks[index[i]] += 1
            assert index[i] != i
    assert picks[3] > 0.6 * picks.sum()


def test_deterministic_under_a_seeded_generator() -> None:
    ids = torch.arange(12) // 3
    first = sample_itm_pairs(
        ids, generator=_gen(7), mode="hard", similarity=torch.randn(12, 12, generator=_gen(3))
    )
    second = sample_itm_pairs(
        ids, generator=_gen(7), mode="hard", similarity=torch.randn(12, 12, generator=_gen(3))
    )
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    third = sample_itm_pairs(ids, generator=_gen(8))
    fourth = sample_itm_pairs(ids, generator=_gen(8))
    assert all(torch.equal(x, y) for x, y in zip(third, fourth))


def test_hard_mode_requires_similarity() -> None:
    with pytest.raises(ValueError, match="similarity"):
        sample_itm_pairs(torch.arange(4), generator=None, mode="hard")


def test_itm_loss_is_mean_cross_entropy_in_fp32() -> None:
    logits = torch.randn(6, 2).bfloat16()
    labels = torch.tensor([1, 0, 1, 0, 0, 1])
    out = itm_loss(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(logits.float(), labels))


def test_itm_head_input_norm_reads_only_what_differs_between_samples() -> None:
    from volta.models.heads import ITMHead

    torch.manual_seed(0)
    image, text = torch.randn(8, 5, 12), torch.randn(8, 4, 10)  # (B, P, Di), (B, T, Dt)
    shift_i, shift_t = 10 * torch.randn(12), 10 * torch.randn(10)  # what every sample shares
    normed = ITMHead(12, 10, 6, input_norm=True).train()
    same = normed(image + shift_i, text + shift_t * 3), normed(image, text)
    # The paper's head (default) takes the pooled tokens as they are: a shared offset changes its logits.
    paper = ITMHead(12, 10, 6).train()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in paper.modules())
    assert torch.allclose(same[0], same[1], atol=1e-4)
    assert not torch.allclose(paper(image + shift_i, text + shift_t), paper(image, text), atol=1e-2)
    # A per-dimension rescaling of the whole batch is removed too (batch statistics), a per-sample one is not.
    assert torch.allclose(normed(image * 7, text * 3), normed(image, text), atol=1e-3)
    assert not torch.allclose(normed(image * torch.rand(8, 1, 1), text), normed(image, text), atol=1e-3)


def _swap_gap(head: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """logit(a, a) + logit(b, b) - logit(a, b) - logit(b, a) of the match class over pairs of samples a, b: zero
    for every pair when the logit is a text score plus an image score (nothing compares the two)."""
    with torch.no_grad():
        match = head(image, text)[:, 1] - head(image, text)[:, 0]
        crossed = head(image.flip(0), text)[:, 1] - head(image.flip(0), text)[:, 0]
    return match + match.flip(0) - crossed - crossed.flip(0)


def test_itm_head_product_compares_the_two_streams() -> None:
    from volta.models.heads import ITMHead

    torch.manual_seed(0)
    image, text = torch.randn(6, 5, 12), torch.randn(6, 4, 10)
    paper = ITMHead(12, 10, 6).eval()
    product = ITMHead(12, 10, 6, product=True).eval()
    assert paper.classifier.in_features == 12 and product.classifier.in_features == 18
    # [text ; image] alone: the logits add a text score and an image score, whatever the weights.
    assert torch.allclose(_swap_gap(paper, image, text), torch.zeros(6), atol=1e-5)
    assert _swap_gap(product, image, text).abs().max() > 1e-3
    # The features are exactly [t ; i ; t * i] of the pooled tokens.
    t = torch.tanh(product.text_pooler(product.text_proj(text[:, 0])))
    i = torch.tanh(product.image_pooler(product.image_proj(image.mean(dim=1))))
    expected = product.classifier(torch.cat([t, i, t * i], dim=-1))
    torch.testing.assert_close(product(image, text), expected)
