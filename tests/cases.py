"""The parity table: every optimizer configuration, run by one generic runner against the reference.

A case is an optimizer class plus constructor arguments. ``run`` steps a fresh copy of a fixed set of layers
(mixed shapes, including the layers where a step goes wrong unnoticed: all-zero weights, zero gradient,
one element, excluded 1-D) with seeded random gradients and returns the parameters and optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tvlars_fused import LAMB, LARS, TVLARS, available_backends


@dataclass(frozen=True)
class Case:
    name: str
    cls: type
    kwargs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("tvlars", TVLARS, dict(lr=0.5)),
    Case("tvlars-official", TVLARS, dict(lr=0.5, alpha=0.1, delay=0, gamma_min=0.0, norm_clip=10.0)),
    Case("tvlars-delay-floor-sum", TVLARS, dict(lr=0.3, lmbda=0.05, alpha=1.0, delay=10, gamma_min=0.2,
                                                trust_denominator="sum_of_norms", eps=1e-8)),
    Case("tvlars-nesterov-clip", TVLARS, dict(lr=0.2, nesterov=True, norm_clip=0.5, lmbda=0.2)),
    Case("lars", LARS, dict(lr=0.5)),
    Case("lars-sum-of-norms", LARS, dict(lr=0.5, trust_denominator="sum_of_norms", weight_decay=1e-2)),
    Case("lars-nesterov-noexclude", LARS, dict(lr=0.5, nesterov=True, exclude=None, momentum=0.8)),
    Case("lars-clip-eps", LARS, dict(lr=0.5, norm_clip=1.0, eps=1e-3, weight_decay=0.0)),
    Case("lamb", LAMB, dict(lr=1e-2)),
    Case("lamb-no-bias-correction", LAMB, dict(lr=1e-2, bias_correction=False)),
    Case("lamb-official", LAMB, dict(lr=1e-2, bias_correction=False, norm_clip=10.0, eps=1e-6)),
    Case("lamb-max-grad-norm-exclude", LAMB, dict(lr=1e-2, max_grad_norm=0.5, exclude=lambda p: p.ndim <= 1,
                                                  weight_decay=0.1)),
    Case("lamb-no-clip", LAMB, dict(lr=1e-2, norm_clip=None, betas=(0.8, 0.99))),
    # The variants of docs/algorithms.md, section 8: peers' options, and split exclusions.
    Case("tvlars-dampening-bounds-split", TVLARS, dict(lr=0.3, dampening=0.3, min_trust_ratio=2e-3,
                                                       max_trust_ratio=4e-3, exclude=None,
                                                       exclude_from_weight_decay=lambda p: p.ndim <= 1,
                                                       exclude_from_adaptation=lambda p: p.numel() < 50)),
    Case("lars-timm-trust-clip", LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-3, eps=1e-8,
                                            trust_denominator="sum_of_norms", exclude=None, always_adapt=False,
                                            trust_clip=True, dampening=0.1)),
    Case("lars-no-decay-no-adapt", LARS, dict(lr=0.5, weight_decay=0.0, always_adapt=False)),
    Case("lamb-variants", LAMB, dict(lr=1e-2, grad_averaging=False, decoupled_decay=True, min_trust_ratio=0.5,
                                     max_trust_ratio=1.0, weight_decay=0.1,
                                     exclude_from_adaptation=lambda p: p.ndim <= 1)),
    Case("lamb-no-adapt-timm", LAMB, dict(lr=1e-2, weight_decay=0.0, always_adapt=False, norm_clip=None,
                                          max_grad_norm=1.0)),
]

# Shapes for the fused backends on the CPU (the Triton interpreter is slow: keep layers small).
SMALL_SHAPES = [(16, 8), (3, 3, 4, 4), (37,), (1,), (0,), (300, 7), (8,)]
SHAPES = SMALL_SHAPES + [(64, 3, 7, 7), (4097,), (256, 513)]
ZERO_WEIGHT_LAYER = 2  # index into the shapes above whose weights start at zero
ZERO_GRAD_LAYER = 5  # index whose gradient is always zero


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        w = torch.randn(shape, generator=gen) * (0.5 + i % 3)
        if i == ZERO_WEIGHT_LAYER:
            w.zero_()
        params.append(w.to(device=device, dtype=dtype).requires_grad_())
    return params


def set_grads(params, step, seed=0):
    gen = torch.Generator().manual_seed(1000 * seed + step + 1)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * (0.1 + (i % 4))
        if i == ZERO_GRAD_LAYER:
            g.zero_()
        p.grad = g.to(device=p.device, dtype=p.dtype)


def run(case: Case, backend: str, *, dtype=torch.float32, steps=20, shapes=SHAPES, device="cpu", seed=0,
        optimizer_kwargs=None):
    params = make_params(shapes, dtype, device, seed)
    opt = case.cls(params, backend=backend, **case.kwargs, **(optimizer_kwargs or {}))
    for step in range(steps):
        set_grads(params, step, seed)
        opt.step()
    return params, opt


def backend_or_skip(backend: str, device="cpu") -> None:
    import pytest

    reason = available_backends(device)[backend]
    if reason is not None:
        pytest.skip(f"{backend} unavailable: {reason}")


def assert_matches(params, ref_params, opt, ref_opt, *, rtol, atol):
    """Elementwise |x - ref| <= atol + rtol * |ref| for the parameters and every state tensor."""
    for i, (p, r) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p.detach().float(), r.detach().float(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"parameter {i} ({tuple(p.shape)}): {m}")
        state, ref_state = opt.state[p], ref_opt.state[r]
        assert state.keys() == ref_state.keys()
        for key in ref_state:
            torch.testing.assert_close(state[key].float(), ref_state[key].float(), rtol=rtol, atol=atol,
                                       msg=lambda m: f"state {key!r} of parameter {i}: {m}")
