"""Norms at the edges of float32's range: every backend accumulates sums of squares in float64.

Finite float32 weights of size ~1e20 have squares (~1e40) beyond float32's largest value (3.4e38), so a float32
sum of squares is inf and the trust ratio inf/inf or x/inf; weights of ~1e-25 have squares (~1e-50) below its
smallest (2^-149), so a float32 sum is 0 and the layer wrongly takes the ``q = 1`` branch. Each step is compared
with the reference from the same state (tests/stepwise.py: ulp/2 + float32 error), which computes the norms
from float64 sums of squares.
"""

import pytest
import torch

import stepwise
from cases import CASES, backend_or_skip

BACKENDS = ["reference", "foreach", "cpp", "triton"]
HUGE, TINY = 0, 1  # layer indices
SHAPES = [(64, 32), (64, 32), (16, 8), (37,)]
SCALES = [1e20, 1e-25, 1.0, 1.0]


def _params():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(s, generator=gen) * scale).requires_grad_() for s, scale in zip(SHAPES, SCALES)]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_the_layers_are_out_of_float32_range():
    params = _params()
    assert all(torch.isfinite(p).all() for p in params)
    assert torch.isinf(params[HUGE].square().sum())  # a float32 sum of squares overflows
    assert params[TINY].double().square().sum() < 2.0 ** -126  # below float32's smallest normal
    assert params[TINY].square().sum() == 0  # a float32 sum of squares flushes to zero


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_and_tiny_weights_match_the_reference(case, backend):
    """Fails wherever a backend sums squares in float32: the huge layer becomes -inf or NaN, the tiny one
    takes the q = 1 branch and moves by lr * g instead of ~1e-28."""
    backend_or_skip(backend)
    params = _params()
    tiny_before = params[TINY].detach().clone()
    problems = stepwise.run_mismatches(case.cls, case.kwargs, params, backend, _grads, 2)
    assert not problems, "\n".join(problems[:10])
    assert all(torch.isfinite(p).all() for p in params)
    # The trust-ratio branch: q ~ ||w|| / ||g|| scales the tiny layer's steps down to about its own size, where
    # q = 1 would move it by lr * |g|, about 1e-2 or more. (Not for the variants that bound q from below or adapt
    # no layer: they move it on purpose, and the stepwise comparison above checks them.)
    kwargs = case.kwargs
    if kwargs.get("min_trust_ratio") is None and kwargs.get("always_adapt", True):
        assert (params[TINY].detach() - tiny_before).abs().max() < 1e-20


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("tvlars", "lamb-no-clip")], ids=repr)
def test_float32_sums_of_squares_fail_the_comparison(case, monkeypatch):
    """foreach with its norms summed in float32: the test above must see it, in both layers. (LAMB with
    norm_clip=10 cannot show it in the huge layer: q = 10 / inf = 0 instead of ~1e-19 moves a 1e20 weight by
    less than one ulp.)"""
    from tvlars_fused import _foreach

    def float32_norms(bucket, *layer_lists):
        return tuple(torch.stack([torch.stack([t.float().square().sum().sqrt() for t in tensors])
                                  for tensors in layer_lists]).unbind(0))

    monkeypatch.setattr(_foreach, "_layer_norms", float32_norms)
    problems = stepwise.run_mismatches(case.cls, case.kwargs, _params(), "foreach", _grads, 2)
    assert any(m.startswith(f"step 1: parameter {HUGE} ") for m in problems), problems
    assert any(m.startswith(f"step 1: parameter {TINY} ") for m in problems), problems
