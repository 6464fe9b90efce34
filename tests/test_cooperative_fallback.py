"""backend="cuda" when its cooperative launch cannot be co-resident: csrc/cuda_step.cu's launch is refused before any
block runs (fewer blocks fit than the occupancy query said, e.g. under an MPS thread limit), and would be at every
step. The step then falls back to another backend, once per device and with a warning; a sharded bucket raises
instead. The decision is checked on the CPU: the CPU twin's step (backend="cpp", the same Python path) is handed an
op that fails the way the CUDA op does."""

import re
import warnings

import pytest
import torch

from buckets import assert_buckets_equal, clone_bucket, make_bucket
from cases import SHAPES, assert_matches, make_params, set_grads
from tvlars_fused import LAMB, TVLARS, _backends, _extension

_unavailable = _extension.unavailable_reason("cpu")
if _unavailable is not None:
    pytest.skip(f"the cpp backend is unavailable: {_unavailable}", allow_module_level=True)
from test_cpp_backend import step  # noqa: E402
from tvlars_fused import _cpp_backend  # noqa: E402

MARKER = _cpp_backend.NOT_CO_RESIDENT
# What the CUDA op raises (csrc/cuda_step.cu, launch), with the C++ context torch appends to a TORCH_CHECK.
REFUSAL = (f"{MARKER}: a grid of 396 blocks of 256 threads on CUDA device 0 (too many blocks in cooperative launch)"
           "\nException raised from launch at csrc/cuda_step.cu:520 (most recent call first):")


class RefusingOps:
    """Stands in for torch.ops.tvlars_fused: every op call raises ``make_error()``, and is counted."""

    def __init__(self, make_error):
        self.make_error = make_error
        self.calls = 0

    def __getattr__(self, name):
        def refuse(*args):
            self.calls += 1
            raise self.make_error()
        return refuse


@pytest.fixture
def refused(monkeypatch) -> RefusingOps:
    """Every op call is refused as not co-resident; no device has fallen back yet; the fallback is foreach (on the
    CPU the Triton interpreter might otherwise be chosen, whose bits differ from foreach's)."""
    ops = RefusingOps(lambda: RuntimeError(REFUSAL))
    monkeypatch.setattr(_cpp_backend, "_ops", ops)
    monkeypatch.setattr(_cpp_backend, "_fallbacks", {})
    monkeypatch.setattr(_cpp_backend, "_fallback_backend", lambda device: "foreach")
    return ops


def refusal_warnings(caught) -> list:
    return [w for w in caught if MARKER in str(w.message)]


@pytest.mark.parametrize("cls, kwargs", [(TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2))], ids=["tvlars", "lamb"])
def test_refused_launch_falls_back_once_with_a_warning(cls, kwargs, refused):
    """Three steps, the first refused: one warning that says what runs instead, the op never tried again, and the
    bits of backend="foreach" (the refused step included; a strided layer, which foreach steps before the op is
    tried, is stepped once)."""
    runs = []
    for backend in ("cpp", "foreach"):
        params = make_params(SHAPES)
        strided = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))[:, ::2]  # outside the table
        params.append(strided.requires_grad_())
        runs.append((params, cls(params, backend=backend, **kwargs)))
    (params, opt), (expected, ref) = runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            set_grads(params, k)
            set_grads(expected, k)
            opt.step()
            ref.step()
    refusals = refusal_warnings(caught)
    assert len(refusals) == 1, [str(w.message) for w in caught]
    assert refusals[0].category is RuntimeWarning
    assert str(refusals[0].message).startswith(REFUSAL.partition("\n")[0])
    assert "backend='foreach' from now on" in str(refusals[0].message)
    assert refused.calls == 1
    assert _cpp_backend._fallbacks == {torch.device("cpu"): "foreach"}
    assert [c["backend"] for c in opt.chosen_backends] == ["foreach"], "chosen_backends does not say what steps"
    assert_matches(params, expected, opt, ref, rtol=0, atol=0)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
def test_other_errors_propagate_unchanged(lamb, refused):
    """Any other error of the op is raised as it is: no fallback, no warning, nothing written."""
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    refused.make_error = lambda: error
    bucket = make_bucket(SHAPES, lamb=lamb)
    before = clone_bucket(bucket)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError) as info:
            step(bucket, lamb, _cpp_backend)
    assert info.value is error
    assert _cpp_backend._fallbacks == {}
    assert_buckets_equal(bucket, before)


@pytest.mark.parametrize("lamb", [False, True], ids=["tvlars", "lamb"])
@pytest.mark.parametrize("fallen_back", [False, True], ids=["first", "after-fallback"])
def test_sharded_bucket_raises_instead_of_falling_back(lamb, fallen_back, refused):
    """A sharded bucket is not moved to another backend on one rank (its all-reduce would not match the other
    ranks'), not even once its device has fallen back: the step raises, saying what to do, before any all-reduce
    and with nothing written."""
    if fallen_back:
        _cpp_backend._fallbacks[torch.device("cpu")] = "foreach"
    bucket = make_bucket(SHAPES, lamb=lamb)
    reduced = []
    bucket.reduce_sums = reduced.append
    before = clone_bucket(bucket)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=f"^{re.escape(MARKER)}.*sharded.*backend='triton'") as info:
            step(bucket, lamb, _cpp_backend)
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError) and refused.calls == 1
    assert reduced == []
    assert _cpp_backend._fallbacks == ({torch.device("cpu"): "foreach"} if fallen_back else {})
    assert_buckets_equal(bucket, before)


@pytest.mark.parametrize("triton_reason, expected", [(None, "triton"), ("no triton here", "foreach")])
def test_fallback_is_triton_where_it_runs_else_foreach(triton_reason, expected, monkeypatch):
    asked = []

    def unavailable_reason(backend, device):
        asked.append((backend, device))
        return triton_reason if backend == "triton" else None

    monkeypatch.setattr(_backends, "unavailable_reason", unavailable_reason)
    device = torch.device("cuda", 1)
    assert _cpp_backend._fallback_backend(device) == expected
    assert asked == [("triton", device)]


def test_the_kernel_raises_what_the_step_matches():
    """csrc/cuda_step.cu starts its error with the very marker the Python step matches (it cannot be raised
    without a GPU whose cooperative launches are limited, so the source is read)."""
    source = (_extension.CSRC / "cuda_step.cu").read_text()
    assert f'constexpr const char* kNotCoResident = "{MARKER}";' in source
    assert re.search(r"if \(err == cudaErrorCooperativeLaunchTooLarge\) \{[^}]*"
                     r"TORCH_CHECK\(false, kNotCoResident, ", source)
