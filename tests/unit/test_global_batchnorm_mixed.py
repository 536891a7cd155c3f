"""GlobalBatchNorm1d as DeepSpeed's bf16 engine leaves it: bf16 weights, fp32 running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from volta.models.global_batchnorm import GlobalBatchNorm1d


def _mixed(reference: nn.BatchNorm1d, all_reduce: object = None) -> GlobalBatchNorm1d:
    bn = GlobalBatchNorm1d(8, all_reduce=all_reduce)  # type: ignore[arg-type]
    bn.load_state_dict(reference.state_dict())
    for p in bn.parameters():  # what DeepSpeed's bf16 engine does: parameters cast, buffers kept
        p.data = p.data.bfloat16()
    return bn


@pytest.mark.parametrize("all_reduce", [None, lambda t: t])
def test_bf16_parameters_with_fp32_statistics_train_and_evaluate(all_reduce: object) -> None:
    torch.manual_seed(0)
    reference = nn.BatchNorm1d(8)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    bn = _mixed(reference, all_reduce)
    x = torch.randn(16, 8) * 3 + 1
    y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    ref = reference(x.bfloat16().float())
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    torch.testing.assert_close(bn.running_mean, reference.running_mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, reference.running_var, atol=1e-4, rtol=1e-3)
    y.float().sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16
    bn.eval()
    reference.eval()
    torch.testing.assert_close(
        bn(x.bfloat16()).float(), reference(x.bfloat16().float()), atol=0.05, rtol=0.02
    )


def test_matching_dtypes_take_torch_batchnorm_unchanged() -> None:
    torch.manual_seed(0)
    reference = nn.BatchNorm1d(8)
    bn = GlobalBatchNorm1d(8)
    bn.load_state_dict(reference.state_dict())
    x = torch.randn(16, 8)
    assert torch.equal(bn(x), reference(x))  # bit-identical: the library's own kernel
    bn.eval()
    reference.eval()
    assert torch.equal(bn(x), reference(x))
