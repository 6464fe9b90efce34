"""An independent reading of docs/algorithms.md in float64 NumPy, written from the spec alone.

It shares no code with tvlars_fused: a misreading of the spec that every backend shares would show up
as a difference here.
"""

import math

import numpy as np


def spec_phi(t, lmbda, alpha, delay, gamma_min):
    x = lmbda * (t - delay)
    return gamma_min if x > 700 else 1.0 / (alpha + math.exp(x)) + gamma_min


def lars_family(ws, grads_per_step, *, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3, eps=0.0,
                norm_clip=None, trust_denominator="norm_of_sum", nesterov=False, excluded=None,
                phi=None):
    """ws: list of float64 arrays; grads_per_step: list (steps) of lists (layers); phi: None or a dict."""
    ws = [w.astype(np.float64).copy() for w in ws]
    bufs = [np.zeros_like(w) for w in ws]
    excluded = excluded or [False] * len(ws)
    clip = (lambda n: min(n, norm_clip)) if norm_clip is not None else (lambda n: n)
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.astype(np.float64)
            if excluded[i]:
                u = g
            else:
                d = g + weight_decay * w
                wn = clip(np.linalg.norm(w))
                if trust_denominator == "norm_of_sum":
                    dn = clip(np.linalg.norm(d))
                else:
                    dn = clip(np.linalg.norm(g)) + weight_decay * wn
                factor = spec_phi(t, **phi) if phi is not None else 1.0
                q = eta * factor * wn / (dn + eps) if wn > 0 and dn > 0 else 1.0
                u = q * d
            bufs[i] = momentum * bufs[i] + u
            direction = u + momentum * bufs[i] if nesterov else bufs[i]
            ws[i] = w - lr * direction
    return ws


def lamb(ws, grads_per_step, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
         bias_correction=True, norm_clip=10.0, max_grad_norm=None, excluded=None):
    ws = [w.astype(np.float64).copy() for w in ws]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    b1, b2 = betas
    excluded = excluded or [False] * len(ws)
    for t, grads in enumerate(grads_per_step, start=1):
        grads = [g.astype(np.float64) for g in grads]
        if max_grad_norm is not None:
            total = math.sqrt(sum(float((g * g).sum()) for g in grads))
            scale = min(1.0, max_grad_norm / total) if total > 0 else 1.0
            grads = [g * scale for g in grads]
        for i, (w, g) in enumerate(zip(ws, grads)):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            mh = ms[i] / (1 - b1 ** t) if bias_correction else ms[i]
            vh = vs[i] / (1 - b2 ** t) if bias_correction else vs[i]
            u = mh / (np.sqrt(vh) + eps) + (0.0 if excluded[i] else weight_decay) * w
            wn = np.linalg.norm(w)
            wn = min(wn, norm_clip) if norm_clip else wn
            un = np.linalg.norm(u)
            q = wn / un if wn > 0 and un > 0 and not excluded[i] else 1.0
            ws[i] = w - lr * q * u
    return ws
