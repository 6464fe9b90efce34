"""The foreach backend: the reference math with ``torch._foreach_*`` multi-tensor ops, on any device.

No host synchronisation inside a step: per-layer quantities (norms, phi, bias corrections, trust ratios) live in small
device vectors and the zero-norm branch is a ``torch.where``. Norms sum their squares in float64, like every backend.
``found_inf`` (GradScaler's flag, which reaches this backend from a fused backend's strided layers) is read on the host
for CPU tensors; on a GPU the step runs and every tensor it wrote is put back where the flag is set, on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._layer_table import _upload
from ._types import Bucket, LambHyper, LarsHyper, math_dtype


def _clip(norms: Tensor, norm_clip: float | None) -> Tensor:
    return norms.clamp(max=norm_clip) if norm_clip is not None else norms


def _layer_norms(bucket: Bucket, *layer_lists: list[Tensor]) -> tuple[Tensor, ...]:
    """One vector of per-layer norms for each list (lists already in the working precision). For sharded
    layers the local sums of squares are summed over the ranks in a single all-reduce."""
    norms = torch.stack([torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
                         for tensors in layer_lists])
    if bucket.reduce_sums is not None:
        sums = norms.square()
        bucket.reduce_sums(sums)
        norms = sums.sqrt()
    return tuple(norms.unbind(0))


def _read(bucket: Bucket, grad_scale: Tensor | None, grad_mult: Tensor | None):
    """The layers' weights and gradients in the working precision (float32, or float64 for float64
    parameters). Gradients already in it are used as they are (the steps below only read them); any scaling
    or up-cast makes new tensors, so ``p.grad`` is never written."""
    dtype = math_dtype(bucket.dtype)
    weights = bucket.masters if bucket.masters is not None else bucket.params
    if weights[0].dtype != dtype:
        weights = [w.to(dtype) for w in weights]
    grads = bucket.grads
    if grads[0].dtype != dtype:
        grads = [g.to(dtype) for g in grads]
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale.to(dtype))
    if grad_mult is not None:
        grads = torch._foreach_mul(grads, grad_mult.to(dtype))
    return weights, grads


def _apply(bucket: Bucket, weights: list[Tensor], step_dirs: list[Tensor], lr: float | Tensor) -> None:
    if isinstance(lr, Tensor):
        torch._foreach_sub_(weights, torch._foreach_mul(step_dirs, lr.to(weights[0].dtype)))
    else:
        torch._foreach_add_(weights, step_dirs, alpha=-lr)
    if bucket.masters is not None and weights is not bucket.masters:
        torch._foreach_copy_(bucket.masters, weights)
    if weights is not bucket.params:
        torch._foreach_copy_(bucket.params, weights)  # one rounding to the parameter dtype


def _step_then_restore(step, bucket: Bucket, hp, grad_scale: Tensor | None, found_inf: Tensor) -> None:
    """``step``, then every tensor it wrote gets its old value back where ``found_inf`` is set: the flag is never read
    on the host (a sync, illegal in a CUDA graph). Costs a copy of the bucket: it serves a fused backend's few strided
    layers and float64 buckets under GradScaler."""
    written = bucket.params + (bucket.masters or []) + [t for s in bucket.states for t in s] + bucket.steps
    before = [t.clone() for t in written]
    step(bucket, hp, grad_scale)
    skip = found_inf.to(device=bucket.device) != 0
    for t, old in zip(written, before):
        t.copy_(torch.where(skip, old, t))


def _honours_found_inf(step):
    """The step with GradScaler's ``found_inf``: read on the host for a CPU flag (no sync there), masked on the
    device otherwise."""

    def with_found_inf(bucket: Bucket, hp, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
        if found_inf is None:
            step(bucket, hp, grad_scale)
        elif found_inf.device.type != "cpu":
            _step_then_restore(step, bucket, hp, grad_scale, found_inf)
        elif not found_inf.item():
            step(bucket, hp, grad_scale)

    with_found_inf.__name__, with_found_inf.__doc__ = step.__name__, step.__doc__
    with_found_inf.unmasked = step
    return with_found_inf


def _bias_correction(log_beta: float, t: Tensor) -> Tensor:
    """``1 - beta**t`` in float32 as ``-expm1(t * log(beta))`` (see LambHyper.log_beta1)."""
    return -torch.expm1(t * log_beta)


def _scale_by_layer(tensors: list[Tensor], factors: Tensor) -> None:
    """tensors[i] *= factors[i] for a device vector of per-layer factors, without reading it on the host."""
    if tensors:
        torch._foreach_mul_(tensors, list(factors.unbind(0)))


@_honours_found_inf
def lars_step(bucket: Bucket, hp: LarsHyper, grad_scale: Tensor | None = None) -> None:
    weights, grads = _read(bucket, grad_scale, None)
    (bufs,) = bucket.states
    torch._foreach_add_(bucket.steps, 1)

    adapted = [i for i, e in enumerate(bucket.excluded) if not e]
    updates = list(grads)  # excluded layers: u = g
    if adapted:
        w_a = [weights[i] for i in adapted]
        g_a = [grads[i] for i in adapted]
        d_a = torch._foreach_add(g_a, w_a, alpha=hp.weight_decay)
        w_norm, other_norm = _layer_norms(bucket, w_a, g_a if hp.sum_of_norms else d_a)
        w_norm = _clip(w_norm, hp.norm_clip)
        if hp.sum_of_norms:
            d_norm = _clip(other_norm, hp.norm_clip) + hp.weight_decay * w_norm
        else:
            d_norm = _clip(other_norm, hp.norm_clip)
        ratio = hp.eta * w_norm / (d_norm + hp.eps)
        if hp.use_phi:
            t = torch.stack([bucket.steps[i] for i in adapted])
            ratio = ratio * (1.0 / (hp.alpha + torch.exp(hp.lmbda * (t - hp.delay))) + hp.gamma_min)
        trust_ratio = torch.where((w_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
        _scale_by_layer(d_a, trust_ratio.to(math_dtype(bucket.dtype)))  # float64, rounded once
        for i, d in zip(adapted, d_a):
            updates[i] = d

    torch._foreach_mul_(bufs, hp.momentum)
    torch._foreach_add_(bufs, updates)
    step_dirs = torch._foreach_add(updates, bufs, alpha=hp.momentum) if hp.nesterov else bufs
    _apply(bucket, weights, step_dirs, hp.lr)


@_honours_found_inf
def lamb_step(bucket: Bucket, hp: LambHyper, grad_scale: Tensor | None = None) -> None:
    weights, grads = _read(bucket, grad_scale, hp.clip_coef)
    exp_avgs, exp_avg_sqs = bucket.states
    torch._foreach_add_(bucket.steps, 1)

    torch._foreach_mul_(exp_avgs, hp.beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - hp.beta1)
    torch._foreach_mul_(exp_avg_sqs, hp.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - hp.beta2)

    if hp.bias_correction:
        t = torch.stack(bucket.steps)
        m_hat = torch._foreach_div(exp_avgs, list(_bias_correction(hp.log_beta1, t).unbind(0)))
        v_hat = torch._foreach_div(exp_avg_sqs, list(_bias_correction(hp.log_beta2, t).unbind(0)))
    else:
        m_hat, v_hat = exp_avgs, exp_avg_sqs
    denom = torch._foreach_sqrt(v_hat)
    torch._foreach_add_(denom, hp.eps)
    updates = torch._foreach_div(m_hat, denom)
    adapted = [i for i, e in enumerate(bucket.excluded) if not e]
    if hp.weight_decay != 0 and adapted:
        torch._foreach_add_([updates[i] for i in adapted], [weights[i] for i in adapted],
                            alpha=hp.weight_decay)

    w_norm, u_norm = _layer_norms(bucket, weights, updates)
    w_norm = _clip(w_norm, hp.norm_clip)
    adapted_mask = bucket.cache.get(("adapted_mask", tuple(bucket.excluded)))
    if adapted_mask is None:  # uploaded without a sync (legal while a CUDA graph is captured), kept with its source
        adapted_mask = _upload(torch.tensor([not e for e in bucket.excluded]), w_norm.device)
        bucket.cache[("adapted_mask", tuple(bucket.excluded))] = adapted_mask
    trust_ratio = torch.where((w_norm > 0) & (u_norm > 0) & adapted_mask[0], w_norm / u_norm,
                              torch.ones_like(w_norm))
    _scale_by_layer(updates, trust_ratio.to(math_dtype(bucket.dtype)))  # float64, rounded once
    _apply(bucket, weights, updates, hp.lr)
