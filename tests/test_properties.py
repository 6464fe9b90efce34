"""Property-based: random shapes and hyper-parameters, every available backend against the reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import backend_or_skip
from tvlars_fused import LAMB, LARS, TVLARS

shapes = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)

lars_hp = st.fixed_dictionaries({
    "lr": st.floats(0.0, 2.0), "momentum": st.floats(0.0, 0.99), "weight_decay": st.floats(0.0, 0.1),
    "eta": st.floats(1e-4, 1.0), "eps": st.sampled_from([0.0, 1e-8, 1e-3]),
    "norm_clip": st.sampled_from([None, 0.5, 10.0]),
    "trust_denominator": st.sampled_from(["norm_of_sum", "sum_of_norms"]),
})
tvlars_hp = st.fixed_dictionaries({
    "lmbda": st.floats(0.0, 5.0), "alpha": st.floats(0.05, 2.0), "delay": st.integers(0, 5),
    "gamma_min": st.floats(0.0, 1.0)})
lamb_hp = st.fixed_dictionaries({
    "lr": st.floats(0.0, 0.1), "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    "eps": st.sampled_from([1e-8, 1e-6, 1e-3]), "weight_decay": st.floats(0.0, 0.1),
    "bias_correction": st.booleans(), "norm_clip": st.sampled_from([None, 1.0, 10.0]),
    "max_grad_norm": st.sampled_from([None, 0.1, 5.0]),
})
optimizers = st.one_of(
    lars_hp.map(lambda hp: (LARS, hp)),
    st.tuples(lars_hp, tvlars_hp).map(lambda two: (TVLARS, {**two[0], **two[1]})),
    lamb_hp.map(lambda hp: (LAMB, hp)),
)


def _steps(cls, hp, layer_shapes, seed, backend, steps=3):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in layer_shapes]
    opt = cls(params, backend=backend, **hp)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params


@pytest.mark.parametrize("backend", ["foreach", "cpp", "triton"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(optimizer=optimizers, layer_shapes=shapes, seed=st.integers(0, 2**16), nesterov=st.booleans())
def test_random_configs_match_reference(backend, optimizer, layer_shapes, seed, nesterov):
    backend_or_skip(backend)
    cls, hp = optimizer
    if cls is not LAMB:
        hp = {**hp, "nesterov": nesterov and hp["momentum"] > 0}
    got = _steps(cls, hp, layer_shapes, seed, backend)
    want = _steps(cls, hp, layer_shapes, seed, "reference")
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
