"""The step inside backward: each bucket of layers is stepped as soon as its last gradient is ready, and its
gradients are freed at once (``LayerwiseOptimizer.step_in_backward``).

LARS, TVLARS and LAMB without ``max_grad_norm`` need only a layer's own norms, so a layer can be stepped as soon as
its gradient is final; nothing waits for the whole backward. The layers are grouped into buckets in the order their
gradients become ready, recorded in the first backward (as DDP rebuilds its buckets): within one (param group,
device, dtype), each bucket holds consecutive layers of that order up to ``bucket_mb`` of parameters. Each bucket is
one kept ``Bucket`` stepped by its backend's own ``lars_step`` / ``lamb_step`` (one fused launch for ``cuda``, two for
``triton``, one op call for ``cpp``), so a steady step finds its layer table cached and rebuilds nothing on the host.

Exactness. Every backend's per-layer math depends on the bucket only through its chunking: ``cpp`` on CUDA sizes
its chunks from the bucket's total size, ``triton`` from its largest layer (a layer's sum of squares is the sum of
its chunks' partials, so another chunk size rounds differently). Each bucket here is therefore stepped with the
chunking of the whole (param group, device, dtype) bucket the ordinary ``step()`` would form from the recorded
layers (preset in the bucket's cache), and with the same backend: every parameter and state tensor is bit-identical
to ``backward(); step()``. This holds while the same layers get gradients every iteration (frozen layers and unused
branches included: they are in no bucket).

The loop stays as it is::

    optimizer.step_in_backward(bucket_mb=25)
    for x, y in loader:
        criterion(model(x), y).backward()   # steps each bucket as its last gradient arrives, then frees them
        optimizer.step()                    # steps what backward did not reach; nothing else
        optimizer.zero_grad()               # harmless

The first backward only records the order: its ``step()`` is an ordinary step, which also lets a
``torch.amp.GradScaler`` reveal itself before anything is written (the scaler hands its scale to ``step()``, and a
scaled gradient is known to be finite only after the whole backward: refused). Layers whose gradient does not
arrive in some backward do not block their bucket: at the end of backward the layers of an incomplete bucket that
did get gradients are stepped. ``optimizer.accumulating()`` lets backward accumulate without stepping.

With DDP (``ddp=model``) the buckets are DDP's own: a communication hook steps each bucket as soon as its all-reduce
completes, from the averaged gradients, and ``step()`` then skips what the hook stepped.
"""

from __future__ import annotations

import contextlib
import math
import operator

import torch
from torch import Tensor

from . import _backends, _layer_table
from ._optimizer import LayerwiseOptimizer, _all_reduce_over, _local, _predicates, _sharding
from ._types import Bucket

# The cache entries a backend reads its chunking from: _cpp_backend._chunk_size (CUDA) and
# _triton_backend.launch_sizes. Preset so that a bucket chunks its layers as the whole group's bucket would.
CUDA_CHUNK_KEY = "cuda_chunk"
TRITON_SIZES_KEY = "triton_launch_sizes"


def whole_bucket_chunking(backend: str, params: list[Tensor]) -> dict:
    """The cache entries that make any bucket of some of ``params`` (one param group's layers of one device and
    dtype, local shards when sharded) chunk its layers as a bucket of all of them does in the ordinary step."""
    whole = Bucket(params=params, grads=[], states=[], steps=[], excluded=[], cache={})
    presets = {}
    if backend == "cuda":
        presets[CUDA_CHUNK_KEY] = _backends.module(backend)._chunk_size(whole)
    # triton's too for cuda, which steps with triton where its cooperative launch cannot run (_cpp_backend)
    if backend == "triton" or (backend == "cuda" and _backends.unavailable_reason("triton", whole.device) is None):
        presets[TRITON_SIZES_KEY] = _backends.module("triton").launch_sizes(whole)
    return presets  # cpp (CPU): a fixed chunk; foreach and reference: no chunks


class _Slot:
    """One kept bucket and which of its layers' gradients arrived in this backward."""

    __slots__ = ("group", "backend", "params", "bucket", "ready", "count", "presets", "partial_caches")

    def __init__(self, group: int, backend: str, params: list[Tensor], bucket: Bucket, presets: dict) -> None:
        self.group, self.backend, self.params, self.bucket, self.presets = group, backend, params, bucket, presets
        self.ready = [False] * len(params)
        self.count = 0
        self.partial_caches: dict[tuple, dict] = {}

    def reset(self) -> None:
        if self.count:
            self.ready = [False] * len(self.params)
            self.count = 0


