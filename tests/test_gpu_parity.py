"""The parity table and the spec cases on CUDA parameters, for both GPU backends (``cuda`` and ``triton``).

Every configuration of tests/cases.py runs in float32, bfloat16 and float16 (with and without master weights)
against the reference backend on the same GPU, and the hand-computed cases and the independent NumPy reading
of tests/test_spec_cases.py run on CUDA parameters. Every test skips with the reason where there is no GPU.
"""

import numpy as np
import pytest
import torch

from cases import (BF16_CASES, CASES, SHAPES, SMALL_SHAPES, assert_matches, backend_or_skip, bf16_lockstep, make_params,
                   run, set_grads)
from test_parity import LOW_PRECISION
from test_spec_cases import HAND_CASES, _lamb_expected, numpy_expected
from tvlars_fused import LAMB, TVLARS, available_backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

GPU_BACKENDS = ["cuda", "triton"]
# The spec's float32 contract on a GPU: |x - ref| <= 1e-5 * (1 + |ref|) after 50 steps (expf, sqrtf and fused
# multiply-adds differ from the reference's by a few ulps a step).
FLOAT32_TOL = 1e-5
# One layer spread over many chunks of either backend (257 chunks of 4096 elements for both cuda, on an H200, and
# triton), so each layer's reduction over its chunks is part of the table.
GPU_SHAPES = SHAPES + [((1 << 20) + 3,)]


def test_both_gpu_backends_are_available():
    """On the GPU machine both fused backends must run: were one unavailable, its tests here would all skip
    and the GPU check would still pass."""
    assert available_backends("cuda")["cuda"] is None
    assert available_backends("cuda")["triton"] is None


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_float32_matches_reference_and_repeats_bit_for_bit(case, backend):
    """float32, 50 steps: within the float32 contract of the reference run on the same GPU; a second run gives
    identical bits (each layer's norms are reduced in a fixed order, without atomics)."""
    backend_or_skip(backend, "cuda")
    params, opt = run(case, backend, shapes=GPU_SHAPES, steps=50, device="cuda")
    ref_params, ref_opt = run(case, "reference", shapes=GPU_SHAPES, steps=50, device="cuda")
    assert_matches(params, ref_params, opt, ref_opt, rtol=FLOAT32_TOL, atol=FLOAT32_TOL)
    again, again_opt = run(case, backend, shapes=GPU_SHAPES, steps=50, device="cuda")
    assert_matches(params, again, opt, again_opt, rtol=0, atol=0)


