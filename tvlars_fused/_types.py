"""The data every backend receives: one bucket of layers and the group's hyper-parameters.

A *bucket* is the layers of one param group that share a device and a dtype and have a gradient this
step. Every backend implements the same two functions on it::

    lars_step(bucket: Bucket, hp: LarsHyper, grad_scale: Tensor | None, found_inf: Tensor | None)
    lamb_step(bucket: Bucket, hp: LambHyper, grad_scale: Tensor | None, found_inf: Tensor | None)

They update ``bucket.params`` (and ``bucket.masters``), the state tensors and ``bucket.steps`` in place,
following ``docs/algorithms.md``; they never write to a gradient. ``grad_scale`` (a float32 scalar
tensor) means the gradients are multiplied by it and must be divided by it; ``found_inf`` (float32 scalar
tensor) non-zero means the whole step is skipped: nothing, not even ``steps``, changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a step computes in, and its state's dtype: float32, or float64 for float64 params."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Bucket:
    params: list[Tensor]
    grads: list[Tensor]
    # LARS family: [momentum_buffers]; LAMB: [exp_avgs, exp_avg_sqs]. Same shape as the params; math_dtype, or
    # bfloat16 (``state_dtype=torch.bfloat16``: loaded to float32, stored rounded, docs/algorithms.md section 9).
    states: list[list[Tensor]]
    steps: list[Tensor]  # float32 0-dim tensors on the params' device: times each layer has been stepped
    excluded: list[bool]  # excluded from trust ratio and weight decay (the shorthand for both lists below)
    masters: list[Tensor] | None = None  # float32 master weights of low-precision params, or None
    # Per-bucket scratch that survives across steps (the cached layer tables live here).
    cache: dict = field(default_factory=dict)
    # Sharded parameters (FSDP2 / DTensor): the tensors above are each rank's local shards, and this sums a
    # float64 tensor of per-layer sums of squares over the ranks in place (one all-reduce), so every norm
    # is the norm of the whole layer. None for ordinary tensors.
    reduce_sums: Callable[[Tensor], None] | None = None
    # Where tables read by a launch captured into a CUDA graph are kept for as long as the graph may replay (the
    # optimizer's list); None: nowhere (a bucket made by hand).
    keep_alive: list | None = None
    # Unique per Bucket object, given by its first (eager) layer-table lookup: what the table cache trusts without
    # comparing every address again. The optimizer steps the same object while its plan holds (new gradients
    # assigned to it each step). Not drawn at construction: torch.compile would guard on the counter.
    generation: int | None = None
    # The gradients' data pointers when the optimizer already read them this step (else None: computed on use).
    grad_ptrs: list[int] | None = None
    # Under torch.compile: (the number of the optimizer's _compiled_step.Owner, this bucket's name among its buckets),
    # which name the table cache a compiled step uses at run time; None for a bucket made by hand.
    compiled_slot: tuple[int, str] | None = None
    # Per layer: no weight decay / no trust ratio (q = 1). None: as ``excluded`` (filled in at construction).
    no_decay: list[bool] | None = None
    no_adapt: list[bool] | None = None
    # Kahan compensation of bfloat16 parameters (``kahan=True``): the weight the step reads is param + comp, in
    # float32, and each store splits the new weight into the two (docs/algorithms.md section 9). None: none.
    comps: list[Tensor] | None = None
    # Per layer: its number in the random stream of stochastic rounding (the parameter's index in the optimizer,
    # as state_dict numbers them) and the index, in the whole layer, of its first element here (a shard's offset;
    # 0 for an ordinary tensor). None: 0, 1, 2, ... and zeros (a bucket made by hand).
    layer_ids: list[int] | None = None
    element_offsets: list[int] | None = None

    def __post_init__(self) -> None:
        if self.no_decay is None:
            self.no_decay = list(self.excluded)
        if self.no_adapt is None:
            self.no_adapt = list(self.excluded)
        if self.layer_ids is None:
            self.layer_ids = list(range(len(self.params)))
        if self.element_offsets is None:
            self.element_offsets = [0] * len(self.params)

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype the state is stored in: the math dtype, or bfloat16."""
        return self.states[0][0].dtype if self.states and self.states[0] else math_dtype(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def __len__(self) -> int:
        return len(self.params)

    def subset(self, indices: list[int], cache: dict) -> "Bucket":
        """The same bucket restricted to some layers, with ``cache`` as its own cache."""
        return Bucket(
            params=[self.params[i] for i in indices],
            grads=[self.grads[i] for i in indices],
            states=[[s[i] for i in indices] for s in self.states],
            steps=[self.steps[i] for i in indices],
            excluded=[self.excluded[i] for i in indices],
            no_decay=[self.no_decay[i] for i in indices],
            no_adapt=[self.no_adapt[i] for i in indices],
            masters=None if self.masters is None else [self.masters[i] for i in indices],
            comps=None if self.comps is None else [self.comps[i] for i in indices],
            layer_ids=[self.layer_ids[i] for i in indices],
            element_offsets=[self.element_offsets[i] for i in indices],
            cache=cache,
            reduce_sums=self.reduce_sums,
            keep_alive=self.keep_alive,
        )


@dataclass(frozen=True)
class LarsHyper:
    """LARS and TVLARS: ``use_phi`` False is plain LARS (phi == 1)."""

    lr: float | Tensor
    momentum: float
    weight_decay: float
    eta: float
    eps: float
    norm_clip: float | None
    sum_of_norms: bool  # trust_denominator == "sum_of_norms"
    nesterov: bool
    use_phi: bool
    lmbda: float = 0.0
    alpha: float = 1.0
    delay: float = 0.0
    gamma_min: float = 0.0
    dampening: float = 0.0  # buf = mu * buf + (1 - dampening) * u after a layer's first step
    trust_clip: bool = False  # LARC's clip: q = min(q / lr, 1) on adapted layers
    min_trust_ratio: float | None = None  # bounds of a computed trust ratio (not of the zero-norm q = 1)
    max_trust_ratio: float | None = None
    adapt: bool = True  # False: no layer of the group is adapted (q = 1), as timm when weight_decay == 0
    # How bfloat16 state is stored (docs/algorithms.md section 9): stochastic rounding with the counter-based
    # stream of `seed`, or round-to-nearest. Float32 state ignores both.
    stochastic_rounding: bool = True
    seed: int = 0


@dataclass(frozen=True)
class LambHyper:
    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction: bool
    norm_clip: float | None
    # min(1, max_grad_norm / global_grad_norm) as a float32 device scalar, or None when not clipping.
    clip_coef: Tensor | None = None
    grad_averaging: bool = True  # m = beta1 * m + (1 - beta1) * g; False: m = beta1 * m + g
    decoupled_decay: bool = False  # w *= 1 - lr * beta before the step (AdamW-style), and no beta * w in u
    min_trust_ratio: float | None = None  # bounds of a computed trust ratio (not of the zero-norm q = 1)
    max_trust_ratio: float | None = None
    adapt: bool = True  # False: no layer of the group is adapted (q = 1), as timm when weight_decay == 0
    stochastic_rounding: bool = True  # as LarsHyper's
    seed: int = 0

    @property
    def first_moment_factor(self) -> float:
        """The factor of g in the first-moment update: 1 - beta1 (formed in float64), or 1 without averaging."""
        return 1.0 - self.beta1 if self.grad_averaging else 1.0

    # log(beta) in float64 for the bias correction 1 - beta**t = -expm1(t * log(beta)), which has no
    # cancellation in float32 (1 - 0.999 in float32 is off by 1e-5 relative). beta = 0 gives -inf: 1 - 0 = 1.
    @property
    def log_beta1(self) -> float:
        return math.log(self.beta1) if self.beta1 > 0 else -math.inf

    @property
    def log_beta2(self) -> float:
        return math.log(self.beta2) if self.beta2 > 0 else -math.inf
