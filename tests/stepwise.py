"""One step at a time against the reference, with a tolerance derived from one rounding.

Before each step of the optimizer under test, the reference backend is given the same state: float32 copies
of the parameters (exact: bfloat16/float16 values are float32 values), the same gradients, the same state
tensors. Its float32 result ``r`` is the spec's value before the one rounding to the storage dtype that every
backend ends a step with (the reference itself stores ``r`` rounded once). A backend computes ``x32 = r + e``
in float32, where ``e`` is float32 arithmetic error (other summation orders, fused multiply-adds), then rounds
once to the storage dtype, which moves it by at most half a unit in the last place (ulp). So element-wise:

    |x - r| <= ulp(x, r) / 2 + F32 * (|w| + max |r - w|)        (w: the parameter before the step)

where ``ulp`` is the spacing of the storage dtype at max(|x|, |r|) and the F32 term bounds ``e``: ``r`` is ``w``
minus a step, each known to a few float32 roundings (F32 = 2**-20, 8 float32 epsilons). The step's error is
taken relative to the layer's largest step (max over the layer), because an element's step can cancel (``g``
against ``weight_decay * w``) while its rounding errors stay those of the terms. The float32 state (momentum,
moments) is never rounded to the storage dtype, so it must agree to float32 accuracy relative to the layer, for
the same reason: |s - s_ref| <= F32 * max(|s_ref| + |s_before|) over the layer; the step counts must be equal.

A change of 1 % in a hyper-parameter is far outside this. For TVLARS and LARS, a 1 % error in ``eta`` (or in the
trust ratio however caused) changes the momentum buffer ``mu * buf + q * d`` by 1 % of ``q * |d|``: 10^4 times
F32 relative. For LAMB the moments do not depend on ``lr`` or ``weight_decay``, so only the parameters show an
error in them: a 1 % error in ``lr`` moves ``x32`` by 1 % of the step ``lr * q * u`` (per element about
``lr * |w|``, 10^-4 |w| at lr = 1e-2), which pushes every element whose ``r`` lies within that distance of a
rounding midpoint to the other neighbour, more than ulp/2 + e from ``r``: a fraction ~ 10^-4 |w| / ulp of the
elements (measured, the test layers of tests/cases.py at lr = 1e-2, first step: 46 of 2418 elements in bfloat16,
156 in float16). ``test_low_precision.py::test_a_one_percent_error_fails_the_comparison`` keeps checking this.

Multi-step runs need no tolerance of their own: every step starts the reference from the backend's state.
"""

from __future__ import annotations

import torch

from tvlars_fused import LAMB

