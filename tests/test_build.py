"""The backends as CI sees them: the compiled libraries built by `pip install -e .` (the CUDA one with nvcc,
for sm_90 by default) and loadable on a machine without a GPU, and Triton importable."""

import pytest
import torch

from tvlars_fused import _extension


def test_cpu_library_loads_and_defines_the_ops():
    assert _extension.unavailable_reason("cpu") is None
    for op in ("lars_step", "lamb_step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tvlars_fused::{op}", "CPU")


def test_cuda_library_compiles_and_loads_without_a_gpu():
    missing = _extension._missing_tools("cuda", jit=False)
    if missing is not None:
        pytest.skip(f"the CUDA library cannot be built here: {missing}")
    assert _extension.unavailable_reason("cuda") is None
    for op in ("lars_step", "lamb_step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tvlars_fused::{op}", "CUDA")


def test_triton_backend_runs_here():
    # Without a GPU the Triton tests run under the interpreter (tests/conftest.py): if triton stopped
    # importing, every one of them would skip and the suite would still pass.
    from tvlars_fused import available_backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert available_backends(device)["triton"] is None