class InBackward:
    """The handle ``step_in_backward`` returns: its hooks and kept buckets. ``remove()`` turns the mode off."""

    def __init__(self, optimizer: LayerwiseOptimizer, bucket_mb: float, ddp=None) -> None:
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not math.isfinite(bucket_mb) \
                or bucket_mb <= 0:
            raise ValueError(f"Invalid bucket_mb: {bucket_mb!r} (must be a finite number of MiB > 0)")
        self._opt = optimizer
        self._bucket_bytes = bucket_mb * 2 ** 20
        self._num_groups = len(optimizer.param_groups)
        self._check_groups()
        self._accumulating = 0
        self._recorded: list[Tensor] | None = None  # the layers in the order their gradients became ready
        self._order: list[Tensor] = []
        self._awaiting_step = False  # the recording backward's layers are stepped by the next step()
        self._slots: list[_Slot] | None = None
        self._slot_of: dict[int, tuple[_Slot, int]] = {}
        self._built_for: tuple | None = None  # what the slots were built from (_stale)
        self._task = None  # the autograd graph task this backward's bookkeeping belongs to
        self._hyper: list | None = None
        self._removed = False
        self._ddp = ddp
        self._ddp_stepped: list[Tensor] = []  # parameters a communication hook stepped since the last step()
        self._ddp_buckets: dict[tuple, tuple] = {}  # per DDP bucket: (what it was built for, its kept buckets)
        if ddp is None:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                             for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        else:
            self._handles = []
            self._register_ddp(ddp)

    # ----------------------------------------------------------------- the handle
    def remove(self) -> None:
        """Back to the ordinary step: hooks removed (a DDP communication hook, which DDP cannot unregister, then
        only all-reduces). Gradients a DDP hook already stepped are dropped, never stepped again."""
        if self._removed:
            return
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._drop_ddp_stepped()
        if self._opt._in_backward is self:
            self._opt._in_backward = None

    @contextlib.contextmanager
    def accumulating(self):
        """Backward inside accumulates gradients without stepping; the next backward outside steps them all (under
        DDP, this is ``ddp.no_sync()``)."""
        self._accumulating += 1
        try:
            with self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext():
                yield
        finally:
            self._accumulating -= 1

    # ----------------------------------------------------------------- checks
    def _check_groups(self) -> None:
        """What the step inside backward cannot do, refused before anything is written."""
        opt, name = self._opt, type(self._opt).__name__
        if len(opt.param_groups) != self._num_groups:
            raise RuntimeError(f"{name}: a param group was added after step_in_backward(), and its layers are in no "
                               "bucket; call remove() on the handle and step_in_backward() again")
        for index, group in enumerate(opt.param_groups):
            if group.get("max_grad_norm") is not None:
                raise ValueError(f"{name}: max_grad_norm of param group {index} is {group['max_grad_norm']!r}; it "
                                 "clips by the global gradient norm, which needs every gradient before any layer is "
                                 "stepped, so it cannot be stepped inside backward (set max_grad_norm=None, or use "
                                 "the ordinary step)")

    def before_step(self, grad_scale, found_inf) -> None:
        """Called by ``step()`` before anything else: refuses a GradScaler, and drops the gradients a DDP hook
        already stepped (DDP writes them back after its hooks) so that they are never stepped twice."""
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError(
                f"{type(self._opt).__name__}: a torch.amp.GradScaler cannot be used with step_in_backward(): a "
                "float16 loss scale is known to have overflowed only after the whole backward, but the step inside "
                "backward has stepped buckets by then. bfloat16 needs no scaler (autocast with dtype=torch.bfloat16); "
                "for float16, call handle.remove() and use the ordinary step")
        self._awaiting_step = False
        if self._ddp is not None and self._ddp_pending:
            self._ddp_pending, self._ddp_live = False, True
        self._drop_ddp_stepped()

    def _drop_ddp_stepped(self) -> None:
        for p in self._ddp_stepped:
            p.grad = None
        self._ddp_stepped = []

    # ----------------------------------------------------------------- single process: per-parameter hooks
    def _on_grad(self, p: Tensor) -> None:
        if self._accumulating:
            return
        task = torch._C._current_graph_task_id()
        if task != self._task or task == -1:
            self._begin_backward(task)
        if self._recorded is None:
            self._order.append(p)
            return
        entry = self._slot_of.get(id(p))
        if entry is None:
            return  # recorded without a gradient (unused, or frozen then): the ordinary step() steps it
        slot, position = entry
        if not slot.ready[position]:
            slot.ready[position] = True
            slot.count += 1
            if slot.count == len(slot.params):
                self._step_slot(slot, None)
                slot.reset()

    def _begin_backward(self, task: int) -> None:
        """The first ready gradient of a backward: checks (before anything is written), the buckets, the
        hyper-parameters of this step, and a callback at the end of backward."""
        if self._recorded is not None:
            if self._awaiting_step:
                self._raise_no_step()
            self._check_step()
            if self._slots is None or self._stale(self._built_for):
                self._build()
            for slot in self._slots:  # a backward that failed half-way left counts behind
                slot.reset()
            self._hyper = [self._opt._hyper(group, None) for group in self._opt.param_groups]
        else:
            self._order = []
        if task != -1:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        self._task = task

    def _raise_no_step(self) -> None:
        raise RuntimeError(f"{type(self._opt).__name__}: backward ran again without optimizer.step() after the first "
                           "backward of step_in_backward(), which only recorded the order of the gradients and "
                           "stepped nothing: call optimizer.step() after it (use optimizer.accumulating() to "
                           "accumulate gradients over several backward passes)")

    def _check_step(self) -> None:
        opt = self._opt
        self._check_groups()
        for index, group in enumerate(opt.param_groups):
            opt._check_changed_hyper_parameters(index, group)
            for p in group["params"]:
                if _layer_table.capturing(p.device):
                    raise RuntimeError(f"{type(opt).__name__}: step_in_backward() cannot be captured in a CUDA graph "
                                       "(its hooks step on the host as gradients arrive); capture the ordinary step")
                break

    def _end_backward(self) -> None:
        """Runs when backward ends: the recording backward's order becomes the buckets; in a stepping backward, the
        layers of incomplete buckets that got gradients are stepped (an unused branch must not block a bucket)."""
        self._task = None
        if self._recorded is None:
            self._recorded, self._order = self._order, []
            self._awaiting_step = True
            return
        for slot in self._slots:
            if slot.count:
                self._step_slot(slot, [i for i, ready in enumerate(slot.ready) if ready])
            slot.reset()

    # ----------------------------------------------------------------- buckets
    def _fingerprint(self) -> tuple:
        opt = self._opt
        return (opt.state, opt._state_version[0],
                tuple(predicate for group in opt.param_groups for predicate in _predicates(group)),
                tuple(tuple(group["params"]) for group in opt.param_groups))

    def _stale(self, built: tuple) -> bool:
        """Whether kept buckets built at ``built`` (a ``_fingerprint``) no longer hold: new state (a checkpoint
        loaded, state replaced), other exclusion predicates, or a param group's list edited."""
        now = self._fingerprint()
        return not (built[0] is now[0] and built[1] == now[1] and len(built[2]) == len(now[2])
                    and all(map(operator.is_, built[2], now[2]))
                    and len(built[3]) == len(now[3])
                    and all(len(a) == len(b) and all(map(operator.is_, a, b)) for a, b in zip(built[3], now[3])))

    def _build(self) -> None:
        """The buckets: the recorded order cut into runs of at most ``bucket_mb`` per (param group, device, dtype),
        each with its state, its backend and the whole group's chunking."""
        opt = self._opt
        group_of = {id(p): index for index, group in enumerate(opt.param_groups) for p in group["params"]}
        by_key: dict[tuple, list[Tensor]] = {}
        for p in self._recorded:
            if id(p) in group_of:
                by_key.setdefault((group_of[id(p)], p.device, p.dtype, _sharding(p)), []).append(p)
        slots = []
        for (index, device, dtype, sharding), params in by_key.items():
            backend = opt._bucket_backend(_backends.resolve(opt.backend, device), dtype, sharding is not None,
                                          opt.param_groups[index])
            presets = whole_bucket_chunking(backend, [_local(p) for p in params])
            run, size = [], 0
            for p in params:
                nbytes = p.numel() * p.element_size()  # the whole layer's size, also for a shard
                if run and size + nbytes > self._bucket_bytes:
                    slots.append(self._slot(index, device, dtype, sharding, backend, run, presets))
                    run, size = [], 0
                run.append(p)
                size += nbytes
            slots.append(self._slot(index, device, dtype, sharding, backend, run, presets))
        self._slots = slots
        self._slot_of = {id(p): (slot, i) for slot in slots for i, p in enumerate(slot.params)}
        self._built_for = self._fingerprint()

    def _slot(self, index, device, dtype, sharding, backend, params, presets) -> _Slot:
        opt = self._opt
        bucket = opt._bucket(index, opt.param_groups[index], device, dtype, params, sharding is not None,
                             cache=dict(presets))
        bucket.grads = []  # assigned at each step
        if sharding is not None:
            bucket.reduce_sums = _all_reduce_over(*sharding)
        return _Slot(index, backend, params, bucket, presets)

    def _step_slot(self, slot: _Slot, positions: list[int] | None) -> None:
        """Steps a bucket (or, at the end of backward, the layers of it that got gradients) and frees their
        gradients."""
        bucket, params = slot.bucket, slot.params
        grads = []
        for p in params if positions is None else [params[i] for i in positions]:
            g = p.grad
            if g.layout is not torch.strided or g.dtype != p.dtype:
                self._opt._reject(p, g, "a parameter stepped inside backward")
            grads.append(_local(g))
        if positions is not None:  # a part of the bucket: its own kept cache, with the whole group's chunking
            key = tuple(positions)
            cache = slot.partial_caches.get(key)
            if cache is None:
                cache = slot.partial_caches[key] = dict(slot.presets)
            bucket.grads = [None] * len(params)
            bucket, params = bucket.subset(positions, cache), [params[i] for i in positions]
        bucket.grads, bucket.grad_ptrs = grads, None
        try:
            with torch.no_grad():
                getattr(_backends.module(slot.backend), self._opt._step_name)(bucket, self._hyper[slot.group],
                                                                              None, None)
        finally:
            bucket.grads = slot.bucket.grads = []  # a kept bucket must not keep this step's gradients alive
        for p in params:
            p.grad = None

    # ----------------------------------------------------------------- DDP: a communication hook per bucket
    def _register_ddp(self, ddp) -> None:
        """Each DDP bucket all-reduced as DDP's default does (divided by the world size, then summed), then its
        layers stepped from the averaged gradients as soon as that completes. DDP's first backward (and any
        backward before the first step()) only all-reduces: that step() is an ordinary one."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ours = {id(p) for group in self._opt.param_groups for p in group["params"]}
        if not any(id(p) in ours for p in ddp.parameters()):
            raise ValueError("step_in_backward(ddp=...): the DDP model holds none of this optimizer's parameters")
        self._ddp_live = False  # a step() followed a synchronised backward
        self._ddp_pending = False  # a synchronised backward ran and its step() has not yet

        def hook(state, bucket):  # DDP checks that the parameter is called `bucket`
            grad_bucket, first = bucket, bucket.index() == 0  # DDP reduces its buckets in order
            future = allreduce_hook(state, grad_bucket)
            if self._removed:
                return future
            if first:
                if self._ddp_pending:
                    self._raise_no_step()
                if not self._ddp_live:
                    self._ddp_pending = True
                else:
                    self._check_step()
                    self._hyper = [self._opt._hyper(group, None) for group in self._opt.param_groups]
            if not self._ddp_live:
                return future
            buffer = grad_bucket.buffer()

            def step_then_pass_on(fut):
                reduced = fut.value()[0]
                self._step_ddp_bucket(grad_bucket, buffer, reduced)
                return reduced

            return future.then(step_then_pass_on)

        ddp.register_comm_hook(None, hook)

    def _step_ddp_bucket(self, grad_bucket, buffer: Tensor, reduced: Tensor) -> None:
        """Steps one DDP bucket's layers, per (param group, dtype), from its all-reduced gradients (views of
        ``reduced`` where DDP's views of ``buffer`` are, which DDP copies into ``p.grad`` afterwards)."""
        params, views = grad_bucket.parameters(), grad_bucket.gradients()
        key = (grad_bucket.index(), tuple(map(id, params)))
        kept = self._ddp_buckets.get(key)
        if kept is None or self._stale(kept[0]):
            kept = self._ddp_buckets[key] = (self._fingerprint(), self._ddp_plan(params))
        if reduced.data_ptr() != buffer.data_ptr():
            size = buffer.element_size()
            views = [reduced.as_strided(v.shape, v.stride(), (v.data_ptr() - buffer.data_ptr()) // size)
                     for v in views]
        with torch.no_grad():  # grad mode is per thread: this may run on the process group's
            for group, backend, bucket, positions in kept[1]:
                bucket.grads, bucket.grad_ptrs = [views[i] for i in positions], None
                try:
                    getattr(_backends.module(backend), self._opt._step_name)(bucket, self._hyper[group], None, None)
                finally:
                    bucket.grads = []
                self._ddp_stepped.extend(params[i] for i in positions)

    def _ddp_plan(self, params: list[Tensor]) -> list:
        """A DDP bucket's layers of this optimizer as kept buckets, one per (param group, dtype), each with the
        chunking of its whole group's bucket."""
        opt = self._opt
        group_of = {id(p): index for index, group in enumerate(opt.param_groups) for p in group["params"]}
        positions: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            if id(p) in group_of:
                positions.setdefault((group_of[id(p)], p.device, p.dtype), []).append(i)
        plan = []
        for (index, device, dtype), where in positions.items():
            group = opt.param_groups[index]
            backend = opt._bucket_backend(_backends.resolve(opt.backend, device), dtype, False, group)
            whole = [p for p in group["params"] if p.requires_grad and p.device == device and p.dtype == dtype]
            bucket = opt._bucket(index, group, device, dtype, [params[i] for i in where], False,
                                 cache=whole_bucket_chunking(backend, whole))
            bucket.grads = []
            plan.append((index, backend, bucket, where))
        return plan
