"""LAMB (You et al. 2020), as in ``docs/algorithms.md``.

For each layer ``w`` with gradient ``g``, at its step ``t``::

    g  = g * min(1, max_grad_norm / ||all gradients||)       (only when max_grad_norm is set)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g * g
    u  = m_hat / (sqrt(v_hat) + eps) + weight_decay * w    (hats: bias-corrected when bias_correction)
    q  = min(||w||, norm_clip) / ||u||                     (q = 1 when a norm is 0 or w is excluded)
    w  = w - lr * q * u

Exclusion is off by default; excluded layers get neither weight decay nor the trust ratio.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._optimizer import LayerwiseOptimizer, storage_defaults, _check_range, _check_trust_bounds
from ._types import LambHyper


class LAMB(LayerwiseOptimizer):
    _state_keys = ("exp_avg", "exp_avg_sq")
    _step_name = "lamb_step"

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 norm_clip: float | None = 10.0, max_grad_norm: float | None = None,
                 exclude: Callable[[Tensor], bool] | None = None, backend: str = "auto",
                 master_weights: bool = False, *, grad_averaging: bool = True, decoupled_decay: bool = False,
                 min_trust_ratio: float | None = None, max_trust_ratio: float | None = None,
                 always_adapt: bool = True, exclude_from_weight_decay: Callable[[Tensor], bool] | None = None,
                 exclude_from_adaptation: Callable[[Tensor], bool] | None = None,
                 state_dtype: torch.dtype = torch.float32, rounding: str = "stochastic", seed: int = 0,
                 kahan: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        norm_clip=norm_clip, max_grad_norm=max_grad_norm, exclude=exclude,
                        grad_averaging=grad_averaging, decoupled_decay=decoupled_decay,
                        min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio, always_adapt=always_adapt,
                        exclude_from_weight_decay=exclude_from_weight_decay,
                        exclude_from_adaptation=exclude_from_adaptation,
                        **storage_defaults(state_dtype, rounding, seed, kahan))
        super().__init__(params, defaults, backend=backend, master_weights=master_weights)

    @classmethod
    def timm(cls, params, lr: float | Tensor = 1e-3, **overrides: Any) -> "LAMB":
        """timm 1.0's ``Lamb`` with its defaults and branches: global gradient clipping at 1.0, no clip of
        ``||w||``, no exclusion, and a group adapted only when its weight_decay is not 0
        (``always_adapt=False``). timm's ``trust_clip=True`` (LAMBC) is ``max_trust_ratio=1`` here, and its
        ``decoupled_decay`` is ours."""
        settings = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True, norm_clip=None,
                        max_grad_norm=1.0, exclude=None, always_adapt=False)
        if overrides.pop("trust_clip", False):
            settings["max_trust_ratio"] = 1.0
        settings.update(overrides)
        return cls(params, lr, **settings)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check_range("lr", group["lr"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair)")
        _check_range("betas[0]", betas[0], 0.0, 1.0)
        _check_range("betas[1]", betas[1], 0.0, 1.0)
        _check_range("weight_decay", group["weight_decay"], 0.0)
        if not group["eps"] > 0:
            raise ValueError(f"Invalid eps: {group['eps']!r} (must be > 0)")
        for key in ("norm_clip", "max_grad_norm"):
            if group[key] is not None and not group[key] > 0:
                raise ValueError(f"Invalid {key}: {group[key]!r} (must be None or > 0)")
        _check_trust_bounds(group)

    def _before_buckets(self, plans, grad_scale: Tensor | None):
        """The global gradient norm over all layers of all groups, when any group clips by it, in float64 (float64
        sums of squares, like every norm of the package)."""
        if all(group["max_grad_norm"] is None for group in self.param_groups):
            return None
        total = None
        for plan in plans:
            for _, bucket, _ in plan.buckets:
                norms = torch._foreach_norm(bucket.grads, 2, dtype=torch.float64)
                sum_of_squares = torch.stack(norms).square().sum().reshape(1)
                if bucket.reduce_sums is not None:  # sharded: sum the ranks' shards
                    bucket.reduce_sums(sum_of_squares)
                total = sum_of_squares if total is None else total + sum_of_squares.to(total.device)
        if total is None:
            return None
        total = total.sqrt()[0]
        if grad_scale is not None:
            total = total / grad_scale.to(device=total.device, dtype=total.dtype)
        return total

    def _hyper(self, group: dict[str, Any], global_grad_norm: Tensor | None = None) -> LambHyper:
        clip_coef = None
        if group["max_grad_norm"] is not None and global_grad_norm is not None:
            # In float64, for float64 parameters; each backend rounds it once to its working precision (the
            # kernels, which step only float32, bfloat16 and float16 parameters, read a float32 copy).
            clip_coef = (group["max_grad_norm"] / global_grad_norm).clamp(max=1.0)
        beta1, beta2 = group["betas"]
        return LambHyper(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
                         norm_clip=group["norm_clip"], clip_coef=clip_coef,
                         grad_averaging=bool(group["grad_averaging"]), decoupled_decay=bool(group["decoupled_decay"]),
                         min_trust_ratio=group["min_trust_ratio"], max_trust_ratio=group["max_trust_ratio"],
                         adapt=bool(group["always_adapt"]) or group["weight_decay"] != 0,
                         stochastic_rounding=group["rounding"] == "stochastic", seed=int(group["seed"]))
