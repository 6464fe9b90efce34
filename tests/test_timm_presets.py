"""``LARS.timm`` and ``LAMB.timm`` against timm 1.0's ``Lars`` and ``Lamb`` themselves, step by step.

timm's factory style: decayed weights in one group, biases and norm weights in a no-decay group (which timm adapts only
with ``always_adapt``). The layers include an all-zero weight and an always-zero gradient, so every branch of timm's
trust ratio is taken. float64 checks the math (timm then computes in float64 too; only the order of a few operations
differs), float32 every backend's rounding.
"""

import pytest
import torch

from cases import SMALL_SHAPES, ZERO_GRAD_LAYER, ZERO_WEIGHT_LAYER, backend_or_skip, make_params, set_grads
from tvlars_fused import LAMB, LARS

timm_optim = pytest.importorskip("timm.optim", reason="timm is not installed (pip install timm)")

BACKENDS = ["reference", "foreach", "cpp", "triton"]
STEPS = 8
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}

LARS_CONFIGS = {
    "defaults": dict(lr=0.5),  # momentum 0, no weight decay: no layer adapted
    "momentum-decay": dict(lr=0.5, momentum=0.9, weight_decay=1e-3),
    "nesterov": dict(lr=0.3, momentum=0.9, weight_decay=1e-3, nesterov=True, trust_coeff=1e-2),
    "dampening-always-adapt": dict(lr=0.5, momentum=0.8, dampening=0.2, always_adapt=True),
    "trust-clip": dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_clip=True, trust_coeff=0.5),
}
LAMB_CONFIGS = {
    "defaults": dict(lr=1e-2),
    "trust-clip": dict(lr=1e-2, trust_clip=True, weight_decay=0.1),
    "always-adapt-no-clip": dict(lr=1e-2, always_adapt=True, max_grad_norm=None),
    "decoupled": dict(lr=1e-2, decoupled_decay=True, weight_decay=0.1),
    "no-grad-averaging": dict(lr=1e-2, grad_averaging=False, betas=(0.8, 0.99)),
}


def _groups(params, weight_decay):
    """timm's param_groups_weight_decay: 1-D parameters (and the zero-weight layer) in a group without decay."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _run(make, dtype, weight_decay):
    params = make_params(SMALL_SHAPES, dtype, seed=5)
    opt = make(_groups(params, weight_decay))
    for step in range(STEPS):
        set_grads(params, step, seed=5)
        opt.step()
    return params


def _assert_close(ours, theirs, dtype):
    tol = TOLERANCE[dtype]
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol,
                                   msg=lambda m: f"layer {i} {tuple(p.shape)}: {m}")


def _check_inputs():
    probe = make_params(SMALL_SHAPES, seed=5)
    set_grads(probe, 0, seed=5)
    assert float(probe[ZERO_WEIGHT_LAYER].detach().abs().max()) == 0 and float(probe[ZERO_GRAD_LAYER].grad.abs().max()) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", LARS_CONFIGS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lars_timm_preset_steps_as_timm_lars(backend, config, dtype):
    backend_or_skip(backend)
    _check_inputs()
    kwargs = dict(LARS_CONFIGS[config])
    weight_decay = kwargs.pop("weight_decay", 0.0)
    ours = _run(lambda groups: LARS.timm(groups, backend=backend, weight_decay=weight_decay, **kwargs), dtype,
                weight_decay)
    theirs = _run(lambda groups: timm_optim.Lars(groups, foreach=False, weight_decay=weight_decay, **kwargs), dtype,
                  weight_decay)
    _assert_close(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", LAMB_CONFIGS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lamb_timm_preset_steps_as_timm_lamb(backend, config, dtype):
    backend_or_skip(backend)
    _check_inputs()
    kwargs = dict(LAMB_CONFIGS[config])
    weight_decay = kwargs.pop("weight_decay", 0.01)
    ours = _run(lambda groups: LAMB.timm(groups, backend=backend, weight_decay=weight_decay, **kwargs), dtype,
                weight_decay)
    theirs = _run(lambda groups: timm_optim.Lamb(groups, foreach=False, weight_decay=weight_decay, **kwargs), dtype,
                  weight_decay)
    _assert_close(ours, theirs, dtype)


def test_presets_refuse_what_they_do_not_know():
    params = make_params([(2, 2)])
    with pytest.raises(TypeError, match="caution"):
        LAMB.timm(params, caution=True)
    with pytest.raises(TypeError, match="foreach"):
        LARS.timm(params, foreach=False)
