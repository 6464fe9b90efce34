"""What TVLARS, LARS and LAMB share: validation, state, buckets, backend dispatch, checkpoints.

A step first checks every group (sparse or complex gradients, parameters of one group on several devices,
an unavailable backend) and only then touches state, so bad input leaves every tensor as it was. It then
sorts each group's parameters that have a gradient into buckets by (device, dtype) and hands each bucket to
the backend's ``lars_step`` / ``lamb_step``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import _backends, _compiled_step, _layer_table, _rounding
from ._layer_table import _data_ptr
from ._types import Bucket, math_dtype

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None


def exclude_1d(param: Tensor) -> bool:
    """The default exclusion rule: biases and normalisation weights (``ndim <= 1``)."""
    return param.ndim <= 1


_LOW_PRECISION = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
# Group keys that are code, not data: kept out of state_dict() and kept from the live optimizer on load.
_CODE_KEYS = ("exclude", "exclude_from_weight_decay", "exclude_from_adaptation")
# Group keys that say how state is stored: kept from the live optimizer on load, which converts the checkpoint's
# state to them (float32 state loaded into a bfloat16-state optimizer is rounded to nearest, the reverse widened).
_STORAGE_KEYS = ("state_dtype", "kahan")


def storage_defaults(state_dtype: torch.dtype, rounding: str, seed: int, kahan: bool) -> dict[str, Any]:
    """The group options of state storage every optimizer takes (docs/algorithms.md, section 9)."""
    return dict(state_dtype=state_dtype, rounding=rounding, seed=seed, kahan=kahan)


def _check_storage(group: dict[str, Any]) -> None:
    state_dtype = group["state_dtype"]
    if state_dtype not in _rounding.STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (must be torch.float32 or torch.bfloat16)")
    if group["rounding"] not in _rounding.ROUNDING_MODES:
        raise ValueError(f"Invalid rounding: {group['rounding']!r} (must be 'stochastic' or 'nearest')")
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _rounding.MASK32:
        raise ValueError(f"Invalid seed: {seed!r} (must be an int in [0, 2**32))")
    if not isinstance(group["kahan"], bool):
        raise ValueError(f"Invalid kahan: {group['kahan']!r} (must be True or False)")


def _state_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
    """The dtype of a parameter's momentum or moments: bfloat16 when the group asks for it, else the math dtype."""
    return torch.bfloat16 if group["state_dtype"] == torch.bfloat16 else math_dtype(p.dtype)


def _check_range(name: str, value, low: float, high: float | None = None, *, open_high: bool = True) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if torch.compiler.is_compiling() or _layer_table.capturing(value.device):
            return  # its value is not readable in a trace, and reading it would synchronise a graph capture
        value = value.item()
    ok = math.isfinite(value) and value >= low and (high is None or (value < high if open_high else value <= high))
    if not ok:  # not finite: an infinite lr, lmbda or delay would step to inf or NaN (inf * 0 at t == delay)
        bound = "" if high is None else (f", {high})" if open_high else f", {high}]")
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and in [{low}{bound or ', inf)'})")


def _check_trust_bounds(group: dict[str, Any]) -> None:
    """min_trust_ratio and max_trust_ratio: None, or finite and >= 0 (max > 0), min <= max."""
    low, high = group["min_trust_ratio"], group["max_trust_ratio"]
    if low is not None:
        _check_range("min_trust_ratio", low, 0.0)
    if high is not None:
        _check_range("max_trust_ratio", high, 0.0)
        if not high > 0:
            raise ValueError(f"Invalid max_trust_ratio: {high!r} (must be None or > 0)")
    if low is not None and high is not None and low > high:
        raise ValueError(f"Invalid min_trust_ratio: {low!r} is above max_trust_ratio {high!r}")


def _snapshot(value):
    """A hyper-parameter's value to compare with a later one: tensors by identity (comparing their values would
    read the device), lists and tuples as tuples (a list edited in place compares unequal to its copy)."""
    if isinstance(value, Tensor):
        return "tensor", id(value)
    if isinstance(value, (list, tuple)):
        return tuple(map(_snapshot, value))
    return value


