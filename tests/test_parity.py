"""Every backend against the reference, over the whole case table (tests/cases.py)."""

import pytest
import torch

from cases import CASES, SHAPES, SMALL_SHAPES, assert_matches, backend_or_skip, run

# backend -> (shapes, steps, float32 tolerance). The Triton interpreter runs a few M elements/s.
BACKENDS = {
    "foreach": (SHAPES, 50, 1e-6),
    "cpp": (SHAPES, 50, 1e-6),
    "triton": (SMALL_SHAPES, 20, 1e-5),
}
# One rounding of a value of order 1 in each low-precision dtype (its machine epsilon), times two for the
# momentum of a rounding difference carried over a few steps.
LOW_PRECISION = {torch.bfloat16: 2 * 2.0 ** -8, torch.float16: 2 * 2.0 ** -11}


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_float32_matches_reference(case, backend):
    backend_or_skip(backend)
    shapes, steps, tol = BACKENDS[backend]
    params, opt = run(case, backend, shapes=shapes, steps=steps)
    ref_params, ref_opt = run(case, "reference", shapes=shapes, steps=steps)
    assert_matches(params, ref_params, opt, ref_opt, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_low_precision_matches_reference(case, dtype, backend):
    backend_or_skip(backend)
    shapes, _, _ = BACKENDS[backend]
    tol = LOW_PRECISION[dtype]
    params, opt = run(case, backend, dtype=dtype, shapes=shapes, steps=5)
    ref_params, ref_opt = run(case, "reference", dtype=dtype, shapes=shapes, steps=5)
    for p in params:
        assert p.dtype == dtype
        assert opt.state[p]["momentum_buffer" if "momentum_buffer" in opt.state[p] else "exp_avg"].dtype \
            == torch.float32
    assert_matches(params, ref_params, opt, ref_opt, rtol=tol, atol=tol)
