"""An independent reading of docs/algorithms.md in float64 NumPy, written from the spec alone.

It shares no code with tvlars_fused: a misreading of the spec that every backend shares would show up
as a difference here.
"""

import math

import numpy as np


def spec_phi(t, lmbda, alpha, delay, gamma_min):
    x = lmbda * (t - delay)
    return gamma_min if x > 700 else 1.0 / (alpha + math.exp(x)) + gamma_min


def _bounded(q, min_trust_ratio, max_trust_ratio):
    if max_trust_ratio is not None:
        q = min(q, max_trust_ratio)
    return q if min_trust_ratio is None else max(q, min_trust_ratio)


def lars_family(ws, grads_per_step, *, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0,
                norm_clip=None, trust_denominator="norm_of_sum", nesterov=False, excluded=None,
                phi=None, dampening=0.0, trust_clip=False, min_trust_ratio=None, max_trust_ratio=None,
                always_adapt=True, no_decay=None, no_adapt=None):
    """ws: list of float64 arrays; grads_per_step: list (steps) of lists (layers); phi: None or a dict.
    ``excluded`` is the shorthand for ``no_decay`` and ``no_adapt`` (either, per layer, adds to it)."""
    ws = [w.astype(np.float64).copy() for w in ws]
    bufs = [np.zeros_like(w) for w in ws]
    excluded = excluded or [False] * len(ws)
    no_decay = [a or b for a, b in zip(excluded, no_decay or excluded)]
    no_adapt = [a or b for a, b in zip(excluded, no_adapt or excluded)]
    adapt_group = always_adapt or weight_decay != 0
    clip = (lambda n: min(n, norm_clip)) if norm_clip is not None else (lambda n: n)
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.astype(np.float64)
            beta = 0.0 if no_decay[i] else weight_decay
            d = g + beta * w
            q = 1.0
            if adapt_group and not no_adapt[i]:
                wn = clip(np.linalg.norm(w))
                if trust_denominator == "norm_of_sum":
                    dn = clip(np.linalg.norm(d))
                    computed = wn > 0 and dn > 0
                else:
                    gn = clip(np.linalg.norm(g))
                    dn = gn + beta * wn
                    computed = wn > 0 and gn > 0
                factor = spec_phi(t, **phi) if phi is not None else 1.0
                if computed:
                    q = _bounded(eta * factor * wn / (dn + eps), min_trust_ratio, max_trust_ratio)
                if trust_clip:
                    q = min(q / lr, 1.0) if lr > 0 else 1.0
            u = q * d
            bufs[i] = u if t == 1 else momentum * bufs[i] + (1 - dampening) * u
            direction = u + momentum * bufs[i] if nesterov else bufs[i]
            ws[i] = w - lr * direction
    return ws


def lamb(ws, grads_per_step, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
         bias_correction=True, norm_clip=10.0, max_grad_norm=None, excluded=None, grad_averaging=True,
         decoupled_decay=False, min_trust_ratio=None, max_trust_ratio=None, always_adapt=True, no_decay=None,
         no_adapt=None):
    ws = [w.astype(np.float64).copy() for w in ws]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    b1, b2 = betas
    excluded = excluded or [False] * len(ws)
    no_decay = [a or b for a, b in zip(excluded, no_decay or excluded)]
    no_adapt = [a or b for a, b in zip(excluded, no_adapt or excluded)]
    adapt_group = always_adapt or weight_decay != 0
    for t, grads in enumerate(grads_per_step, start=1):
        grads = [g.astype(np.float64) for g in grads]
        if max_grad_norm is not None:
            total = math.sqrt(sum(float((g * g).sum()) for g in grads))
            scale = min(1.0, max_grad_norm / total) if total > 0 else 1.0
            grads = [g * scale for g in grads]
        for i, (w, g) in enumerate(zip(ws, grads)):
            ms[i] = b1 * ms[i] + ((1 - b1) if grad_averaging else 1.0) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            mh = ms[i] / (1 - b1 ** t) if bias_correction else ms[i]
            vh = vs[i] / (1 - b2 ** t) if bias_correction else vs[i]
            beta = 0.0 if no_decay[i] else weight_decay
            u = mh / (np.sqrt(vh) + eps)
            if decoupled_decay:
                w = w * (1 - lr * beta)
            else:
                u = u + beta * w
            q = 1.0
            if adapt_group and not no_adapt[i]:
                wn = np.linalg.norm(w)
                wn = min(wn, norm_clip) if norm_clip else wn
                un = np.linalg.norm(u)
                if wn > 0 and un > 0:
                    q = _bounded(wn / un, min_trust_ratio, max_trust_ratio)
            ws[i] = w - lr * q * u
    return ws
