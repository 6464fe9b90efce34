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

# bfloat16 state is checked on a few cases that cover its paths: momentum with Nesterov and norm clipping, LARC's
# clip with dampening, LAMB's variants (decoupled decay, no grad averaging, bounds) and its global clipping.
BF16_CASES = [case for case in CASES if case.name in ("tvlars-nesterov-clip", "lars-timm-trust-clip", "lamb-variants",
                                                      "lamb-max-grad-norm-exclude")]

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


def bf16_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a bfloat16 tensor, as int64 (negative for negative values)."""
    return t.contiguous().view(torch.int16).to(torch.int64)


def bf16_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 values lie between a and b, element-wise (+0 and -0 are the same point)."""
    def ordered(t):
        bits = bf16_bits(t)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def assert_bf16_states_agree(state, ref_state, *, max_fraction):
    """bfloat16 state of two backends: equal, except a fraction of at most ``max_fraction`` of the elements one ulp
    apart (where the float32 values before a stochastic rounding differed by an ulp and rounded the other way)."""
    total = differ = 0
    for s, r in zip(state, ref_state):
        distance = bf16_ulp_distance(s, r)
        if distance.numel():
            assert distance.max().item() <= 1, f"elements {distance.max().item()} ulps apart"
        total += distance.numel()
        differ += int((distance > 0).sum())
    assert differ <= max_fraction * total, f"{differ} of {total} elements differ"
    return differ, total


def _grads_in_layout(params, step):
    """set_grads, each gradient in its parameter's memory layout (as backward makes a channels_last weight's)."""
    set_grads(params, step)
    for p in params:
        p.grad = torch.empty_like(p).copy_(p.grad)


