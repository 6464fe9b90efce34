"""Small cases computed by hand from the spec, and the case table against an independent NumPy reading.

Every available backend runs each case, so the fused kernels are checked on the same hand numbers.
"""

import math

import numpy as np
import pytest
import torch

import spec_numpy
from cases import (CASES, SMALL_SHAPES, ZERO_GRAD_LAYER, ZERO_WEIGHT_LAYER, backend_or_skip, make_params, run,
                   set_grads)
from tvlars_fused import LAMB, LARS, TVLARS, phi

ALL_BACKENDS = ["reference", "foreach", "cpp", "triton"]


def test_phi_hand_values():
    # Authors' defaults: phi(1) = 1 / (0.1 + e^0.001) ~ 0.909, decaying towards 0.
    assert phi(1, 1e-3) == pytest.approx(1 / (0.1 + math.exp(1e-3)), rel=1e-15)
    assert phi(1, 1e-3) == pytest.approx(0.908265, abs=1e-6)  # 1 / 1.1010005
    # At t == delay the exponential is 1.
    assert phi(50, 0.3, alpha=1.0, delay=50, gamma_min=0.25) == pytest.approx(0.5 + 0.25, rel=1e-15)
    # Overflow of exp gives gamma_min, never NaN.
    assert phi(10**9, 5.0, alpha=0.1, gamma_min=0.05) == 0.05
    assert phi(10**9, 5.0) == 0.0
    values = [phi(t, 0.01, alpha=0.1, delay=100) for t in range(1, 1000, 50)]
    assert all(a > b for a, b in zip(values, values[1:]))


def _one_step(cls, backend, w, g, **kwargs):
    p = torch.tensor(w, dtype=torch.float32).requires_grad_()
    opt = cls([p], backend=backend, **kwargs)
    p.grad = torch.tensor(g, dtype=torch.float32)
    opt.step()
    return p.detach().double(), opt.state[p]


