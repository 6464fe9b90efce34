"""Every backend against the reference in float32, over the whole case table (tests/cases.py).

bfloat16 and float16 are compared one step at a time in test_low_precision.py."""

import pytest
import torch

from cases import CASES, SHAPES, SMALL_SHAPES, assert_matches, backend_or_skip, run

# backend -> (shapes, steps, float32 tolerance). The Triton interpreter runs a few M elements/s.
BACKENDS = {
    "foreach": (SHAPES, 50, 1e-6),
    "cpp": (SHAPES, 50, 1e-6),
    "triton": (SMALL_SHAPES, 20, 1e-5),
}
# Multi-step low-precision runs (test_gpu_parity.py): one rounding of a value of order 1 in each dtype, times two.
# This cannot see a 1 % error in the trust ratio; test_low_precision.py compares one step at a time instead.
LOW_PRECISION = {torch.bfloat16: 2 * 2.0 ** -8, torch.float16: 2 * 2.0 ** -11}


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_float32_matches_reference(case, backend):
    backend_or_skip(backend)
    shapes, steps, tol = BACKENDS[backend]
    params, opt = run(case, backend, shapes=shapes, steps=steps)
    ref_params, ref_opt = run(case, "reference", shapes=shapes, steps=steps)
    assert_matches(params, ref_params, opt, ref_opt, rtol=tol, atol=tol)