def _sharding(t: Tensor):
    """(mesh, placements) of a DTensor, None for an ordinary tensor."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.device_mesh, tuple(t.placements)
    return None


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (in-place updates of it update the DTensor), else the tensor itself."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


def _element_offset(t: Tensor) -> int:
    """The index, in the whole (row-major) tensor, of a DTensor's local shard's first element: for FSDP2's Shard(0)
    every local element's index is then its index in the whole layer, so stochastic rounding draws the bits an
    unsharded step draws."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    strides = torch.empty(0).new_empty(t.shape, device="meta").stride()
    return sum(o * s for o, s in zip(offset, strides))


def _all_reduce_over(mesh, placements) -> Callable[[Tensor], None]:
    """Sum over the mesh dimensions along which the tensors are sharded (replicated ones hold copies)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    groups = [mesh.get_group(dim) for dim, placement in enumerate(placements) if isinstance(placement, Shard)]
    if len(placements) != sum(isinstance(pl, Shard) for pl in placements) + sum(
            type(pl).__name__ == "Replicate" for pl in placements):
        raise ValueError(f"sharded parameters with placements {placements} are not supported "
                         "(only Shard and Replicate)")

    def reduce_sums(sums: Tensor) -> None:
        for group in groups:
            dist.all_reduce(sums, group=group)

    return reduce_sums


def _skip_on_every_rank(found_inf: Tensor, plans: list[_GroupPlan]) -> Tensor:
    """GradScaler's inf flag, summed over the ranks when buckets are sharded: an inf in one rank's shard
    must skip the step on every rank, else the ranks would update different shards and issue different
    collectives. One all-reduce per sharded bucket (every rank has the same buckets); none otherwise."""
    reducers = [(bucket.device, bucket.reduce_sums) for plan in plans for _, bucket, _ in plan.buckets
                if bucket.reduce_sums is not None]
    if not reducers:
        return found_inf
    flag = found_inf.to(torch.float32).reshape(1).clone()
    for device, reduce_sums in reducers:
        flag = flag.to(device)
        reduce_sums(flag)
    return flag.reshape(()).to(found_inf.device)


@dataclass(eq=False)
class _GroupPlan:
    """A group's buckets, kept while the group steps the same parameters with the same ones having gradients, so
    that a steady step does one identity pass instead of re-sorting every parameter and re-reading its state."""

    params: list[Tensor]  # the group's parameters when planned (compared by identity)
    with_grad: list[bool]  # which of them had a gradient
    state: object  # the optimizer's state dict when planned (replaced wholesale by a reset or a load)
    state_version: int  # the count of changes to the layers' state dicts when planned
    exclude: tuple  # the group's exclusion predicates when planned (_predicates)
    storage: tuple  # the group's state storage options when planned (_STORAGE_KEYS)
    buckets: list  # (backend, bucket, positions in `params` of the bucket's layers)
    reusable: bool  # False for sharded (DTensor) groups, whose local views are taken afresh each step
    all_with_grad: bool = False  # every parameter had a gradient


_NONES = itertools.repeat(None)


def _predicates(group: dict[str, Any]) -> tuple:
    return tuple(group.get(key) for key in _CODE_KEYS)


def _same_predicates(group: dict[str, Any], planned: tuple) -> bool:
    return all(group.get(key) is predicate for key, predicate in zip(_CODE_KEYS, planned))


class _LayerState(dict):
    """One parameter's state dict, which counts the changes made to it (``version[0]``, shared by the optimizer's
    layers): a kept plan holds the state tensors, so a tensor replaced by assignment must invalidate it. In-place
    changes of the tensors need nothing: the plan holds the same tensors."""

    __slots__ = ("version",)

    def __init__(self, items, version: list[int]) -> None:
        super().__init__(items)
        self.version = version

    def _changed(self) -> None:
        self.version[0] += 1

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key, default=None):
        self._changed()
        return super().setdefault(key, default)

    def __reduce__(self):  # pickles (torch.save, deepcopy) as a plain dict
        return dict, (dict(self),)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base of the package's optimizers. Subclasses set ``_state_keys`` and ``_step_name`` and implement
    ``_validate_group`` and ``_hyper``."""

    _state_keys: tuple[str, ...] = ()
    _step_name: str = ""

    def __init__(self, params, defaults: dict[str, Any], backend: str = "auto",
                 master_weights: bool = False) -> None:
        if backend not in _backends.BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (must be one of {', '.join(_backends.BACKENDS)})")
        self.backend = backend
        self.master_weights = bool(master_weights)
        self._init_caches()
        super().__init__(params, defaults)

    def _init_caches(self) -> None:
        self._bucket_caches: dict[tuple, dict] = {}
        self._plans: dict[int, _GroupPlan] = {}
        self._state_version = [0]  # changes to any layer's state dict (_LayerState)
        # Layer tables read by launches captured into CUDA graphs: kept for the optimizer's life, since a graph may
        # replay at any time and its launches read them (not freed by a rebuild, a cache clear or a checkpoint load).
        self._graph_tables: list = []
        self._valid_hyper_parameters: dict[int, list] = {}  # per group: the values last found valid
        self._compiled_owner = _compiled_step.Owner(keep_alive=self._graph_tables)  # what compiled steps borrow
        self._in_backward = None  # step_in_backward()'s handle while that mode is on (never copied or pickled)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_plans" not in self.__dict__:  # unpickled or deep-copied: Optimizer.__getstate__ drops the caches
            self.__dict__.setdefault("backend", "auto")
            self.__dict__.setdefault("master_weights", False)
            self._init_caches()
        self._plans.clear()  # the state may have been replaced

    @property
    def chosen_backends(self) -> list[dict[str, Any]]:
        """The backend each (param group, device, dtype) bucket steps with: what ``backend="auto"`` chose (and where a
        fused backend hands float64 or sharded layers to ``foreach``). Read-only; one dict per bucket."""
        chosen = []
        for index, group in enumerate(self.param_groups):
            kinds = {}
            for p in group["params"]:
                kinds.setdefault((p.device, p.dtype, _sharding(p) is not None), None)
            for device, dtype, sharded in kinds:
                backend = self._bucket_backend(_backends.resolve(self.backend, device), dtype, sharded, group)
                if backend in ("cuda", "cpp") and not sharded:  # the kernel's fallback, if it had to take one
                    backend = _backends.module(backend).stepping_backend(device)
                chosen.append(dict(group=index, device=str(device), dtype=str(dtype).replace("torch.", ""),
                                   backend=backend))
        return chosen

    def __repr__(self) -> str:
        text = super().__repr__()
        summary = ", ".join(f"group {c['group']} {c['device']} {c['dtype']}: {c['backend']}"
                            for c in self.chosen_backends)
        return text[:-1] + f"backend: {self.backend} ({summary})\n)" if text.endswith(")") else text

    # ----------------------------------------------------------------- groups and validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError  # each optimizer checks its own hyper-parameters

    def _check_hyper_parameters(self, group: dict[str, Any]) -> None:
        self._validate_group(group)
        _check_storage(group)
        if group["kahan"] and self.master_weights:
            raise ValueError("Invalid kahan: kahan=True and master_weights=True are two ways of keeping the bits a "
                             "bfloat16 weight loses; choose one (kahan: 2 more bytes per weight, masters: 4)")
        for key in _CODE_KEYS:
            predicate = group.get(key)
            if predicate is not None and not callable(predicate):
                raise ValueError(f"Invalid {key}: {predicate!r} (must be None or a predicate on a parameter)")

    def _check_changed_hyper_parameters(self, index: int, group: dict[str, Any]) -> None:
        """Checks a group's hyper-parameters again when any changed since they were last found valid: a scheduler,
        a loaded checkpoint or a hand-edit of ``param_groups`` can set what the constructor would refuse. Compared by
        value (tensors by identity), so a steady step costs one comparison per group. A traced step checks the
        values it is traced with (it is traced again when a guarded value changes)."""
        if torch.compiler.is_compiling():
            self._check_hyper_parameters(group)
            return
        values = [(key, _snapshot(value)) for key, value in group.items() if key != "params"]
        if self._valid_hyper_parameters.get(index) != values:
            self._check_hyper_parameters(group)
            self._check_storage_fits(index, group, group["params"])
            self._valid_hyper_parameters[index] = values

    def _check_storage_fits(self, index: int, group: dict[str, Any], params: list[Tensor]) -> None:
        """bfloat16 state for float64 parameters, or Kahan compensation of parameters that are not bfloat16, would be
        a silent loss or a no-op: refused, naming the parameter."""
        kahan, bf16_state = group["kahan"], group["state_dtype"] == torch.bfloat16
        if not (kahan or bf16_state):
            return
        for position, p in enumerate(params):
            if kahan and p.dtype != torch.bfloat16:
                raise ValueError(f"{type(self).__name__}: kahan=True, but parameter {position} of param group {index} "
                                 f"is {p.dtype}; Kahan compensation is for bfloat16 parameters (put the others in a "
                                 "param group with kahan=False)")
            if bf16_state and p.dtype == torch.float64:
                raise ValueError(f"{type(self).__name__}: state_dtype=torch.bfloat16, but parameter {position} of "
                                 f"param group {index} is float64; keep float64 state for it (a param group with "
                                 "state_dtype=torch.float32)")

    def _check_distinct(self, index: int, params: list[Tensor]) -> None:
        """torch.optim warns about a parameter listed twice in a group; a fused launch would update it twice at once
        (on a GPU, a race), so here it is an error."""
        if len({id(p) for p in params}) == len(params):
            return
        first: dict[int, int] = {}
        for position, p in enumerate(params):
            if id(p) in first:
                raise ValueError(f"{type(self).__name__}: param group {index} lists the same parameter twice (positions "
                                 f"{first[id(p)]} and {position}); list each parameter once")
            first[id(p)] = position

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._in_backward is not None:  # its layers would be in no bucket of the step inside backward
            raise RuntimeError(f"{type(self).__name__}: add_param_group() while step_in_backward() is on; call "
                               "remove() on its handle, add the group, then step_in_backward() again")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_distinct(len(self.param_groups) - 1, group["params"])
            self._check_hyper_parameters(group)
            self._check_storage_fits(len(self.param_groups) - 1, group, group["params"])
            for device in {p.device for p in group["params"]}:
                _backends.resolve(self.backend, device)
        except Exception:
            self.param_groups.pop()
            raise

    # ----------------------------------------------------------------- AMP
    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True when every parameter goes through a fused backend, which unscales and skips in-kernel.

        ``torch.amp.GradScaler`` then hands ``grad_scale`` / ``found_inf`` to ``step`` instead of unscaling
        the gradients itself and synchronising with the host."""
        if self._in_backward is not None:
            return True  # so that a GradScaler hands its scale to step(), which refuses it (_in_backward)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        return bool(devices) and all(
            _backends.resolve(self.backend, d) in _backends.FUSED_BACKENDS for d in devices)

    # ----------------------------------------------------------------- the step inside backward
    def step_in_backward(self, bucket_mb: float = 25.0, *, ddp=None):
        """From now on backward steps the parameters: each bucket of layers (at most ``bucket_mb`` MiB of
        parameters, in the order their gradients become ready) is stepped by one fused launch as soon as its last
        gradient arrives, and its gradients are freed at once. The first backward records that order (its
        ``step()`` is an ordinary one); ``step()`` then steps only what backward did not reach. Bit-identical to
        ``backward(); step()`` with the same backend (``_in_backward.py`` says why and when).

        Refused: LAMB's ``max_grad_norm`` (a global norm needs every gradient first), a ``GradScaler`` (overflow
        is known only after the whole backward; bfloat16 needs none), a param group added afterwards, CUDA graph
        capture. ``ddp``: a ``DistributedDataParallel`` model whose buckets are stepped in a communication hook
        right after their all-reduce. Returns a handle: ``handle.remove()`` goes back to the ordinary step."""
        from ._in_backward import InBackward

        if self._in_backward is not None:
            raise RuntimeError(f"{type(self).__name__}: step_in_backward() is already on; call remove() on the "
                               "handle it returned before turning it on again")
        self._in_backward = InBackward(self, bucket_mb, ddp)
        return self._in_backward

    def accumulating(self):
        """A context in which backward accumulates gradients without stepping them (``step_in_backward``); the next
        backward outside it steps. Does nothing in the ordinary mode, where backward never steps."""
        if self._in_backward is None:
            return contextlib.nullcontext()
        return self._in_backward.accumulating()

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if self._in_backward is not None:  # what backward stepped has no gradient left: stepped once
            self._in_backward.before_step(grad_scale, found_inf)

        # Every group is checked before any state is created or any tensor is written.
        planned = []
        for index, group in enumerate(self.param_groups):
            self._check_changed_hyper_parameters(index, group)
            plan = self._reuse_plan(index, group)
            checked = None if plan is not None else self._check(index, group)
            self._check_capturable(index, group, plan, checked)
            planned.append((plan, checked))
        plans = [plan if plan is not None else self._plan(index, group, *checked)
                 for (index, group), (plan, checked) in zip(enumerate(self.param_groups), planned)]
        try:
            if found_inf is not None:
                found_inf = _skip_on_every_rank(found_inf, plans)
            extra = self._before_buckets(plans, grad_scale)
            for group, plan in zip(self.param_groups, plans):
                hp = self._hyper(group, extra)
                for backend, bucket, _ in plan.buckets:
                    step_fn = getattr(_backends.module(backend), self._step_name)
                    step_fn(bucket, hp, grad_scale, found_inf)
        finally:
            for plan in plans:  # a kept plan must not keep this step's gradients alive
                for _, bucket, _ in plan.buckets:
                    bucket.grads, bucket.grad_ptrs = [], None
        return loss

    def _check_capturable(self, index: int, group: dict[str, Any], plan: _GroupPlan | None, checked) -> None:
        """While a CUDA graph is being captured, refuse (before anything is written) what would read the device on the
        host (illegal in a capture), bake in a copy that replays stale, or create state inside the graph (each replay
        would create it again: the step count, momentum and master weights would reset at every replay); each error
        says what to do instead."""
        if plan is not None:
            kinds = [(backend, bucket.device, bucket.params) for backend, bucket, _ in plan.buckets]
        else:
            with_grad, backends = checked
            by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in with_grad:
                by_kind[(p.device, p.dtype, _sharding(p) is not None)].append(p)
            kinds = [(self._bucket_backend(backends[device], dtype, sharded, group), device, params)
                     for (device, dtype, sharded), params in by_kind.items()]
        for backend, device, params in kinds:
            if not _layer_table.capturing(device):
                continue
            name = type(self).__name__
            if backend == "reference":
                raise RuntimeError(f"{name}: backend='reference' reads norms on the host and cannot be captured in "
                                   "a CUDA graph; use backend='cuda', 'triton' or 'foreach'")
            lr = group["lr"]
            if isinstance(lr, Tensor) and (lr.device != device or lr.dtype != torch.float32):
                raise RuntimeError(f"{name}: lr is a {lr.dtype} tensor on {lr.device}; a captured step would copy it "
                                   f"once and replay that copy. Pass lr as a float32 tensor on {device} (updated in "
                                   "place) to capture the step")
            for p in params:
                state = self.state.get(p)
                missing = "optimizer state" if not state else "master weight" if (
                    self.master_weights and p.dtype in _LOW_PRECISION and "master_weight" not in state) else \
                    "Kahan compensation" if group["kahan"] and "kahan_comp" not in state else None
                if missing is not None:
                    position = next(i for i, q in enumerate(group["params"]) if q is p)
                    raise RuntimeError(f"{name}: parameter {position} of param group {index} has no {missing} yet, "
                                       "and state created inside a CUDA graph capture would be created again (reset) "
                                       "at every replay. Take one ordinary step (a warm-up iteration, as "
                                       "torch.cuda.graph's recipe does on a side stream) before capturing")

    def _reuse_plan(self, index: int, group: dict[str, Any]) -> _GroupPlan | None:
        """The group's plan from the last step when it still holds (same parameters, the same ones with gradients,
        all dense, same state and exclusion), with this step's gradients put into its buckets; else None."""
        if torch.compiler.is_compiling():  # a traced step is planned once per trace; addresses do not exist there
            return None
        plan = self._plans.get(index)
        if plan is None or not plan.reusable or plan.state is not self.state or \
                plan.state_version != self._state_version[0] or not _same_predicates(group, plan.exclude) or \
                plan.storage != tuple(group[key] for key in _STORAGE_KEYS):
            return None
        params = group["params"]
        if len(params) != len(plan.params) or not all(map(operator.is_, params, plan.params)):
            return None
        grads = [p.grad for p in params]
        if list(map(operator.is_not, grads, _NONES)) != plan.with_grad:
            return None
        present = grads if plan.all_with_grad else [g for g in grads if g is not None]
        try:  # the addresses the layer tables compare; a sparse gradient has none (_check then says what is wrong)
            grad_ptrs = list(map(_data_ptr, present))
        except RuntimeError:
            return None
        for _, bucket, positions in plan.buckets:
            if positions is None:
                bucket.grads, bucket.grad_ptrs = present, grad_ptrs
            else:
                bucket.grads = [grads[i] for i in positions]
                bucket.grad_ptrs = list(map(_data_ptr, bucket.grads))
        return plan

    def _before_buckets(self, plans, grad_scale: Tensor | None):
        """Work over all groups before any bucket is stepped (LAMB's global gradient norm)."""
        return None

    def _check(self, index: int, group: dict[str, Any]):
        """A group's parameters that have a gradient, and the backend of each device, after checking them.

        Every group is checked before any state is created or any tensor is written."""
        self._check_distinct(index, group["params"])  # the list may have been edited since add_param_group
        with_grad = []
        for position, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.layout is not torch.strided or g.dtype not in _FLOAT_DTYPES:  # one cheap test per step
                self._reject(p, g, f"parameter {position} of param group {index}")
            self._check_state(p, group, f"parameter {position} of param group {index}")
            with_grad.append(p)
        self._check_storage_fits(index, group, group["params"])
        if not torch.compiler.is_compiling():  # traced tensors have no addresses
            self._check_no_shared_memory(index, group["params"], with_grad)
        self._exclusions(index, group, with_grad)  # a predicate that raises does so before any state is created
        devices = {p.device for p in with_grad}
        if len(devices) > 1:
            raise RuntimeError(f"{type(self).__name__}: the parameters of param group {index} are on several devices "
                               f"({', '.join(sorted(map(str, devices)))}); put each device's parameters "
                               "in a param group of its own")
        backends = {d: _backends.resolve(self.backend, d) for d in devices}
        return with_grad, backends

    def _check_state(self, p: Tensor, group: dict[str, Any], where: str) -> None:
        """A parameter's existing state (from load_state_dict or assigned by hand) must fit it: checked with the
        rest of the step's input, so that a checkpoint of another model fails before any group is stepped."""
        state = self.state.get(p)
        if not state:
            return  # created at this step
        dtype = _state_dtype(group, p)
        expected = {key: (tuple(p.shape), dtype) for key in self._state_keys}
        expected["step"] = ((), torch.float32)
        if "master_weight" in state:
            expected["master_weight"] = (tuple(p.shape), torch.float32)
        if "kahan_comp" in state:
            expected["kahan_comp"] = (tuple(p.shape), p.dtype)
        for key, (shape, key_dtype) in expected.items():
            value = state.get(key)
            if not isinstance(value, Tensor):
                raise ValueError(f"{type(self).__name__}: the state of {where} has no tensor {key!r} "
                                 f"(it has {sorted(state)}); was the state dict saved by another optimizer?")
            if tuple(value.shape) != shape or value.dtype != key_dtype or value.device != p.device:
                raise ValueError(f"{type(self).__name__}: state {key!r} of {where} is a {value.dtype} tensor of shape "
                                 f"{tuple(value.shape)} on {value.device}; the parameter needs {key_dtype}, shape "
                                 f"{shape} on {p.device} (a checkpoint of another model?)")

    def _check_no_shared_memory(self, index: int, params: list[Tensor], with_grad: list[Tensor]) -> None:
        """Two parameters whose memory overlaps (``b.weight.data = a.weight.data`` ties them as two Parameters) would
        be updated at once by one fused launch, each from its own gradient and state: refused, never raced."""
        spans: dict[torch.device, list] = defaultdict(list)  # per device: (first byte, end, parameter)
        for param in with_grad:
            t = param.to_local() if _sharding(param) is not None else param  # a shard: what this rank writes
            numel = t.numel()
            if numel == 0:
                continue
            start, size = t.data_ptr(), t.element_size()
            if t.is_contiguous():
                spans[t.device].append((start, start + numel * size, param))
                continue
            last = sum((n - 1) * abs(stride) for n, stride in zip(t.shape, t.stride()))  # the farthest element
            start -= size * sum((n - 1) * -stride for n, stride in zip(t.shape, t.stride()) if stride < 0)
            spans[t.device].append((start, start + (last + 1) * size, param))
        for on_device in spans.values():
            on_device.sort(key=operator.itemgetter(0))
            for (_, end_a, a), (start_b, _, b) in zip(on_device, on_device[1:]):
                if start_b < end_a:
                    position = {id(p): i for i, p in enumerate(params)}
                    first, second = sorted((position[id(a)], position[id(b)]))
                    raise ValueError(f"{type(self).__name__}: parameters {first} and {second} of param group {index} "
                                     "share memory; tie shared weights as one Parameter "
                                     "(module.b.weight = module.a.weight)")

    def _reject(self, p: Tensor, g: Tensor, where: str) -> None:
        name = type(self).__name__
        if g.layout is not torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients ({where}, layout {g.layout})")
        if p.is_complex() or g.is_complex():
            raise ValueError(f"{name} does not support complex parameters or gradients ({where}, "
                             f"dtype {g.dtype}); view them as real with torch.view_as_real")
        raise ValueError(f"{name} needs floating-point parameters ({where} has dtype {p.dtype})")

    def _plan(self, index: int, group: dict[str, Any], with_grad: list[Tensor], backends: dict) -> _GroupPlan:
        """The group's buckets by (device, dtype), with their backend (state is initialised here)."""
        by_key: dict[tuple, list[int]] = defaultdict(list)
        position = {id(p): i for i, p in enumerate(group["params"])}
        for p in with_grad:
            by_key[(p.device, p.dtype, _sharding(p))].append(position[id(p)])
        params = list(group["params"])
        buckets = []
        for (device, dtype, sharding), positions in by_key.items():
            layer_params = [params[i] for i in positions]
            bucket = self._bucket(index, group, device, dtype, layer_params, sharded=sharding is not None)
            backend = self._bucket_backend(backends[device], dtype, sharding is not None, group)
            if sharding is not None:
                bucket.reduce_sums = _all_reduce_over(*sharding)
            in_order = len(by_key) == 1 and len(positions) == len(params)
            buckets.append((backend, bucket, None if in_order else positions))
        plan = _GroupPlan(params=params, with_grad=[p.grad is not None for p in params], state=self.state,
                          state_version=self._state_version[0], exclude=_predicates(group),
                          storage=tuple(group[key] for key in _STORAGE_KEYS), buckets=buckets,
                          reusable=all(key[2] is None for key in by_key),
                          all_with_grad=len(with_grad) == len(params))
        self._plans[index] = plan
        return plan

    @staticmethod
    def _bucket_backend(backend: str, dtype: torch.dtype, sharded: bool, group: dict[str, Any] | None = None) -> str:
        """The backend a bucket of ``dtype`` of ``group`` steps with when its device's backend is ``backend``."""
        if backend in _backends.FUSED_BACKENDS and dtype not in _KERNEL_DTYPES:
            return "foreach"  # float64: the kernels compute in float32, foreach keeps float64
        if backend in _backends.FUSED_BACKENDS and group is not None and \
                (group["state_dtype"] == torch.bfloat16 or group["kahan"]) and \
                not getattr(_backends.module(backend), "supports_bf16_storage", False):
            return "foreach"
        # Whole-layer norms of sharded layers need the ranks' local sums of squares added (one all-reduce per
        # bucket): a fused backend that splits its step around reduce_sums says so with `supports_sharded`; the
        # others' sharded buckets take foreach's path.
        if sharded and backend in _backends.FUSED_BACKENDS and \
                not getattr(_backends.module(backend), "supports_sharded", False):
            return "foreach"
        return backend

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        if type(state) is not _LayerState:
            state = self.state[p] = _LayerState(state, self._state_version)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for key in self._state_keys:
                state[key] = torch.zeros_like(p, dtype=_state_dtype(group, p), memory_format=torch.preserve_format)
        if self.master_weights and p.dtype in _LOW_PRECISION and "master_weight" not in state:
            state["master_weight"] = p.detach().to(torch.float32, memory_format=torch.preserve_format,
                                                   copy=True)
        if group["kahan"] and "kahan_comp" not in state:  # a bfloat16 weight is exactly itself: no rest yet
            state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _bucket(self, index, group, device, dtype, params: list[Tensor], sharded: bool,
                cache: dict | None = None) -> Bucket:
        """``cache``: the bucket's own (a bucket the step inside backward keeps), else the optimizer's for these
        layers."""
        states = [self._init_state(p, group) for p in params]
        if cache is None:
            cache_key = (index, device, dtype, tuple(map(id, params)))
            cache = self._bucket_caches.get(cache_key)
            if cache is None:
                if len(self._bucket_caches) >= 64:  # layer sets that keep changing: keep memory bounded
                    self._bucket_caches.clear()
                cache = self._bucket_caches[cache_key] = {}
        predicates = _predicates(group)
        cached = cache.get("excluded")
        if cached is None or not all(map(operator.is_, cached[0], predicates)):
            cached = cache["excluded"] = (predicates, *self._exclusions(index, group, params))
        local = _local if sharded else (lambda t: t)
        masters = None
        if self.master_weights and dtype in _LOW_PRECISION:
            masters = [local(s["master_weight"]) for s in states]
        number = {id(q): k for k, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return Bucket(
            params=[local(p) for p in params],
            grads=[local(p.grad) for p in params],
            states=[[local(s[key]) for s in states] for key in self._state_keys],
            steps=[s["step"] for s in states],
            excluded=cached[1],
            no_decay=cached[2],
            no_adapt=cached[3],
            masters=masters,
            comps=[local(s["kahan_comp"]) for s in states] if group["kahan"] else None,
            layer_ids=[number[id(p)] for p in params],
            element_offsets=[_element_offset(p) for p in params] if sharded else None,
            cache=cache,
            keep_alive=self._graph_tables,
            compiled_slot=(self._compiled_owner.number, f"{index}/{device}/{dtype}/{len(params)}"),
        )

    def _exclusions(self, index: int, group: dict[str, Any], params: list[Tensor]) -> tuple[list[bool], ...]:
        """Per layer: excluded (``exclude``), and with no weight decay / no trust ratio (``exclude`` or the
        predicate of its own). A predicate that raises is named, with the parameter it raised on."""
        position = {id(p): i for i, p in enumerate(group["params"])}
        columns = []
        for key in _CODE_KEYS:
            predicate = group.get(key)
            column = []
            for p in params:
                try:
                    column.append(bool(predicate(p)) if predicate is not None else False)
                except Exception as exc:
                    raise ValueError(f"{type(self).__name__}: the {key} predicate of param group {index} raised on "
                                     f"parameter {position[id(p)]} (shape {tuple(p.shape)}): {exc!r}") from exc
            columns.append(column)
        excluded, no_decay, no_adapt = columns
        return (excluded, [a or b for a, b in zip(excluded, no_decay)],
                [a or b for a, b in zip(excluded, no_adapt)])

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["state"] = {key: dict(value) for key, value in state_dict["state"].items()}  # plain dicts
        for group in state_dict["param_groups"]:
            for key in _CODE_KEYS:
                group.pop(key, None)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``torch.optim.Optimizer.load_state_dict``, but state keeps its precision (float32, float64 for
        float64 parameters: a bf16 parameter's momentum and master weight are not down-cast) and ``step``
        moves to the parameter's device, so a checkpoint from any backend or device loads into any other."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} of the loaded state dict has {len(saved['params'])} "
                                 f"parameters, this optimizer's has {len(group['params'])}")
        id_to_param = {
            saved_id: (p, group)
            for saved, group in zip(saved_groups, self.param_groups)
            for saved_id, p in zip(saved["params"], group["params"])
        }
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for saved_id, saved_state in state_dict["state"].items():
            p, group = id_to_param.get(saved_id, (None, None))
            if p is None:
                continue
            for key, value in saved_state.items():
                if key == "kahan_comp" and not group["kahan"]:
                    continue  # the bits below the bfloat16 weight: dropped without Kahan compensation
                if isinstance(value, Tensor):
                    dtype = torch.float32 if key in ("step", "master_weight") else p.dtype if key == "kahan_comp" \
                        else _state_dtype(group, p)  # a state tensor: rounded to nearest or widened
                    value = value.detach().to(device=p.device, dtype=dtype, copy=True)
                state[p][key] = deepcopy(value) if not isinstance(value, Tensor) else value
        param_groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            new_group = {key: deepcopy(value) for key, value in saved.items() if key != "params"}
            for key in _CODE_KEYS + _STORAGE_KEYS:
                if key in group:
                    new_group[key] = group[key]
            for key, value in group.items():  # options a checkpoint of an earlier version does not have
                new_group.setdefault(key, value)
            new_group["params"] = group["params"]
            param_groups.append(new_group)
        self.__setstate__({"state": state, "param_groups": param_groups})  # clears the plans too
        self._bucket_caches.clear()
