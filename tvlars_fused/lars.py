"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017), as in ``docs/algorithms.md``.

For each layer ``w`` with gradient ``g`` (excluded layers skip weight decay and the trust ratio)::

    d   = g + weight_decay * w
    q   = eta * phi(t) * ||w|| / (||d|| + eps)       (q = 1 when a norm is 0; phi = 1 for plain LARS)
    buf = momentum * buf + q * d
    w   = w - lr * (q * d + momentum * buf  if nesterov else  buf)

``trust_denominator="sum_of_norms"`` uses ``||g|| + weight_decay * ||w||`` for ``||d||`` (the original
paper, timm, MLPerf); ``norm_clip`` clips each norm.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import _backends
from ._optimizer import LayerwiseOptimizer, storage_defaults, _check_range, _check_trust_bounds, exclude_1d
from ._types import Bucket, LarsHyper

TRUST_DENOMINATORS = ("norm_of_sum", "sum_of_norms")


class LARS(LayerwiseOptimizer):
    _state_keys = ("momentum_buffer",)
    _step_name = "lars_step"

    def __init__(self, params, lr: float | Tensor, momentum: float = 0.9, weight_decay: float = 5e-4,
                 eta: float = 1e-3, eps: float = 0.0, norm_clip: float | None = None,
                 trust_denominator: str = "norm_of_sum", nesterov: bool = False,
                 exclude: Callable[[Tensor], bool] | None = exclude_1d, backend: str = "auto",
                 master_weights: bool = False, *, dampening: float = 0.0, trust_clip: bool = False,
                 min_trust_ratio: float | None = None, max_trust_ratio: float | None = None,
                 always_adapt: bool = True, exclude_from_weight_decay: Callable[[Tensor], bool] | None = None,
                 exclude_from_adaptation: Callable[[Tensor], bool] | None = None,
                 state_dtype: torch.dtype = torch.float32, rounding: str = "stochastic", seed: int = 0,
                 kahan: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                        norm_clip=norm_clip, trust_denominator=trust_denominator, nesterov=nesterov,
                        exclude=exclude, dampening=dampening, trust_clip=trust_clip,
                        min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio, always_adapt=always_adapt,
                        exclude_from_weight_decay=exclude_from_weight_decay,
                        exclude_from_adaptation=exclude_from_adaptation,
                        **storage_defaults(state_dtype, rounding, seed, kahan))
        super().__init__(params, defaults, backend=backend, master_weights=master_weights)

    @classmethod
    def timm(cls, params, lr: float | Tensor = 1.0, **overrides: Any) -> "LARS":
        """timm 1.0's ``Lars`` with its defaults and branches: momentum 0, no weight decay, trust_coeff (eta)
        1e-3, eps 1e-8, the sum-of-norms denominator, no exclusion, and a group adapted only when its
        weight_decay is not 0 (``always_adapt=False``). timm's ``trust_coeff`` is ``eta`` here."""
        settings = dict(momentum=0.0, weight_decay=0.0, eta=1e-3, eps=1e-8, trust_denominator="sum_of_norms",
                        exclude=None, always_adapt=False)
        if "trust_coeff" in overrides:
            settings["eta"] = overrides.pop("trust_coeff")
        settings.update(overrides)
        return cls(params, lr, **settings)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check_range("lr", group["lr"], 0.0)
        _check_range("momentum", group["momentum"], 0.0, 1.0)
        _check_range("weight_decay", group["weight_decay"], 0.0)
        _check_range("eta", group["eta"], 0.0)
        _check_range("eps", group["eps"], 0.0)
        if group["norm_clip"] is not None:
            if not group["norm_clip"] > 0:
                raise ValueError(f"Invalid norm_clip: {group['norm_clip']!r} (must be None or > 0)")
        if group["trust_denominator"] not in TRUST_DENOMINATORS:
            raise ValueError(f"Invalid trust_denominator: {group['trust_denominator']!r} "
                             f"(must be one of {', '.join(TRUST_DENOMINATORS)})")
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("Invalid nesterov: nesterov momentum needs momentum > 0")
        _check_range("dampening", group["dampening"], 0.0, 1.0, open_high=False)
        if group["nesterov"] and group["dampening"] != 0:
            raise ValueError("Invalid nesterov: nesterov momentum needs dampening == 0 (as torch.optim.SGD)")
        _check_trust_bounds(group)

    def _hyper(self, group: dict[str, Any], extra=None) -> LarsHyper:
        return LarsHyper(
            lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"], eta=group["eta"],
            eps=group["eps"], norm_clip=group["norm_clip"],
            sum_of_norms=group["trust_denominator"] == "sum_of_norms", nesterov=group["nesterov"],
            use_phi=False, dampening=float(group["dampening"]), trust_clip=bool(group["trust_clip"]),
            min_trust_ratio=group["min_trust_ratio"], max_trust_ratio=group["max_trust_ratio"],
            adapt=bool(group["always_adapt"]) or group["weight_decay"] != 0,
            stochastic_rounding=group["rounding"] == "stochastic", seed=int(group["seed"]))


def lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], state_steps: list[Tensor],
         *, excluded: list[bool] | None = None, backend: str = "foreach", lr: float | Tensor,
         momentum: float = 0.9, weight_decay: float = 5e-4, eta: float = 1e-3, eps: float = 0.0,
         norm_clip: float | None = None, trust_denominator: str = "norm_of_sum", nesterov: bool = False,
         use_phi: bool = False, lmbda: float = 0.0, alpha: float = 1.0, delay: float = 0.0,
         gamma_min: float = 0.0, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """Functional LARS/TVLARS step over one device's and dtype's layers (state tensors updated in place).

    ``momentum_buffers`` are float32 and ``state_steps`` float32 0-dim tensors, on the params' device."""
    if not params:
        return
    bucket = Bucket(params=params, grads=grads, states=[momentum_buffers], steps=state_steps,
                    excluded=excluded if excluded is not None else [False] * len(params))
    hp = LarsHyper(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, norm_clip=norm_clip,
                   sum_of_norms=trust_denominator == "sum_of_norms", nesterov=nesterov, use_phi=use_phi,
                   lmbda=lmbda, alpha=alpha, delay=delay, gamma_min=gamma_min)
    name = _backends.resolve(backend, params[0].device)
    _backends.module(name).lars_step(bucket, hp, grad_scale, found_inf)