@pytest.mark.parametrize("master_weights", [False, True], ids=["params", "masters"])
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_low_precision_matches_reference(case, backend, dtype, master_weights):
    """bfloat16 and float16 parameters, 5 steps, with and without float32 master weights: within one rounding of
    the parameter dtype (x2) of the reference run on the same GPU, every state tensor float32, and a second run
    gives identical bits."""
    backend_or_skip(backend, "cuda")
    kwargs = dict(dtype=dtype, shapes=GPU_SHAPES, steps=5, device="cuda",
                  optimizer_kwargs=dict(master_weights=master_weights))
    params, opt = run(case, backend, **kwargs)
    ref_params, ref_opt = run(case, "reference", **kwargs)
    for p in params:
        assert p.dtype == dtype
        assert all(value.dtype == torch.float32 for value in opt.state[p].values()), list(opt.state[p])
        assert ("master_weight" in opt.state[p]) == master_weights
    tol = LOW_PRECISION[dtype]
    assert_matches(params, ref_params, opt, ref_opt, rtol=tol, atol=tol)
    again, again_opt = run(case, backend, **kwargs)
    assert_matches(params, again, opt, again_opt, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, masters", [(torch.float32, False), (torch.bfloat16, True)], ids=["float32", "bf16"])
@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_two_runs_over_thousands_of_chunks_are_bit_identical(backend, cls, kwargs, dtype, masters):
    """A 2**25-element layer (4097 chunks of 8192 elements for the cuda kernel on an H200, ten times its 396
    resident blocks, so each block loops over several; 1025 chunks of triton): two runs of 3 steps give identical
    bits."""
    backend_or_skip(backend, "cuda")
    shapes = [((1 << 25) + 7,), (4096, 513), (3,)]
    runs = []
    for _ in range(2):
        params = make_params(shapes, dtype=dtype, device="cuda")
        opt = cls(params, backend=backend, master_weights=masters, **kwargs)
        for step in range(3):
            set_grads(params, step)
            opt.step()
        runs.append((params, opt))
    (first, first_opt), (second, second_opt) = runs
    assert_matches(first, second, first_opt, second_opt, rtol=0, atol=0)


# ----------------------------------------------------------------------------- tests/test_spec_cases.py on a GPU
@pytest.mark.parametrize("name,cls,kwargs,w,g,expected", HAND_CASES, ids=[c[0] for c in HAND_CASES])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_hand_computed_step(backend, name, cls, kwargs, w, g, expected):
    """One step of a one-layer CUDA parameter equals the value written out by hand from the spec."""
    backend_or_skip(backend, "cuda")
    if expected is None:
        expected = _lamb_expected(w, g, kwargs["lr"], kwargs["weight_decay"], kwargs["eps"],
                                  kwargs.get("bias_correction", True))
    p = torch.tensor(w, dtype=torch.float32, device="cuda").requires_grad_()
    opt = cls([p], backend=backend, **kwargs)
    p.grad = torch.tensor(g, dtype=torch.float32, device="cuda")
    opt.step()
    torch.testing.assert_close(p.detach().double().cpu(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    assert opt.state[p]["step"].item() == 1.0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_lamb_max_grad_norm_hand(backend):
    """LAMB's global gradient clipping on CUDA parameters: global ||g|| = 5 clipped to 1 (hand values as in
    tests/test_spec_cases.py)."""
    backend_or_skip(backend, "cuda")
    a = torch.tensor([[2.0]], device="cuda", requires_grad=True)
    b = torch.tensor([[-1.0]], device="cuda", requires_grad=True)
    opt = LAMB([a, b], lr=0.1, weight_decay=0.0, eps=1e-12, max_grad_norm=1.0, backend=backend)
    a.grad = torch.tensor([[3.0]], device="cuda")
    b.grad = torch.tensor([[4.0]], device="cuda")
    opt.step()
    assert a.item() == pytest.approx(2 - 0.1 * 2, rel=1e-6)
    assert b.item() == pytest.approx(-1 - 0.1 * 1, rel=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_case_table_matches_independent_numpy_reading(case, backend):
    """10 steps of every configuration on CUDA parameters agree with the float64 NumPy reading of the spec."""
    backend_or_skip(backend, "cuda")
    steps = 10
    params, _ = run(case, backend, shapes=SMALL_SHAPES, steps=steps, device="cuda")
    for i, (p, e) in enumerate(zip(params, numpy_expected(case, steps))):
        np.testing.assert_allclose(p.detach().double().cpu().numpy(), e, rtol=1e-5, atol=1e-6,
                                   err_msg=f"layer {i} {tuple(p.shape)}")


@pytest.mark.parametrize("storage", ["stochastic", "nearest", "kahan"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", BF16_CASES, ids=repr)
def test_bf16_state_matches_reference(case, backend, storage):
    """bfloat16 state (docs/algorithms.md, section 9) through the kernels, 5 steps side by side with the reference on
    the same GPU (cases.bf16_lockstep, the float32 contract for the weights), the kernels used, not foreach; and two
    free-running runs of 5 steps give identical bits."""
    backend_or_skip(backend, "cuda")
    options = dict(state_dtype=torch.bfloat16, rounding="nearest" if storage == "nearest" else "stochastic",
                   kahan=storage == "kahan", seed=7)
    dtype = torch.bfloat16 if storage == "kahan" else torch.float32
    bf16_lockstep(case, backend, options, dtype=dtype, shapes=GPU_SHAPES, device="cuda", tol=FLOAT32_TOL)
    kwargs = dict(dtype=dtype, shapes=GPU_SHAPES, steps=5, device="cuda", optimizer_kwargs=options)
    params, opt = run(case, backend, **kwargs)
    assert all(chosen["backend"] == backend for chosen in opt.chosen_backends)
    again, again_opt = run(case, backend, **kwargs)
    assert_matches(params, again, opt, again_opt, rtol=0, atol=0)