F32 = 2.0 ** -20  # float32 arithmetic error of one step, relative to the magnitudes that enter it
# Significand bits (with the implicit one) and the smallest normal exponent of each storage dtype.
_PRECISION = {torch.bfloat16: (8, -126), torch.float16: (11, -14), torch.float32: (24, -126),
              torch.float64: (53, -1022)}


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each ``magnitude`` (float64 tensor, >= 0): 2^(e - p) for values in
    [2^(e-1), 2^e), the subnormal spacing below the smallest normal (and at 0)."""
    bits, min_exp = _PRECISION[dtype]
    _, exponent = torch.frexp(magnitude)
    exponent = torch.where(magnitude == 0, min_exp + 1, exponent.clamp(min=min_exp + 1))
    return torch.ldexp(torch.ones_like(magnitude), exponent - bits)


def _reference_of(cls, kwargs, opt, params, grad_scale):
    """A reference optimizer with the hyper-parameters ``kwargs`` (the truth, whatever ``opt`` was given) on
    float32 copies of ``params`` (float64 ones stay float64) holding ``opt``'s state and the same gradients
    divided by ``grad_scale`` (a power of two: exact)."""
    if opt.master_weights:
        raise ValueError("stepwise compares parameters stepped in place; master weights are not modelled")
    copies = []
    for p in params:
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        c = p.detach().to(dtype, copy=True).requires_grad_()
        c.grad = None if p.grad is None else p.grad.to(dtype, copy=True) / grad_scale
        copies.append(c)
    ref = cls(copies, backend="reference", **kwargs)
    for p, c in zip(params, copies):
        if p in opt.state:
            ref.state[c] = {k: v.clone() for k, v in opt.state[p].items()}
    return ref, copies


def _check_param(name, x, w, r):
    """Mismatch message for one parameter, or None (x: after the step in its dtype; w: before; r: reference)."""
    x64, w64, r64 = x.detach().double(), w.double(), r.detach().double()
    step_size = (r64 - w64).abs().max() if r64.numel() else 0.0
    bound = ulp(torch.maximum(x64.abs(), r64.abs()), x.dtype) / 2 + F32 * (w64.abs() + step_size)
    excess = (x64 - r64).abs() - bound
    if x64.isnan().any() or bool((excess > 0).any()):
        i = int(torch.nan_to_num(excess, nan=float("inf")).flatten().argmax())
        return (f"{name} ({x.dtype}, {tuple(x.shape)}): {int((~(excess <= 0)).sum())} of {x.numel()} elements "
                f"off by more than ulp/2 + float32 error; worst at flat index {i}: got "
                f"{x64.flatten()[i].item()!r}, reference {r64.flatten()[i].item()!r} (before: "
                f"{w64.flatten()[i].item()!r}), bound {bound.flatten()[i].item():.3g}")
    return None


def _check_state(name, key, s, s_ref, s_before):
    if key == "step":
        return None if torch.equal(s, s_ref) else f"{name} step count {s.item()} != reference {s_ref.item()}"
    s64, ref64 = s.double(), s_ref.double()
    bound = F32 * (ref64.abs() + s_before.double().abs()).max() if s.numel() else 0.0
    excess = (s64 - ref64).abs() - bound
    if bool((~(excess <= 0)).any()):
        i = int(torch.nan_to_num(excess, nan=float("inf")).flatten().argmax())
        return (f"{name} state {key!r}: {int((~(excess <= 0)).sum())} of {s.numel()} elements off by more than "
                f"float32 error; worst: {s64.flatten()[i].item()!r} vs reference {ref64.flatten()[i].item()!r}")
    return None


def step_mismatches(cls, kwargs, opt, params, step=None, grad_scale=1.0) -> list[str]:
    """Step ``opt`` once (``step`` or ``opt.step``) and the reference (``cls(**kwargs)``) once from the same
    state; what differs by more than the bounds of the module docstring (an empty list when nothing does).
    ``grad_scale``: the gradients are scaled by it (GradScaler) and ``step`` unscales them."""
    ref, copies = _reference_of(cls, kwargs, opt, params, grad_scale)
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else {} for p in params]
    ref.step()
    (step or opt.step)()
    problems = []
    for i, (p, w, c, s_before) in enumerate(zip(params, before, copies, state_before)):
        name = f"parameter {i}"
        problem = _check_param(name, p, w, c)
        if problem:
            problems.append(problem)
        state, ref_state = opt.state.get(p, {}), ref.state.get(c, {})
        if state.keys() != ref_state.keys():
            problems.append(f"{name}: state keys {sorted(state)} != reference {sorted(ref_state)}")
            continue
        for key in ref_state:
            old = s_before.get(key, torch.zeros_like(ref_state[key]))
            problem = _check_state(name, key, state[key], ref_state[key], old)
            if problem:
                problems.append(problem)
    return problems


def run_mismatches(cls, kwargs, params, backend, grads_for_step, steps, backend_kwargs=None) -> list[str]:
    """``steps`` steps of ``cls(params, backend=backend, **(backend_kwargs or kwargs))``, each compared with the
    reference (``kwargs``) from the same state; ``grads_for_step(params, step)`` sets the gradients. Every
    mismatch, prefixed with its step."""
    opt = cls(params, backend=backend, **(kwargs if backend_kwargs is None else backend_kwargs))
    problems = []
    for step in range(steps):
        grads_for_step(params, step)
        problems += [f"step {step + 1}: {m}" for m in step_mismatches(cls, kwargs, opt, params)]
    return problems


def mutated(cls, kwargs, factor=1.01):
    """``kwargs`` with the trust coefficient (TVLARS, LARS) or, for LAMB, which has none, the learning rate
    multiplied by ``factor``."""
    key = "lr" if cls is LAMB else "eta"
    default = 1e-3
    return {**kwargs, key: kwargs.get(key, default) * factor}
