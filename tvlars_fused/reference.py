"""The reference backend: the math of ``docs/algorithms.md``, one layer at a time, written to be read.

Every other backend is tested against this file. It favours clarity over speed: plain per-tensor torch ops
in float32 (float64 for float64 parameters), Python branches on norms (a host synchronisation per layer on
a GPU), no fusion.
"""

from __future__ import annotations

import math
import struct

import torch
from torch import Tensor

from . import _rounding
from ._types import Bucket, LambHyper, LarsHyper, math_dtype


def phi(t: float, lmbda: float, alpha: float = 0.1, delay: float = 0, gamma_min: float = 0.0) -> float:
    """TVLARS's time-varying factor ``1 / (alpha + exp(lmbda * (t - delay))) + gamma_min``, in float64.

    When ``exp`` overflows the first term is 0, so phi is ``gamma_min`` (never NaN).
    """
    try:
        growth = math.exp(lmbda * (t - delay))
    except OverflowError:
        return float(gamma_min)
    return 1.0 / (alpha + growth) + gamma_min


def _clip(norm: float, norm_clip: float | None) -> float:
    return min(norm, norm_clip) if norm_clip is not None else norm


def _norm(bucket: Bucket, x: Tensor) -> float:
    """||x|| of the whole layer, its squares summed in float64 (a float32 sum of squares overflows for finite weights
    near 1e20 and flushes below 2**-126); for a sharded layer, the local sums of squares summed over the ranks."""
    sum_of_squares = x.to(torch.float64).square().sum().reshape(1)  # x is already in the working precision
    if bucket.reduce_sums is not None:
        bucket.reduce_sums(sum_of_squares)
    return math.sqrt(sum_of_squares.item())


def _read(bucket: Bucket, i: int, grad_scale: Tensor | None, grad_mult: Tensor | None):
    """Layer i's weight and gradient in the working precision, float32 (float64 for float64 parameters);
    copies: the caller's tensors are never modified."""
    dtype = math_dtype(bucket.dtype)
    if bucket.comps is not None:  # Kahan: the weight is param + compensation
        w = _rounding.kahan_weight(bucket.params[i], bucket.comps[i])
    else:
        w = (bucket.masters[i] if bucket.masters is not None else bucket.params[i]).to(dtype, copy=True)
    g = bucket.grads[i].to(dtype, copy=True)
    if grad_scale is not None:
        g = g / grad_scale.to(dtype)
    if grad_mult is not None:
        g = g * grad_mult.to(dtype)
    return w, g


def _write(bucket: Bucket, i: int, w: Tensor) -> None:
    if bucket.comps is not None:
        _rounding.kahan_split(w, bucket.params[i], bucket.comps[i])
        return
    if bucket.masters is not None:
        bucket.masters[i].copy_(w)
    bucket.params[i].copy_(w)  # rounds once to the parameter's dtype


def _load_state(bucket: Bucket, k: int, i: int) -> Tensor:
    """State tensor k of layer i in the working precision: itself (float32, float64), or a float32 copy of bfloat16
    state."""
    state = bucket.states[k][i]
    return state if state.dtype == math_dtype(bucket.dtype) else state.to(torch.float32)


def _store_state(bucket: Bucket, hp, k: int, i: int, value: Tensor) -> Tensor:
    """Stores the new value of state tensor k of layer i (rounded when the state is bfloat16) and returns what was
    stored, in the working precision: the step continues with the stored value."""
    state = bucket.states[k][i]
    if value is state:
        return value
    _rounding.store(state, value, stochastic=hp.stochastic_rounding, seed=hp.seed, layer_id=bucket.layer_ids[i],
                    stream=k, step=bucket.steps[i], element_offset=bucket.element_offsets[i])
    return state.to(value.dtype)


