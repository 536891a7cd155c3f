"""One device resolver for the Python API, the evaluation commands and the training ranks."""

from __future__ import annotations

import pytest
import torch

from volta.devices import resolve_device
from volta.errors import UsageError

pytestmark = pytest.mark.unit


def test_names_resolve_and_devices_pass_through() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    given = torch.device("cuda", 5)  # a torch.device is taken as it is, even where it does not exist
    assert resolve_device(given) is given


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA")
def test_without_cuda_auto_is_the_cpu_and_cuda_is_a_one_line_error() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UsageError, match=rf"device '{name}': no CUDA device available"):
            resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_with_cuda_a_rank_takes_its_own_gpu_unless_one_is_named() -> None:
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0", local_rank=7) == torch.device("cuda", 0)


def test_a_bad_name_is_a_one_line_error_naming_it() -> None:
    with pytest.raises(UsageError, match=r"device 'gpu0'"):
        resolve_device("gpu0")
