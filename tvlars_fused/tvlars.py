"""TVLARS: time-varying LARS (Do et al., arXiv 2309.14053), as in ``docs/algorithms.md``.

LARS's warm-up is replaced by a sigmoid-shaped factor on the layer-wise trust ratio::

    phi(t) = 1 / (alpha + exp(lmbda * (t - delay))) + gamma_min

so early steps are large (about ``1/alpha + gamma_min`` times the LARS step, to escape sharp minima) and
later ones decay to ``gamma_min`` times it. ``t`` counts this layer's steps from 1; ``delay`` is in steps.
Everything else is :class:`~tvlars_fused.LARS`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._optimizer import LayerwiseOptimizer, storage_defaults, _check_range, exclude_1d
from ._types import LarsHyper
from .lars import LARS


class TVLARS(LARS):
    def __init__(self, params, lr: float | Tensor, momentum: float = 0.9, weight_decay: float = 5e-4,
                 eta: float = 1e-3, lmbda: float = 1e-3, alpha: float = 0.1, delay: float = 0,
                 gamma_min: float = 0.0, eps: float = 0.0, norm_clip: float | None = None,
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
                        exclude=exclude, lmbda=lmbda, alpha=alpha, delay=delay, gamma_min=gamma_min,
                        dampening=dampening, trust_clip=trust_clip, min_trust_ratio=min_trust_ratio,
                        max_trust_ratio=max_trust_ratio, always_adapt=always_adapt,
                        exclude_from_weight_decay=exclude_from_weight_decay,
                        exclude_from_adaptation=exclude_from_adaptation,
                        **storage_defaults(state_dtype, rounding, seed, kahan))
        LayerwiseOptimizer.__init__(self, params, defaults, backend=backend, master_weights=master_weights)

    @classmethod
    def official(cls, params, lr: float | Tensor, **overrides: Any) -> "TVLARS":
        """The authors' code (KhoiDOO/tvlars at b331dcf): alpha=0.1, delay=0, gamma_min=0, both norms
        clipped at 10."""
        settings = dict(alpha=0.1, delay=0, gamma_min=0.0, norm_clip=10.0)
        settings.update(overrides)
        return cls(params, lr, **settings)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check_range("lmbda", group["lmbda"], 0.0)
        _check_range("delay", group["delay"], 0.0)
        _check_range("gamma_min", group["gamma_min"], 0.0)
        if not group["alpha"] > 0:
            raise ValueError(f"Invalid alpha: {group['alpha']!r} (must be > 0, else phi can be infinite)")

    def _hyper(self, group: dict[str, Any], extra=None) -> LarsHyper:
        lars_hp = super()._hyper(group)
        return LarsHyper(**{**lars_hp.__dict__, "use_phi": True, "lmbda": float(group["lmbda"]),
                            "alpha": float(group["alpha"]), "delay": float(group["delay"]),
                            "gamma_min": float(group["gamma_min"])})