# (name, optimizer, kwargs, w, g, expected new w) - expectations written out from the spec's formulas.
W, G = [[3.0, 4.0]], [[1.0, 0.0]]  # ||w|| = 5, ||g|| = 1
HAND_CASES = [
    # d = g + 0.1 w = [1.3, 0.4]; q = eta * ||w|| / ||d|| ; w - lr * q * d (first momentum step: buf = u)
    ("lars-norm-of-sum", LARS, dict(lr=0.1, weight_decay=0.1, eta=0.02),
     W, G, [[3 - 0.1 * (0.02 * 5 / math.sqrt(1.85)) * 1.3, 4 - 0.1 * (0.02 * 5 / math.sqrt(1.85)) * 0.4]]),
    # sum of norms: q = eta * 5 / (1 + 0.1 * 5)
    ("lars-sum-of-norms", LARS, dict(lr=0.1, weight_decay=0.1, eta=0.02, trust_denominator="sum_of_norms"),
     W, G, [[3 - 0.1 * (0.02 * 5 / 1.5) * 1.3, 4 - 0.1 * (0.02 * 5 / 1.5) * 0.4]]),
    # norm_clip 2: ||w|| -> 2, ||d|| = 1.36 stays; q = eta * 2 / sqrt(1.85)
    ("lars-norm-clip", LARS, dict(lr=0.1, weight_decay=0.1, eta=0.02, norm_clip=2.0),
     W, G, [[3 - 0.1 * (0.04 / math.sqrt(1.85)) * 1.3, 4 - 0.1 * (0.04 / math.sqrt(1.85)) * 0.4]]),
    # nesterov first step: buf = u, direction = u + mu * u = 1.9 u
    ("lars-nesterov", LARS, dict(lr=0.1, weight_decay=0.1, eta=0.02, nesterov=True),
     W, G, [[3 - 0.19 * (0.02 * 5 / math.sqrt(1.85)) * 1.3, 4 - 0.19 * (0.02 * 5 / math.sqrt(1.85)) * 0.4]]),
    # zero weights: q = 1, d = g
    ("lars-zero-weight", LARS, dict(lr=0.1, weight_decay=0.1, eta=0.02), [[0.0, 0.0]], G, [[-0.1, 0.0]]),
    # zero gradient and no decay: ||d|| = 0 -> q = 1, u = 0
    ("lars-zero-grad", LARS, dict(lr=0.1, weight_decay=0.0, eta=0.02), W, [[0.0, 0.0]], W),
    # excluded 1-D layer: plain momentum SGD, no decay
    ("lars-excluded", LARS, dict(lr=0.1, weight_decay=0.1, eta=0.02), [3.0, 4.0], [1.0, 0.0], [2.9, 4.0]),
    # TVLARS at t=1: q = eta * phi(1) * 5 / sqrt(1.85), phi(1) = 1 / (0.1 + e^0.001)
    ("tvlars-phi", TVLARS, dict(lr=0.1, weight_decay=0.1, eta=0.02, lmbda=1e-3),
     W, G, [[3 - 0.1 * 0.02 * 5 / math.sqrt(1.85) / (0.1 + math.exp(1e-3)) * 1.3,
             4 - 0.1 * 0.02 * 5 / math.sqrt(1.85) / (0.1 + math.exp(1e-3)) * 0.4]]),
    # LAMB with bias correction, step 1: m_hat = g, v_hat = g^2, u = g / (|g| + eps) + wd w.
    # g = [1, -2]: u = [1/(1+eps) + .03, -2/(2+eps) + .04]; q = min(5, 10) / ||u||.
    ("lamb-bias-correction", LAMB, dict(lr=0.1, weight_decay=0.01, eps=1e-6),
     W, [[1.0, -2.0]], None),
    # LAMB without bias correction: m = 0.1 g, v = 0.001 g^2, u = 0.1 g / (sqrt(0.001) |g| + eps) + wd w
    ("lamb-no-bias-correction", LAMB, dict(lr=0.1, weight_decay=0.01, eps=1e-6, bias_correction=False),
     W, [[1.0, -2.0]], None),
    # norm_clip 1 on ||w|| = 5 and wd 0: u = [1, -1] (up to eps), q = 1 / sqrt(2)
    ("lamb-norm-clip", LAMB, dict(lr=0.1, weight_decay=0.0, eps=1e-12, norm_clip=1.0),
     W, [[1.0, -2.0]], [[3 - 0.1 / math.sqrt(2), 4 + 0.1 / math.sqrt(2)]]),
    # Variants (section 8). No weight decay but adapted: d = g, so ||d|| = ||g|| = 1 and q = 0.02 * 5 / 1 (the
    # denominator's sums must be taken over g, not g + beta * w, and taken at all).
    ("lars-no-decay-adapted", LARS, dict(lr=0.1, weight_decay=0.1, eta=0.02, exclude=None,
                                         exclude_from_weight_decay=lambda p: True), W, G, [[2.99, 4.0]]),
    # the same with the sum of norms: D = ||g|| + beta' * ||w|| with beta' = 0
    ("lars-no-decay-adapted-sum", LARS, dict(lr=0.1, weight_decay=0.1, eta=0.02, exclude=None,
                                             exclude_from_weight_decay=lambda p: True,
                                             trust_denominator="sum_of_norms"), W, G, [[2.99, 4.0]]),
    # LARC's clip on the zero-norm branch: ||g|| = 0 (sum of norms) gives q = 1, clipped to 1 / lr = 0.5 as lr = 2
    # exceeds it; d = beta * w = [0.3, 0.4], w - 2 * 0.5 * d
    ("lars-trust-clip-zero-grad", LARS, dict(lr=2.0, weight_decay=0.1, eta=0.02, trust_clip=True,
                                             trust_denominator="sum_of_norms"), W, [[0.0, 0.0]], [[2.7, 3.6]]),
    # decoupled decay: w *= 1 - 0.5 * 1.0 first, so ||w|| = 2.5; u = g / |g| = [1, -1] (up to eps), q = 2.5 / sqrt(2)
    ("lamb-decoupled-decay", LAMB, dict(lr=0.5, weight_decay=1.0, eps=1e-12, decoupled_decay=True),
     W, [[1.0, -2.0]], [[1.5 - 0.5 * 2.5 / math.sqrt(2), 2 + 0.5 * 2.5 / math.sqrt(2)]]),
]


