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
    w = (bucket.masters[i] if bucket.masters is not None else bucket.params[i]).to(dtype, copy=True)
    g = bucket.grads[i].to(dtype, copy=True)
    if grad_scale is not None:
        g = g / grad_scale.to(dtype)
    if grad_mult is not None:
        g = g * grad_mult.to(dtype)
    return w, g


def _write(bucket: Bucket, i: int, w: Tensor) -> None:
    if bucket.masters is not None:
        bucket.masters[i].copy_(w)
    bucket.params[i].copy_(w)  # rounds once to the parameter's dtype


def _ratio(bucket: Bucket, q: float) -> float:
    """The trust ratio is computed in float64 from float64 norms and rounded once to the working precision."""
    if bucket.dtype == torch.float64 or not math.isfinite(q):
        return q
    return struct.unpack("f", struct.pack("f", q))[0]


def _lr(lr: float | Tensor) -> float:
    return lr.item() if isinstance(lr, Tensor) else lr


def lars_step(bucket: Bucket, hp: LarsHyper, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = _lr(hp.lr)
    (bufs,) = bucket.states
    for i in range(len(bucket)):
        w, g = _read(bucket, i, grad_scale, None)
        bucket.steps[i] += 1
        t = bucket.steps[i].item()
        if bucket.excluded[i]:
            u = g
        else:
            d = g + hp.weight_decay * w
            wn = _clip(_norm(bucket, w), hp.norm_clip)
            if hp.sum_of_norms:
                dn = _clip(_norm(bucket, g), hp.norm_clip) + hp.weight_decay * wn
            else:
                dn = _clip(_norm(bucket, d), hp.norm_clip)
            factor = phi(t, hp.lmbda, hp.alpha, hp.delay, hp.gamma_min) if hp.use_phi else 1.0
            q = hp.eta * factor * wn / (dn + hp.eps) if wn > 0 and dn > 0 else 1.0
            u = _ratio(bucket, q) * d
        buf = bufs[i]
        buf.mul_(hp.momentum).add_(u)
        step_dir = u + hp.momentum * buf if hp.nesterov else buf
        _write(bucket, i, w - lr * step_dir)


def lamb_step(bucket: Bucket, hp: LambHyper, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = _lr(hp.lr)
    exp_avgs, exp_avg_sqs = bucket.states
    for i in range(len(bucket)):
        w, g = _read(bucket, i, grad_scale, hp.clip_coef)
        bucket.steps[i] += 1
        t = bucket.steps[i].item()
        m, v = exp_avgs[i], exp_avg_sqs[i]
        m.mul_(hp.beta1).add_((1 - hp.beta1) * g)
        v.mul_(hp.beta2).add_((1 - hp.beta2) * g * g)
        if hp.bias_correction:
            mh = m / (1 - hp.beta1 ** t)
            vh = v / (1 - hp.beta2 ** t)
        else:
            mh, vh = m, v
        decay = 0.0 if bucket.excluded[i] else hp.weight_decay
        u = mh / (vh.sqrt() + hp.eps) + decay * w
        wn = _clip(_norm(bucket, w), hp.norm_clip)
        un = _norm(bucket, u)
        q = wn / un if wn > 0 and un > 0 and not bucket.excluded[i] else 1.0
        _write(bucket, i, w - lr * _ratio(bucket, q) * u)
