"""The fused step under ``torch.compile``: one opaque custom op per bucket that runs the eager fused step.

A traced tensor has no address, so a layer table cannot be built while tracing; building one inside the graph
instead would rebuild it, allocate its workspace and upload it at every run of the compiled step, and pinning memory
is not even traceable (``aten._pin_memory`` has no fake implementation). So under tracing a fused backend's bucket
step is recorded as one call of ``tvlars_fused::bucket_lars_step`` / ``bucket_lamb_step``, whose fake
implementation does nothing, and at run time that op runs the eager step on the real tensors it is handed: its
table comes from a cache that lives as long as the optimizer, so a warm compiled step does what a warm eager step
does (one address comparison per layer, then the launch) and builds, allocates and uploads nothing.

What cannot cross an op's schema (the table cache, the optimizer's list of tables kept for CUDA graphs) is lent by an
``Owner`` that the optimizer makes outside any trace and that the graph names by an integer, with the bucket's name
among the owner's buckets (``Bucket.compiled_slot``). Sharded buckets, whose step all-reduces between two op calls,
run outside the graph instead (one graph break each).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _backends
from ._types import Bucket, LambHyper, LarsHyper


@dataclass(eq=False)
class Owner:
    """What an optimizer lends its compiled steps: the tables kept for CUDA graphs, and one table cache per bucket.
    Registered under an integer (the graph holds that number) when the optimizer is made, outside any trace."""

    keep_alive: list | None
    caches: dict = field(default_factory=dict)
    number: int = field(default_factory=lambda: next(_owner_numbers))

    def __post_init__(self) -> None:
        _owners[self.number] = self


_owner_numbers = itertools.count()
_owners: weakref.WeakValueDictionary[int, Owner] = weakref.WeakValueDictionary()
_HAND_MADE = Owner(keep_alive=None)  # buckets made by hand (the functional API): kept for the process's life


def _runtime_bucket(owner: int, key: str, params, grads, states, steps, no_decay, no_adapt, masters, comps,
                    layer_ids, element_offsets) -> Bucket:
    lender = _owners.get(owner)
    if lender is None:
        raise RuntimeError("tvlars_fused: this compiled step belongs to an optimizer that no longer exists")
    return Bucket(params=params, grads=grads, states=states, steps=steps,
                  excluded=[a and b for a, b in zip(no_decay, no_adapt)], no_decay=list(no_decay),
                  no_adapt=list(no_adapt), masters=masters or None, comps=comps or None,
                  layer_ids=list(layer_ids), element_offsets=list(element_offsets),
                  cache=lender.caches.setdefault(key, {}), keep_alive=lender.keep_alive)


def _backend(bucket: Bucket) -> str:
    return "cuda" if bucket.device.type == "cuda" else "cpp"


# The hyper-parameters cross the op's schema as one list of floats, in the dataclass's field order (bools as 0/1, None
# as NaN: a hyper-parameter is never NaN, the optimizer refuses it), so a new option needs no new op argument. Ints
# (the stochastic-rounding seed, below 2**32) are exact in a float64 and come back as ints.
_TENSOR_FIELDS = ("lr", "clip_coef")


def _encode(hp) -> list[float]:
    values = []
    for f in dataclasses.fields(hp):
        if f.name not in _TENSOR_FIELDS:
            value = getattr(hp, f.name)
            values.append(math.nan if value is None else float(value))
    return values


def _decode(cls, values: list[float], lr: float, lr_tensor: Tensor | None, **tensors):
    kwargs = dict(tensors, lr=lr if lr_tensor is None else lr_tensor)
    names = [f for f in dataclasses.fields(cls) if f.name not in _TENSOR_FIELDS]
    for f, value in zip(names, values, strict=True):
        if f.type == "bool":
            kwargs[f.name] = bool(value)
        elif f.type == "int":
            kwargs[f.name] = int(value)
        else:
            kwargs[f.name] = None if math.isnan(value) else value
    return cls(**kwargs)


@torch.library.custom_op("tvlars_fused::bucket_lars_step", mutates_args=("params", "momentum_buffers", "masters",
                                                                          "comps", "steps"))
def _bucket_lars_step(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                      masters: list[Tensor], comps: list[Tensor], steps: list[Tensor], no_decay: list[bool],
                      no_adapt: list[bool], layer_ids: list[int], element_offsets: list[int], lr: float,
                      lr_tensor: Optional[Tensor], grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                      hyper: list[float], owner: int, key: str) -> None:
    bucket = _runtime_bucket(owner, key, params, grads, [momentum_buffers], steps, no_decay, no_adapt, masters, comps,
                             layer_ids, element_offsets)
    hp = _decode(LarsHyper, hyper, lr, lr_tensor)
    _backends.module(_backend(bucket)).lars_step(bucket, hp, grad_scale, found_inf)


@torch.library.custom_op("tvlars_fused::bucket_lamb_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs",
                                                                          "masters", "comps", "steps"))
def _bucket_lamb_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      masters: list[Tensor], comps: list[Tensor], steps: list[Tensor], no_decay: list[bool],
                      no_adapt: list[bool], layer_ids: list[int], element_offsets: list[int], lr: float,
                      lr_tensor: Optional[Tensor], grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                      clip_coef: Optional[Tensor], hyper: list[float], owner: int, key: str) -> None:
    bucket = _runtime_bucket(owner, key, params, grads, [exp_avgs, exp_avg_sqs], steps, no_decay, no_adapt, masters,
                             comps, layer_ids, element_offsets)
    hp = _decode(LambHyper, hyper, lr, lr_tensor, clip_coef=clip_coef)
    _backends.module(_backend(bucket)).lamb_step(bucket, hp, grad_scale, found_inf)


@_bucket_lars_step.register_fake
@_bucket_lamb_step.register_fake
def _no_output(*args, **kwargs) -> None:
    return None


def _lr(lr: float | Tensor) -> tuple[float, Tensor | None]:
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


def _owner_and_key(bucket: Bucket) -> tuple[int, str]:
    """The owner's number and the bucket's name among its buckets: constants of the traced graph."""
    if bucket.compiled_slot is not None:
        return bucket.compiled_slot
    return _HAND_MADE.number, f"{bucket.device}/{bucket.dtype}/{len(bucket)}"


@torch.compiler.disable
def _outside_the_graph(step: Callable, bucket: Bucket, hp, grad_scale: Tensor | None, found_inf: Tensor | None):
    step(bucket, hp, grad_scale, found_inf)


def lars_step(bucket: Bucket, hp: LarsHyper, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Records the bucket's step as one op call (called while tracing)."""
    if bucket.reduce_sums is not None:
        _outside_the_graph(_backends.module(_backend(bucket)).lars_step, bucket, hp, grad_scale, found_inf)
        return
    lr, lr_tensor = _lr(hp.lr)
    torch.ops.tvlars_fused.bucket_lars_step(
        bucket.params, bucket.grads, bucket.states[0], bucket.masters or [], bucket.comps or [], bucket.steps,
        bucket.no_decay, bucket.no_adapt, bucket.layer_ids, bucket.element_offsets, lr, lr_tensor, grad_scale,
        found_inf, _encode(hp), *_owner_and_key(bucket))


def lamb_step(bucket: Bucket, hp: LambHyper, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Records the bucket's step as one op call (called while tracing)."""
    if bucket.reduce_sums is not None:
        _outside_the_graph(_backends.module(_backend(bucket)).lamb_step, bucket, hp, grad_scale, found_inf)
        return
    lr, lr_tensor = _lr(hp.lr)
    exp_avgs, exp_avg_sqs = bucket.states
    torch.ops.tvlars_fused.bucket_lamb_step(
        bucket.params, bucket.grads, exp_avgs, exp_avg_sqs, bucket.masters or [], bucket.comps or [], bucket.steps,
        bucket.no_decay, bucket.no_adapt, bucket.layer_ids, bucket.element_offsets, lr, lr_tensor, grad_scale,
        found_inf, hp.clip_coef, _encode(hp), *_owner_and_key(bucket))