def _lamb_expected(w, g, lr, weight_decay, eps, bias_correction):
    w, g = np.array(w[0]), np.array(g[0])
    if bias_correction:
        u = g / (np.abs(g) + eps) + weight_decay * w
    else:
        u = 0.1 * g / (math.sqrt(0.001) * np.abs(g) + eps) + weight_decay * w
    q = min(np.linalg.norm(w), 10.0) / np.linalg.norm(u)
    return [list(w - lr * q * u)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name,cls,kwargs,w,g,expected", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_hand_computed_step(name, cls, kwargs, w, g, expected, backend):
    backend_or_skip(backend)
    if expected is None:
        expected = _lamb_expected(w, g, kwargs["lr"], kwargs["weight_decay"], kwargs["eps"],
                                  kwargs.get("bias_correction", True))
    new_w, state = _one_step(cls, backend, w, g, **kwargs)
    torch.testing.assert_close(new_w, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert state["step"].item() == 1.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_lamb_max_grad_norm_hand(backend):
    backend_or_skip(backend)
    # Two layers, global ||g|| = ||[3, 4]|| = 5 clipped to 1: g becomes [0.6], [0.8]. With bias correction
    # and 0 decay, u = sign(g) (up to eps); one-element layers have ||u|| = 1 and q = |w| / 1.
    a = torch.tensor([[2.0]], requires_grad=True)
    b = torch.tensor([[-1.0]], requires_grad=True)
    opt = LAMB([a, b], lr=0.1, weight_decay=0.0, eps=1e-12, max_grad_norm=1.0, backend=backend)
    a.grad, b.grad = torch.tensor([[3.0]]), torch.tensor([[4.0]])
    opt.step()
    assert a.item() == pytest.approx(2 - 0.1 * 2, rel=1e-6)
    assert b.item() == pytest.approx(-1 - 0.1 * 1, rel=1e-6)


def _spec_kwargs(case):
    kwargs = dict(case.kwargs)
    if case.cls in (LARS, TVLARS):
        defaults = dict(momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0, norm_clip=None,
                        trust_denominator="norm_of_sum", nesterov=False)
        tv = dict(lmbda=1e-3, alpha=0.1, delay=0, gamma_min=0.0)
        merged = {**defaults, **({**tv} if case.cls is TVLARS else {}), **kwargs}
        merged.pop("exclude", None)
        phi_args = {k: merged.pop(k) for k in tv if k in merged} if case.cls is TVLARS else None
        return spec_numpy.lars_family, merged, phi_args, kwargs.get("exclude", "1d")
    merged = dict(kwargs)
    merged.pop("exclude", None)
    return spec_numpy.lamb, merged, None, kwargs.get("exclude", None)


def numpy_expected(case, steps):
    """The float64 NumPy reading of the spec (tests/spec_numpy.py) for ``case`` over SMALL_SHAPES, fed the very
    starting weights and gradients that ``cases.run`` uses (both are drawn on the CPU)."""
    fn, kwargs, phi_args, exclude = _spec_kwargs(case)
    probe = make_params(SMALL_SHAPES)
    for key, column in (("exclude_from_weight_decay", "no_decay"), ("exclude_from_adaptation", "no_adapt")):
        predicate = kwargs.pop(key, None)
        if predicate is not None:
            kwargs[column] = [bool(predicate(p)) for p in probe]
    start = [p.detach().double().numpy() for p in make_params(SMALL_SHAPES)]
    probe = make_params(SMALL_SHAPES)
    grads = []
    for step in range(steps):
        set_grads(probe, step)
        grads.append([p.grad.double().numpy() for p in probe])
    if exclude == "1d":
        excluded = [w.ndim <= 1 for w in start]
    elif exclude is None:
        excluded = None
    else:
        excluded = [bool(exclude(p)) for p in probe]
    if phi_args is not None:
        kwargs["phi"] = phi_args
    return fn(start, grads, excluded=excluded, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("backend", ["reference", "foreach", "cpp"])
def test_case_table_matches_independent_numpy_reading(case, backend):
    backend_or_skip(backend)
    steps = 10
    params, _ = run(case, backend, shapes=SMALL_SHAPES, steps=steps)
    for i, (p, e) in enumerate(zip(params, numpy_expected(case, steps))):
        np.testing.assert_allclose(p.detach().double().numpy(), e, rtol=1e-5, atol=1e-6,
                                   err_msg=f"layer {i} {tuple(p.shape)}")
    # The inputs include the zero-norm layers the q = 1 branch is for.
    probe = make_params(SMALL_SHAPES)
    set_grads(probe, 0)
    assert float(probe[ZERO_WEIGHT_LAYER].detach().abs().max()) == 0.0
    assert float(probe[ZERO_GRAD_LAYER].grad.abs().max()) == 0.0
