"""float64 parameters are stepped in float64 throughout, on every backend (docs/algorithms.md, section 1).

The kernels compute in float32, so the fused backends hand float64 buckets to foreach; what must stay float64 is
everything a step derives besides the norms: TVLARS's phi, LAMB's bias corrections (from the float32 step count)
and LAMB's ``max_grad_norm`` clip coefficient. Each of them in float32 is a relative error of order 1e-8 in the
step (measured before they were float64: 5e-8 for phi and the bias corrections, 1e-8 for the clip coefficient),
10^4 times the 1e-12 allowed here, which leaves room only for float64 summation orders over ten steps.
"""

import numpy as np
import pytest
import torch

from cases import CASES, SMALL_SHAPES, backend_or_skip, make_params, run, set_grads
from test_spec_cases import numpy_expected
from tvlars_fused import LAMB, LARS

BACKENDS = ["reference", "foreach", "cpp", "triton"]
STEPS = 10
RTOL = 1e-12  # relative to the layer's largest value: an element near 0 after the update keeps the layer's error


def _relative_errors(got, expected):
    """Per layer, max |got - expected| / max |expected| (0 for an empty layer)."""
    errors = []
    for g, e in zip(got, expected):
        scale = float(np.abs(e).max()) if e.size else 0.0
        errors.append(float(np.abs(g - e).max()) / scale if scale > 0 else float(np.abs(g - e).max(initial=0.0)))
    return errors


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_parameters_match_the_float64_numpy_reading(case, backend):
    """Against tests/spec_numpy.py, which shares no code with the package, over the case table (phi, bias
    correction on and off, max_grad_norm, the zero-norm layers)."""
    backend_or_skip(backend)
    params, _ = run(case, backend, dtype=torch.float64, shapes=SMALL_SHAPES, steps=STEPS)
    assert all(p.dtype == torch.float64 for p in params)
    errors = _relative_errors([p.detach().numpy() for p in params], numpy_expected(case, STEPS))
    assert max(errors) <= RTOL, f"relative error per layer {['%.1e' % e for e in errors]}"


def _timm_run(make_opt, steps=STEPS):
    params = make_params(SMALL_SHAPES, torch.float64, seed=3)
    opt = make_opt(params)
    for step in range(steps):
        set_grads(params, step, seed=3)
        opt.step()
    return [p.detach().numpy() for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_float64_lamb_matches_timm(backend, max_grad_norm):
    """timm's Lamb computes in the parameters' dtype: with float64 parameters it is a float64 LAMB too."""
    timm_optim = pytest.importorskip("timm.optim", reason="timm is not installed (pip install timm)")
    backend_or_skip(backend)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, max_grad_norm=max_grad_norm)
    ours = _timm_run(lambda ps: LAMB(ps, norm_clip=None, backend=backend, **kwargs))
    theirs = _timm_run(lambda ps: timm_optim.Lamb(ps, foreach=False, **kwargs))
    errors = _relative_errors(ours, theirs)
    assert max(errors) <= RTOL, f"relative error per layer {['%.1e' % e for e in errors]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_lars_matches_timm(backend):
    timm_optim = pytest.importorskip("timm.optim", reason="timm is not installed (pip install timm)")
    backend_or_skip(backend)
    ours = _timm_run(lambda ps: LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-3, eta=1e-2, eps=1e-8,
                                     trust_denominator="sum_of_norms", exclude=None, backend=backend))
    theirs = _timm_run(lambda ps: timm_optim.Lars(ps, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coeff=1e-2,
                                                  eps=1e-8, foreach=False))
    errors = _relative_errors(ours, theirs)
    assert max(errors) <= RTOL, f"relative error per layer {['%.1e' % e for e in errors]}"