def _ratio(bucket: Bucket, q: float) -> float:
    """The trust ratio is computed in float64 from float64 norms and rounded once to the working precision."""
    if bucket.dtype == torch.float64 or not math.isfinite(q):
        return q
    return struct.unpack("f", struct.pack("f", q))[0]


def _lr(lr: float | Tensor) -> float:
    return lr.item() if isinstance(lr, Tensor) else lr


def _bounded(q: float, hp) -> float:
    """A computed trust ratio within [min_trust_ratio, max_trust_ratio] (each None: unbounded)."""
    if hp.max_trust_ratio is not None:
        q = min(q, hp.max_trust_ratio)
    if hp.min_trust_ratio is not None:
        q = max(q, hp.min_trust_ratio)
    return q


def lars_step(bucket: Bucket, hp: LarsHyper, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = _lr(hp.lr)
    for i in range(len(bucket)):
        w, g = _read(bucket, i, grad_scale, None)
        bucket.steps[i] += 1
        t = bucket.steps[i].item()
        beta = 0.0 if bucket.no_decay[i] else hp.weight_decay
        d = g if bucket.no_decay[i] else g + beta * w
        q = 1.0
        if hp.adapt and not bucket.no_adapt[i]:
            wn = _clip(_norm(bucket, w), hp.norm_clip)
            if hp.sum_of_norms:  # the zero-norm branch tests ||g||, as timm and MLPerf
                gn = _clip(_norm(bucket, g), hp.norm_clip)
                dn, zero = gn + beta * wn, wn == 0 or gn == 0
            else:
                dn = _clip(_norm(bucket, d), hp.norm_clip)
                zero = wn == 0 or dn == 0
            if not zero:
                factor = phi(t, hp.lmbda, hp.alpha, hp.delay, hp.gamma_min) if hp.use_phi else 1.0
                q = _bounded(hp.eta * factor * wn / (dn + hp.eps), hp)
            if hp.trust_clip:  # LARC: the layer's rate q * lr never above lr
                q = 1.0 if q >= lr else q / lr
        u = _ratio(bucket, q) * d
        if t == 1:  # a layer's first step stores u (torch.optim.SGD: no dampening then)
            buf = u
        else:
            buf = _load_state(bucket, 0, i).mul_(hp.momentum).add_(u, alpha=1 - hp.dampening)
        buf = _store_state(bucket, hp, 0, i, buf)
        step_dir = u + hp.momentum * buf if hp.nesterov else buf
        _write(bucket, i, w - lr * step_dir)


def lamb_step(bucket: Bucket, hp: LambHyper, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = _lr(hp.lr)
    for i in range(len(bucket)):
        w, g = _read(bucket, i, grad_scale, hp.clip_coef)
        bucket.steps[i] += 1
        t = bucket.steps[i].item()
        m, v = _load_state(bucket, 0, i), _load_state(bucket, 1, i)
        m.mul_(hp.beta1).add_(hp.first_moment_factor * g)
        v.mul_(hp.beta2).add_((1 - hp.beta2) * g * g)
        m, v = _store_state(bucket, hp, 0, i, m), _store_state(bucket, hp, 1, i, v)  # u is of the stored moments
        if hp.bias_correction:
            mh = m / (1 - hp.beta1 ** t)
            vh = v / (1 - hp.beta2 ** t)
        else:
            mh, vh = m, v
        beta = 0.0 if bucket.no_decay[i] else hp.weight_decay
        u = mh / (vh.sqrt() + hp.eps)
        if hp.decoupled_decay:
            w = w * (1 - lr * beta)  # decayed first; its norm is the trust ratio's numerator (timm)
        else:
            u = u + beta * w
        q = 1.0
        if hp.adapt and not bucket.no_adapt[i]:
            wn = _clip(_norm(bucket, w), hp.norm_clip)
            un = _norm(bucket, u)
            if wn > 0 and un > 0:
                q = _bounded(wn / un, hp)
        _write(bucket, i, w - lr * _ratio(bucket, q) * u)
