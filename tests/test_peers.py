"""Cross-check against an independent public implementation (timm's Lars and Lamb), configured to our math.

timm's Lars is the original paper's LARS (sum of norms, no exclusion, trust ratio on every layer); timm's
Lamb with trust_clip off is LAMB without the weight-norm clip. A misreading of the spec that all our
backends shared would show up here.
"""

import pytest
import torch

from cases import backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, LARS

timm_optim = pytest.importorskip("timm.optim", reason="timm is not installed (pip install timm)")
SHAPES = [(16, 8), (3, 3, 4, 4), (37,), (300, 7), (1,)]


def _train(make_opt, steps=15):
    params = make_params(SHAPES, seed=3)
    opt = make_opt(params)
    for step in range(steps):
        set_grads(params, step, seed=3)
        opt.step()
    return params


@pytest.mark.parametrize("backend", ["reference", "foreach", "cpp", "triton"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_timm(backend, nesterov):
    backend_or_skip(backend)
    ours = _train(lambda ps: LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-3, eta=1e-2, eps=1e-8,
                                  trust_denominator="sum_of_norms", nesterov=nesterov, exclude=None,
                                  backend=backend))
    theirs = _train(lambda ps: timm_optim.Lars(ps, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coeff=1e-2,
                                               eps=1e-8, nesterov=nesterov, foreach=False))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "foreach", "cpp", "triton"])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_lamb_matches_timm(backend, bias_correction, max_grad_norm):
    backend_or_skip(backend)
    ours = _train(lambda ps: LAMB(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01,
                                  bias_correction=bias_correction, norm_clip=None, max_grad_norm=max_grad_norm,
                                  backend=backend))
    theirs = _train(lambda ps: timm_optim.Lamb(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01,
                                               bias_correction=bias_correction, max_grad_norm=max_grad_norm,
                                               foreach=False))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
