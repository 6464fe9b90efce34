"""The baseline: a per-parameter Python loop with separate torch ops per tensor, in the style of the TVLARS
authors' code (KhoiDOO/tvlars, opt/tvlars.py and opt/lamb.py). Written for this benchmark, not copied.

It computes the same math as the package's defaults (``docs/algorithms.md``) so that the time
difference is the implementation, not the algorithm: every tensor gets its own norm, ``where``, multiply
and in-place updates, each a separate dispatch (and on a GPU a separate kernel launch).
"""

from __future__ import annotations

import math

import torch


class EagerLoopLARS(torch.optim.Optimizer):
    """LARS, or TVLARS when ``lmbda`` is given (``phi(t) = 1 / (alpha + exp(lmbda * (t - delay))) + gamma_min``).
    1-D tensors skip weight decay and the trust ratio."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3, lmbda=None, alpha=0.1,
                 delay=0.0, gamma_min=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lmbda=lmbda, alpha=alpha, delay=delay, gamma_min=gamma_min))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                                    one)
                    if group["lmbda"] is not None:
                        t = state["step"]
                        # exp overflow gives phi = gamma_min, as the spec asks
                        try:
                            decay = math.exp(group["lmbda"] * (t - group["delay"]))
                        except OverflowError:
                            decay = math.inf
                        q = q * (1.0 / (group["alpha"] + decay) + group["gamma_min"])
                    dp = dp.mul(q)
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


class EagerLoopLAMB(torch.optim.Optimizer):
    """LAMB with bias correction and the weight norm clipped at ``norm_clip``; no exclusion."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, norm_clip=10.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      norm_clip=norm_clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1 ** state["step"])
                v_hat = exp_avg_sq / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                update.add_(p, alpha=group["weight_decay"])
                weight_norm = torch.norm(p).clamp(max=group["norm_clip"])
                update_norm = torch.norm(update)
                one = torch.ones_like(weight_norm)
                trust_ratio = torch.where(weight_norm > 0,
                                          torch.where(update_norm > 0, weight_norm / update_norm, one), one)
                p.sub_(update * (group["lr"] * trust_ratio))
