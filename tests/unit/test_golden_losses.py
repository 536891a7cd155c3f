"""Per-step losses of the debug recipe equal the golden file (tests/golden_losses.py says how to regenerate it)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.golden_losses import GOLDEN, STEPS, VARIANTS, run_variant

EXPECTED = json.loads(GOLDEN.read_text())
TERMS = {
    "loss",
    "bt_loss",
    "got_loss",
    "mlm_loss",
    "itm_loss",
    "wd",
    "gwd",
    "got_nce",
    "itm_acc",
    "grad_norm",
}
# float64 throughout; the tolerance absorbs BLAS rounding differences between CPUs, not a changed computation.
# The transport terms are the most sensitive (the IPOT and Gromov-Wasserstein iterations amplify rounding, and the
# optimizer steps after them carry it into every term). Measured on a second CPU type (Xeon with AVX-512 and AMX;
# the file was made on another): the code the file was made with differs from it by up to 6.9e-8 (gwd) at step 1,
# and over the 8 steps by up to 4.9e-6 (gwd), 1.2e-6 (wd) and 5.6e-7 (any other term); a changed computation
# moves them by orders of magnitude more.
RTOL = 1e-5
RTOL_TRANSPORT = 5e-5
TRANSPORT = {"wd", "gwd"}


def test_the_golden_file_pins_every_term_of_every_step() -> None:
    assert set(EXPECTED["variants"]) == set(VARIANTS)
    for records in EXPECTED["variants"].values():
        assert len(records) == STEPS
        for record in records:
            assert set(record) >= TERMS, TERMS - set(record)
            assert all(math.isfinite(v) for v in record.values())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_per_step_losses_equal_the_golden_file(variant: str) -> None:
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = run_variant(VARIANTS[variant])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for step, (expected, actual) in enumerate(zip(EXPECTED["variants"][variant], got, strict=True), start=1):
        assert set(actual) == set(expected), f"step {step}: terms {sorted(set(actual) ^ set(expected))}"
        for name, value in expected.items():
            rtol = RTOL_TRANSPORT if name in TRANSPORT else RTOL
            assert actual[name] == pytest.approx(value, rel=rtol, abs=1e-12), (
                f"{variant} step {step} {name}: {actual[name]!r}, golden {value!r}"
            )
