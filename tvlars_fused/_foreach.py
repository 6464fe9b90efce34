"""The foreach backend: the reference math with ``torch._foreach_*`` multi-tensor ops, on any device.

No host synchronisation inside a step: per-layer quantities (norms, phi, bias corrections, trust ratios) live in small
device vectors and the zero-norm branch is a ``torch.where``. Norms sum their squares in float64, like every backend.
``found_inf`` (GradScaler's flag, which reaches this backend from a fused backend's strided layers) is read on the host
for CPU tensors; on a GPU the step runs and every tensor it wrote is put back where the flag is set, on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _rounding
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
    if bucket.comps is not None:  # Kahan: the weight is param + compensation, in float32
        weights = torch._foreach_add([p.to(torch.float32) for p in bucket.params],
                                     [c.to(torch.float32) for c in bucket.comps])
    elif weights[0].dtype != dtype:
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
    if bucket.comps is not None:  # the new weight as its nearest bfloat16 and the nearest bfloat16 of the rest
        torch._foreach_copy_(bucket.params, weights)
        torch._foreach_copy_(bucket.comps, torch._foreach_sub(weights, [p.to(torch.float32) for p in bucket.params]))
        return
    if bucket.masters is not None and weights is not bucket.masters:
        torch._foreach_copy_(bucket.masters, weights)
    if weights is not bucket.params:
        torch._foreach_copy_(bucket.params, weights)  # one rounding to the parameter dtype


def _step_then_restore(step, bucket: Bucket, hp, grad_scale: Tensor | None, found_inf: Tensor) -> None:
    """``step``, then every tensor it wrote gets its old value back where ``found_inf`` is set: the flag is never read
    on the host (a sync, illegal in a CUDA graph). Costs a copy of the bucket: it serves a fused backend's few strided
    layers and float64 buckets under GradScaler."""
    written = bucket.params + (bucket.masters or []) + (bucket.comps or []) + [t for s in bucket.states for t in s] + bucket.steps
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


def _load_states(bucket: Bucket, k: int) -> list[Tensor]:
    """State list k in the working precision: the state itself, or float32 copies of bfloat16 state."""
    states = bucket.states[k]
    if states[0].dtype == math_dtype(bucket.dtype):
        return states
    return [s.to(torch.float32) for s in states]


def _store_states(bucket: Bucket, hp, k: int, values: list[Tensor]) -> list[Tensor]:
    """Stores state list k's new values (rounded when the state is bfloat16) and returns what was stored, in float32:
    the step continues with the stored values."""
    states = bucket.states[k]
    if values is states:
        return values
    if hp.stochastic_rounding:
        for i, (state, value) in enumerate(zip(states, values)):
            _rounding.store(state, value, stochastic=True, seed=hp.seed, layer_id=bucket.layer_ids[i], stream=k,
                            step=bucket.steps[i], element_offset=bucket.element_offsets[i], cache=bucket.cache)
    else:
        torch._foreach_copy_(states, values)  # round-to-nearest-even
    return [s.to(torch.float32) for s in states]


def _bias_correction(log_beta: float, t: Tensor) -> Tensor:
    """``1 - beta**t`` as ``-expm1(t * log(beta))`` in t's precision (see LambHyper.log_beta1)."""
    return -torch.expm1(t * log_beta)


def _scale_by_layer(tensors: list[Tensor], factors: Tensor) -> None:
    """tensors[i] *= factors[i] for a device vector of per-layer factors, without reading it on the host."""
    if tensors:
        torch._foreach_mul_(tensors, list(factors.unbind(0)))


def _steps(bucket: Bucket, layers: list[int] | None = None) -> Tensor:
    """The layers' step counts t as a device vector in the working precision (float64 for float64 layers: phi and
    the bias corrections are then float64 too)."""
    steps = bucket.steps if layers is None else [bucket.steps[i] for i in layers]
    return torch.stack(steps).to(math_dtype(bucket.dtype))


def _bounded(ratio: Tensor, hp) -> Tensor:
    """A computed trust ratio within [min_trust_ratio, max_trust_ratio]."""
    if hp.min_trust_ratio is None and hp.max_trust_ratio is None:
        return ratio
    return ratio.clamp(min=hp.min_trust_ratio, max=hp.max_trust_ratio)


def _adapted(bucket: Bucket, hp) -> list[int]:
    return [i for i, off in enumerate(bucket.no_adapt) if not off] if hp.adapt else []