def lockstep(cls, kwargs, params, backend, *, steps=5, groups=None, tol=1e-6, max_fraction=1e-3) -> tuple[int, int]:
    """bfloat16 state (docs/algorithms.md, section 9): ``cls(params, backend=backend, **kwargs)`` and the reference
    stepped side by side, each step from the same state (the reference's copied into the backend's after each
    comparison; over free-running steps a one-ulp difference of a momentum would be carried into later, smaller
    values). ``groups``: how to split ``params`` into param groups (lists of indices), so that layer numbers are not
    0, 1, ... per group.

    Both draw the same random bits, so their stored state is bit-identical wherever their float32 values before the
    store are. Those can differ by a float32 ulp (other summation orders, expm1f against float64 powers), and a value
    can then round the other way: with probability 2**-16 for a stochastic rounding, only at a midpoint for a nearest
    one. So per step:

    - bfloat16 state: elements equal, or one bfloat16 ulp apart, or (a value that cancelled to far below its layer's
      magnitudes, where the float32 error spans several ulps of the small result) apart by no more than that error,
      F32 times the layer's largest magnitude entering the step (tests/stepwise.py); at most ``max_fraction`` of the
      elements differ over the run (1e-3: 65 times the flip rate if every element were a float32 ulp off); float32
      state within ``tol``;
    - weights (float32 parameters and masters, a Kahan pair param + comp) within ``tol * (1 + |w|)`` where the
      layer's state elements agree (the pair up to an ulp of its bfloat16 compensation, which a float32 ulp of
      difference can round the other way), bfloat16 parameters within one bfloat16 ulp.

    Returns (state elements that differ, state elements compared)."""
    from stepwise import F32, ulp

    ref_params = [p.detach().clone().requires_grad_() for p in params]  # clone keeps a channels_last layout

    def grouped(ps):
        return [dict(params=[ps[i] for i in g]) for g in groups] if groups else ps

    opt = cls(grouped(params), backend=backend, **kwargs)
    ref = cls(grouped(ref_params), backend="reference", **kwargs)
    differ = total = 0
    for step in range(steps):
        _grads_in_layout(params, step)
        _grads_in_layout(ref_params, step)
        before = [{key: value.clone() for key, value in ref.state[r].items()} for r in ref_params]
        opt.step()
        ref.step()
        for i, (p, r) in enumerate(zip(params, ref_params)):
            state, ref_state = opt.state[p], ref.state[r]
            assert state.keys() == ref_state.keys()
            assert torch.equal(state["step"], ref_state["step"])
            agree = torch.ones(p.shape, dtype=torch.bool, device=p.device)
            for key in cls._state_keys:
                s, s_ref = state[key], ref_state[key]
                assert s.dtype == kwargs.get("state_dtype", torch.float32) and s.stride() == s_ref.stride(), key
                if s.dtype != torch.bfloat16:
                    torch.testing.assert_close(s, s_ref, rtol=tol, atol=tol)
                    continue
                distance = bf16_ulp_distance(s, s_ref)
                if s.numel():  # more than an ulp only within the float32 error of a value that cancelled
                    old = before[i].get(key, torch.zeros_like(s)).double()
                    error = F32 * (s_ref.double().abs() + old.abs()).max()
                    far = (distance > 1) & ((s.double() - s_ref.double()).abs() > error)
                    assert not far.any(), f"step {step} layer {i} {key}: {s[far][:4].tolist()} against " \
                                          f"{s_ref[far][:4].tolist()}, {distance.max().item()} bfloat16 ulps apart"
                agree &= distance == 0
                differ, total = differ + int((distance > 0).sum()), total + distance.numel()
            if "master_weight" in ref_state:
                m, m_ref = state["master_weight"].double(), ref_state["master_weight"].double()
                bad = ((m - m_ref).abs() > tol * (1 + m_ref.abs())) & agree
                assert not bad.any(), f"step {step} layer {i}: master weights {m[bad][:4].tolist()} against " \
                                      f"{m_ref[bad][:4].tolist()}"
                assert torch.equal(p.detach(), state["master_weight"].to(p.dtype))  # one rounding from the master
            weight, ref_weight = p.detach().double(), r.detach().double()
            allowed = tol * (1 + ref_weight.abs())
            if "kahan_comp" in ref_state:  # the pair holds the weight to an ulp of its bfloat16 compensation
                comp, ref_comp = state["kahan_comp"].double(), ref_state["kahan_comp"].double()
                assert state["kahan_comp"].dtype == torch.bfloat16
                weight, ref_weight = weight + comp, ref_weight + ref_comp
                allowed = allowed + ulp(torch.maximum(comp.abs(), ref_comp.abs()), torch.bfloat16)
            elif p.dtype == torch.bfloat16:  # one rounding that a float32 ulp of difference can send the other way
                allowed = ulp(torch.maximum(weight.abs(), ref_weight.abs()), torch.bfloat16)
            bad = ((weight - ref_weight).abs() > allowed) & agree
            assert not bad.any(), f"step {step} layer {i}: weights {weight[bad][:4].tolist()} against " \
                                  f"{ref_weight[bad][:4].tolist()}"
            with torch.no_grad():  # the next step starts from the reference's state
                p.copy_(r)
                for key, value in ref_state.items():
                    state[key].copy_(value)
    assert differ <= max_fraction * total, f"{differ} of {total} state elements differ"
    return differ, total


def bf16_lockstep(case: Case, backend: str, options: dict, *, dtype=torch.float32, shapes=SMALL_SHAPES, steps=5,
                  device="cpu", tol=1e-6, max_fraction=1e-3) -> tuple[int, int]:
    """``lockstep`` of a case of the table with storage ``options`` on ``make_params(shapes, dtype, device)``, after
    checking that ``backend`` steps every bucket itself (not foreach)."""
    params = make_params(shapes, dtype, device)
    kwargs = {**case.kwargs, **options}
    chosen = case.cls(make_params(shapes[:1], dtype, device), backend=backend, **kwargs).chosen_backends
    assert {c["backend"] for c in chosen} == {backend}, chosen
    return lockstep(case.cls, kwargs, params, backend, steps=steps, tol=tol, max_fraction=max_fraction)