@_honours_found_inf
def lars_step(bucket: Bucket, hp: LarsHyper, grad_scale: Tensor | None = None) -> None:
    weights, grads = _read(bucket, grad_scale, None)
    bufs = _load_states(bucket, 0)
    torch._foreach_add_(bucket.steps, 1)

    decayed = [i for i, off in enumerate(bucket.no_decay) if not off]
    updates = list(grads)  # u = d = g without weight decay, until the trust ratio scales it
    if decayed and hp.weight_decay != 0:
        for i, d in zip(decayed, torch._foreach_add([grads[i] for i in decayed], [weights[i] for i in decayed],
                                                    alpha=hp.weight_decay)):
            updates[i] = d
    adapted = _adapted(bucket, hp)
    if adapted:
        w_a = [weights[i] for i in adapted]
        d_a = [updates[i] for i in adapted]
        w_norm, other_norm = _layer_norms(bucket, w_a, [grads[i] for i in adapted] if hp.sum_of_norms else d_a)
        w_norm = _clip(w_norm, hp.norm_clip)
        other_norm = _clip(other_norm, hp.norm_clip)
        if hp.sum_of_norms:  # the zero-norm branch tests ||g|| (docs/algorithms.md, section 4)
            decay = torch.tensor([0.0 if bucket.no_decay[i] else hp.weight_decay for i in adapted],
                                 dtype=w_norm.dtype).to(w_norm.device, non_blocking=True)
            d_norm = other_norm + decay * w_norm
        else:
            d_norm = other_norm
        ratio = hp.eta * w_norm / (d_norm + hp.eps)
        if hp.use_phi:
            t = _steps(bucket, adapted)
            ratio = ratio * (1.0 / (hp.alpha + torch.exp(hp.lmbda * (t - hp.delay))) + hp.gamma_min)
        trust_ratio = torch.where((w_norm > 0) & (other_norm > 0), _bounded(ratio, hp), torch.ones_like(ratio))
        if hp.trust_clip:  # LARC: q = min(q / lr, 1), and 1 when lr == 0
            lr = hp.lr.to(trust_ratio) if isinstance(hp.lr, Tensor) else hp.lr
            trust_ratio = torch.where(trust_ratio >= lr, torch.ones_like(trust_ratio), trust_ratio / lr)
        d_a = [d.clone() if d is grads[i] else d for i, d in zip(adapted, d_a)]  # never scale a gradient in place
        _scale_by_layer(d_a, trust_ratio.to(math_dtype(bucket.dtype)))  # float64, rounded once
        for i, d in zip(adapted, d_a):
            updates[i] = d

    if hp.dampening == 0:  # the buffer starts at 0, so the first step stores u here too
        torch._foreach_mul_(bufs, hp.momentum)
        torch._foreach_add_(bufs, updates)
    else:  # the first step stores u undamped (torch.optim.SGD), later ones mu * buf + (1 - dampening) * u
        later = (_steps(bucket) != 1).to(bufs[0].dtype)  # in the state's precision: float64 hyper-parameters stay
        keep = later * hp.momentum
        add = 1.0 - later * hp.dampening
        _scale_by_layer(bufs, keep)
        torch._foreach_add_(bufs, torch._foreach_mul(updates, list(add.unbind(0))))
    bufs = _store_states(bucket, hp, 0, bufs)
    step_dirs = torch._foreach_add(updates, bufs, alpha=hp.momentum) if hp.nesterov else bufs
    _apply(bucket, weights, step_dirs, hp.lr)


@_honours_found_inf
def lamb_step(bucket: Bucket, hp: LambHyper, grad_scale: Tensor | None = None) -> None:
    weights, grads = _read(bucket, grad_scale, hp.clip_coef)
    exp_avgs, exp_avg_sqs = _load_states(bucket, 0), _load_states(bucket, 1)
    torch._foreach_add_(bucket.steps, 1)

    torch._foreach_mul_(exp_avgs, hp.beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=hp.first_moment_factor)
    torch._foreach_mul_(exp_avg_sqs, hp.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - hp.beta2)
    # u is computed from the stored (rounded) moments, as the fused kernels re-read them
    exp_avgs, exp_avg_sqs = _store_states(bucket, hp, 0, exp_avgs), _store_states(bucket, hp, 1, exp_avg_sqs)

    if hp.bias_correction:
        t = _steps(bucket)
        m_hat = torch._foreach_div(exp_avgs, list(_bias_correction(hp.log_beta1, t).unbind(0)))
        v_hat = torch._foreach_div(exp_avg_sqs, list(_bias_correction(hp.log_beta2, t).unbind(0)))
    else:
        m_hat, v_hat = exp_avgs, exp_avg_sqs
    denom = torch._foreach_sqrt(v_hat)
    torch._foreach_add_(denom, hp.eps)
    updates = torch._foreach_div(m_hat, denom)
    decayed = [i for i, off in enumerate(bucket.no_decay) if not off]
    if hp.weight_decay != 0 and decayed:
        w_d = [weights[i] for i in decayed]
        if hp.decoupled_decay:  # w *= 1 - lr * beta first; its norm is the ratio's numerator
            lr = hp.lr.to(w_d[0].dtype) if isinstance(hp.lr, Tensor) else hp.lr
            torch._foreach_mul_(w_d, 1 - lr * hp.weight_decay)
        else:
            torch._foreach_add_([updates[i] for i in decayed], w_d, alpha=hp.weight_decay)

    w_norm, u_norm = _layer_norms(bucket, weights, updates)
    w_norm = _clip(w_norm, hp.norm_clip)
    adapted = [bool(hp.adapt and not off) for off in bucket.no_adapt]
    adapted_mask = bucket.cache.get(("adapted_mask", tuple(adapted)))
    if adapted_mask is None:  # uploaded without a sync (legal while a CUDA graph is captured), kept with its source
        adapted_mask = _upload(torch.tensor(adapted), w_norm.device)
        bucket.cache[("adapted_mask", tuple(adapted))] = adapted_mask
    trust_ratio = torch.where((w_norm > 0) & (u_norm > 0) & adapted_mask[0], _bounded(w_norm / u_norm, hp),
                              torch.ones_like(w_norm))
    _scale_by_layer(updates, trust_ratio.to(math_dtype(bucket.dtype)))  # float64, rounded once
    _apply(bucket, weights, updates, hp.lr)
