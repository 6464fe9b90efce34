"""Running the cases: who competes (contenders), how a step is timed, and what is recorded per case.

A case is (parameter set, dtype, optimizer, contender). Parameters and gradients of a set are made once,
seeded, before any timing; every contender then builds its own optimizer on them, so the timed region is
``optimizer.step()`` and nothing else. The contenders of one (set, dtype, optimizer), the torch floor of that
optimizer and the bandwidth yardstick are timed in interleaved rounds (see ``run``), and every ratio is the
median of ratios taken within each round.
"""

from __future__ import annotations

import gc
import glob
import importlib
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

import tvlars_fused
from tvlars_fused import LAMB, LARS, TVLARS

from . import byte_model
from .eager_loop import EagerLoopLAMB, EagerLoopLARS
from .param_sets import ParamSet

OPTIMIZERS = ("tvlars", "lars", "lamb")
OUR_BACKENDS = ("reference", "foreach", "triton", "cuda", "cpp")
# Same hyper-parameters for every contender of an optimizer, so that only the implementation differs.
HYPER = {
    "tvlars": dict(lr=0.1, momentum=0.9, weight_decay=5e-4, eta=1e-3, lmbda=1e-3, alpha=0.1),
    "lars": dict(lr=0.1, momentum=0.9, weight_decay=5e-4, eta=1e-3),
    "lamb": dict(lr=1e-3, weight_decay=0.01),
}
OUR_CLASSES = {"tvlars": TVLARS, "lars": LARS, "lamb": LAMB}
# The torch floor of each optimizer, in order of preference: torch's fastest optimizer of the same shape of work
# (one momentum buffer for the LARS family, two moments for LAMB), fused wherever torch has the fused kernel.
FLOORS = {"tvlars": ("sgd-fused", "sgd-foreach"), "lars": ("sgd-fused", "sgd-foreach"),
          "lamb": ("adamw-fused", "adamw-foreach")}
# "same": the gradient tensors of the previous step stay (zero_grad(set_to_none=False)); "new": new gradient
# tensors before every step, made outside the timed region (zero_grad(set_to_none=True), then backward).
GRADS = ("same", "new")

Step = Callable[[], object]


@dataclass(frozen=True)
class Storage:
    """How our optimizers keep their state and weights (docs/algorithms.md, section 9): the state's dtype, how
    bfloat16 state is rounded, and a Kahan compensation of bfloat16 weights. The default is float32 state."""

    state_dtype: torch.dtype = torch.float32
    rounding: str = "stochastic"  # only bfloat16 state is rounded
    kahan: bool = False

    @property
    def suffix(self) -> str:
        """What a contender's name gains: '' (float32 state), '+bf16', '+bf16-nearest', '+kahan', '+bf16+kahan'."""
        text = ""
        if self.state_dtype == torch.bfloat16:
            text += "+bf16" + ("-nearest" if self.rounding == "nearest" else "")
        return text + ("+kahan" if self.kahan else "")

    @property
    def options(self) -> dict:
        return dict(state_dtype=self.state_dtype, rounding=self.rounding, kahan=self.kahan, seed=STORAGE_SEED)

    def fits(self, dtype: torch.dtype) -> str | None:
        """Why this storage cannot step parameters of ``dtype`` (None when it can)."""
        if self.kahan and dtype != torch.bfloat16:
            return "kahan=True needs bfloat16 parameters"
        if self.state_dtype == torch.bfloat16 and dtype == torch.float64:
            return "bfloat16 state is refused for float64 parameters"
        return None


FLOAT32_STATE = Storage()
STORAGE_SEED = 1234  # the stochastic rounding stream's seed: any fixed value (the bits cost the same)


def storages(state_dtypes: list[str], roundings: list[str], kahan: list[bool]) -> list[Storage]:
    """The storage variants of a run, float32 state first when asked: each state dtype, bfloat16 state with each
    rounding, each with and without Kahan as asked (Kahan variants run on bfloat16 parameters only)."""
    out = []
    for name in state_dtypes:
        state_dtype = getattr(torch, name)
        for rounding in (roundings if state_dtype == torch.bfloat16 else ["stochastic"]):
            for with_kahan in kahan:
                out.append(Storage(state_dtype, rounding, with_kahan))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Contender:
    """One implementation of a step for some optimizers. ``build(optimizer, params) -> step`` or raises;
    ``why_not(optimizer, device)`` says why it cannot run here (None when it can)."""

    name: str
    kind: str  # "ours", "baseline", "compiled", "peer" or "torch" (torch.optim, the floors)
    optimizers: tuple[str, ...]  # the table rows it has an implementation for
    build: Callable[[str, list], Step]
    why_not: Callable[[str, torch.device], str | None]
    algorithm: str | None = None  # the byte model's row when it is not the table row's (the torch floors)
    storage: Storage = FLOAT32_STATE  # ours: how the state is kept
    backend: str | None = None  # ours: the backend asked for (the name without the storage suffix)


def _ours(backend: str, storage: Storage = FLOAT32_STATE) -> Contender:
    def build(optimizer, params):
        extra = storage.options if storage != FLOAT32_STATE else {}  # the default run builds what it always built
        return OUR_CLASSES[optimizer](params, backend=backend, **HYPER[optimizer], **extra).step

    def why_not(optimizer, device):
        if backend == "triton" and device.type == "cpu":
            return "Triton runs on the CPU only in its interpreter: a correctness tool, not worth timing"
        return tvlars_fused.available_backends(device)[backend]

    return Contender(backend + storage.suffix, "ours", OPTIMIZERS, build, why_not, storage=storage, backend=backend)


def with_storage(contender: Contender, storage: Storage) -> Contender:
    """``contender`` (one of our backends) keeping its state as ``storage`` says (itself for float32 state)."""
    if storage == contender.storage:
        return contender
    return _ours(contender.backend or contender.name, storage)


def stepped_by(step: Step) -> str | None:
    """Which backend(s) stepped the buckets of the optimizer whose step this is (optimizer.chosen_backends), e.g.
    "cpp", or "foreach" where a fused backend hands the bucket over; None for others' optimizers."""
    owner = getattr(step, "__self__", None)
    chosen = getattr(owner, "chosen_backends", None)
    if not isinstance(chosen, list):
        return None
    return ",".join(sorted({bucket["backend"] for bucket in chosen}))


def _eager_loop() -> Contender:
    def build(optimizer, params):
        if optimizer == "lamb":
            return EagerLoopLAMB(params, **HYPER["lamb"]).step
        hyper = dict(HYPER[optimizer])
        hyper.setdefault("lmbda", None)  # plain LARS: no phi
        return EagerLoopLARS(params, **hyper).step

    return Contender("eager-loop", "baseline", OPTIMIZERS, build, lambda optimizer, device: None)


def _compiled_foreach() -> Contender:
    def build(optimizer, params):
        torch._dynamo.reset()  # each optimizer is a fresh compile; don't run into the recompile limit
        return torch.compile(OUR_CLASSES[optimizer](params, backend="foreach", **HYPER[optimizer]).step)

    return Contender("foreach+compile", "compiled", OPTIMIZERS, build, lambda optimizer, device: None)


def _fused_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return _get_fused_kernels_supported_devices()


def _torch_optim(algorithm: str, fused: bool) -> Contender:
    """torch.optim.SGD with momentum (the LARS family's floor) or AdamW (LAMB's), fused or foreach."""

    def build(optimizer, params):
        flags = dict(fused=True) if fused else dict(foreach=True)
        if algorithm == "sgd":
            return torch.optim.SGD(params, lr=HYPER["lars"]["lr"], momentum=HYPER["lars"]["momentum"], **flags).step
        return torch.optim.AdamW(params, lr=HYPER["lamb"]["lr"], weight_decay=HYPER["lamb"]["weight_decay"],
                                 **flags).step

    def why_not(optimizer, device):
        if fused and device.type not in _fused_devices():
            return f"torch has no fused {algorithm} kernel for {device.type}"
        return None

    rows = ("tvlars", "lars") if algorithm == "sgd" else ("lamb",)
    return Contender(f"{algorithm}-{'fused' if fused else 'foreach'}", "torch", rows, build, why_not, algorithm)


def _missing(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is as missing as an absent one
        return f"{module} is not importable ({type(exc).__name__}: {exc})"
    return None


def _timm() -> Contender:
    def build(optimizer, params):
        import timm.optim

        if optimizer == "lamb":
            return timm.optim.Lamb(params, max_grad_norm=None, **HYPER["lamb"]).step
        hyper = HYPER["lars"]
        return timm.optim.Lars(params, lr=hyper["lr"], momentum=hyper["momentum"],
                               weight_decay=hyper["weight_decay"], trust_coeff=hyper["eta"]).step

    return Contender("timm", "peer", ("lars", "lamb"), build, lambda optimizer, device: _missing("timm.optim"))


def _bitsandbytes() -> Contender:
    def build(optimizer, params):
        import bitsandbytes as bnb

        if optimizer == "lamb":
            return bnb.optim.LAMB(params, **HYPER["lamb"]).step
        hyper = HYPER["lars"]
        return bnb.optim.LARS(params, lr=hyper["lr"], momentum=hyper["momentum"],
                              weight_decay=hyper["weight_decay"]).step

    def why_not(optimizer, device):
        if device.type != "cuda":
            return "bitsandbytes optimizers need a GPU"
        return _missing("bitsandbytes")

    return Contender("bitsandbytes", "peer", ("lars", "lamb"), build, why_not)


def contenders() -> dict[str, Contender]:
    """Every contender, in the order the table lists them."""
    every = [_eager_loop(), *(_ours(b) for b in OUR_BACKENDS), _compiled_foreach(), _timm(), _bitsandbytes(),
             *(_torch_optim(algorithm, fused) for algorithm in ("sgd", "adamw") for fused in (True, False))]
    return {c.name: c for c in every}


def floor_name(optimizer: str, device: torch.device) -> str | None:
    """The torch floor of ``optimizer`` on ``device``: the first of FLOORS[optimizer] that runs there."""
    table = contenders()
    return next((name for name in FLOORS[optimizer] if table[name].why_not(optimizer, device) is None), None)


# ----------------------------------------------------------------------------------------------- data
def make_params(param_set: ParamSet, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list:
    """Seeded random weights and gradients, made once per set: generating them on the device keeps setup short."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in param_set.shapes:
        w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        w.requires_grad_()
        w.grad = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 1e-2).to(dtype)
        params.append(w)
    return params


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return sys.maxsize


# Working memory per parameter beyond weights and gradients: the largest state of one contender (LAMB's two
# float32 moments), and the temporaries of a step (about three float32 copies of the layers).
_STATE_BYTES = 8
_TEMPORARY_BYTES = 12


def does_not_fit(param_set: ParamSet, dtype: torch.dtype, device: torch.device, contenders: int,
                 params_made: bool = False) -> str | None:
    """Why the set cannot be stepped by ``contenders`` optimizers alive at once (None when it can); with
    ``params_made`` its weights and gradients already take their share of the memory."""
    element = torch.empty((), dtype=dtype).element_size()
    weights_and_grads = 0 if params_made else 2 * element
    need = param_set.numel * (weights_and_grads + _STATE_BYTES * contenders + _TEMPORARY_BYTES)
    have = _available_bytes(device)
    if need * 1.2 > have:
        return (f"needs about {need / 2**30:.1f} GiB with {contenders} optimizers' state and temporaries, "
                f"{have / 2**30:.1f} GiB available on {device.type}")
    return None


def renew_grads(params: list, grads: list) -> None:
    """New gradient tensors with the values of ``grads``, as zero_grad(set_to_none=True) and a backward leave."""
    for p, g in zip(params, grads):
        p.grad = g.clone()


# --------------------------------------------------------------------------------------------- timing
_clock = time.perf_counter  # the CPU's timer (a module attribute, so that a test can watch when it is read)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one_step(step: Step, device: torch.device) -> float:
    """Seconds one step takes from an idle device: CUDA events on a GPU (host launch gaps included), perf_counter
    on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = _clock()
    step()
    return _clock() - start_s


def last_level_cache_bytes(device: torch.device) -> int | None:
    """The last-level cache: the GPU's L2, or on the CPU the sum of the highest-level data caches (one per group
    of cores sharing it, from sysfs); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size or None
    caches: dict[tuple[int, str], int] = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            with open(f"{index}/type") as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(f"{index}/level") as f, open(f"{index}/size") as g, open(f"{index}/shared_cpu_list") as h:
                level, size, shared = int(f.read()), g.read().strip(), h.read().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        caches[(level, shared)] = int(size.rstrip("KMG")) * scale
    if not caches:
        return None
    top = max(level for level, _ in caches)
    return sum(size for (level, _), size in caches.items() if level == top)


@dataclass
class Yardstick:
    """The bandwidth yardstick: ``a.add_(b)`` over float32 arrays each at least 4x the last-level cache, timed in
    the same rounds as the contenders, so that its median is a ceiling measured under the same load."""

    step: Step
    bytes: int  # per step, from the byte model
    description: str
    cache_bytes: int | None


def make_yardstick(device: torch.device) -> Yardstick:
    cache = last_level_cache_bytes(device)
    least = 2**26 if device.type == "cuda" else 2**24  # 256 MiB / 64 MiB per array when the cache is unknown
    numel = max(least, 4 * (cache or 0) // 4)  # float32 elements: 4x the cache in bytes
    a = torch.ones(numel, device=device)
    b = torch.zeros(numel, device=device)  # adding zeros keeps a finite, whatever the number of rounds

    def step():
        a.add_(b)

    cache_text = f"{cache / 2**20:.0f} MiB last-level cache" if cache else "last-level cache of unknown size"
    return Yardstick(step, byte_model.yardstick_bytes(numel),
                     f"a.add_(b), 2 x {numel * 4 / 2**20:.0f} MiB float32 ({cache_text})", cache)


def device_ops_per_step(step: Step, device: torch.device) -> int | None:
    """Kernels, memcpys and memsets one step puts on the GPU, counted with torch.profiler; None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def extra_memory_per_step(step: Step, device: torch.device) -> int | None:
    """Peak device memory a warmed-up step allocates above what is already held (temporaries); None on CPU."""
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


# ---------------------------------------------------------------------------------------------- a run
@dataclass
class RunConfig:
    device: torch.device
    sets: list[ParamSet]
    optimizers: list[str]
    contenders: list[str]
    dtypes: list[torch.dtype]
    warmup: int
    steps: int
    compile_sets: set[str]  # parameter sets on which foreach+compile runs (compiling is slow)
    time_budget_s: float  # cases not started by then are skipped, so a run always ends with results
    on_case: Callable[[dict], None] = lambda run: None  # called after each group of cases (incremental output)
    grads: tuple[str, ...] = ("same",)  # from GRADS
    # How our backends keep their state: each of ours runs once per storage, in the same rounds (the others once).
    storages: tuple[Storage, ...] = (FLOAT32_STATE,)


def _groups(config: RunConfig):
    """(set, dtype, grads, optimizer, contenders) in run order; the optimizer's torch floor is always one of
    the contenders, whether --backends names it or not. Each of our backends comes once per storage of the
    config (float32 state as ``cpp``, others as ``cpp+bf16`` and so on), right after one another."""
    table = contenders()
    for param_set in config.sets:
        for dtype in config.dtypes:
            for grads in config.grads:
                for optimizer in config.optimizers:
                    wanted = {*config.contenders, floor_name(optimizer, config.device)}
                    group = []
                    for name, c in table.items():
                        if name not in wanted or optimizer not in c.optimizers:
                            continue
                        if c.kind != "ours":
                            group.append(c)
                            continue
                        group += [with_storage(c, storage) for storage in config.storages]
                    yield param_set, dtype, grads, optimizer, group


def run(config: RunConfig) -> dict:
    """Time every case; returns {"results": [...], "skipped": [...], "yardstick": {...}, "headline": [...]}.

    The contenders of one (set, dtype, grads, optimizer), its torch floor and the yardstick are timed in
    interleaved rounds, one step each per round, so that a load that comes and goes on the machine hits them
    all alike; every time is the median over the rounds, every ratio the median of the ratios within a round."""
    device = config.device
    yardstick = make_yardstick(device)
    summary = {"description": yardstick.description, "bytes_per_step": yardstick.bytes,
               "last_level_cache_bytes": yardstick.cache_bytes}
    results: list[dict] = []
    skipped: list[dict] = []
    groups = list(_groups(config))
    started = time.monotonic()
    current_key, params = None, None
    for index, (param_set, dtype, grads, optimizer, group) in enumerate(groups, 1):
        where = dict(set=param_set.name, dtype=str(dtype).removeprefix("torch."), grads=grads, optimizer=optimizer)
        if current_key != (param_set.name, dtype):
            params = None  # the last set's tensors go before the next set's memory is judged
            _free(device)
            current_key = (param_set.name, dtype)
        runnable = []
        for contender in group:
            reason = contender.why_not(optimizer, device) or contender.storage.fits(dtype)
            if reason is None and contender.kind == "compiled" and param_set.name not in config.compile_sets:
                reason = "torch.compile runs only on --compile-sets (each compile takes tens of seconds)"
            if reason is None and time.monotonic() - started > config.time_budget_s:
                reason = f"time budget of {config.time_budget_s:.0f} s spent before this case"
            if reason is None:
                runnable.append(contender)
            else:
                skipped.append({**where, "contender": contender.name, "reason": reason})
        if not runnable:
            continue
        unfit = does_not_fit(param_set, dtype, device, len(runnable), params_made=params is not None)
        if unfit is not None:
            skipped += [{**where, "contender": c.name, "reason": unfit} for c in runnable]
            continue
        if params is None:
            params = make_params(param_set, dtype, device)
        prefix = (f"[{index:3d}/{len(groups)}] {param_set.name} {where['dtype']}"
                  f"{' new-grads' if grads == 'new' else ''} {optimizer}:")
        # The progress line is written whole once the case is timed, so that what torch logs meanwhile (compile
        # notes, CPU-only fallbacks) comes before it; its Python warnings are collected and come after it.
        with warnings.catch_warnings(record=True) as caught:
            records, yardstick_bps, line = _measure_group(param_set, dtype, grads, optimizer, runnable, params,
                                                          config, skipped, yardstick, prefix)
        print(line, file=sys.stderr, flush=True)
        for text in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
            print(f"  warning: {text}", file=sys.stderr, flush=True)
        floor = floor_name(optimizer, device)
        results += [{**where, "contender": name, **record, "floor": floor, "yardstick_GBps": yardstick_bps / 1e9,
                     "family": param_set.family, "num_tensors": param_set.num_tensors, "numel": param_set.numel}
                    for name, record in records.items()]
        config.on_case({"results": results, "skipped": skipped, "yardstick": summary})
    params = None
    _free(device)
    add_ratios(results, yardstick.cache_bytes)
    return {"results": results, "skipped": skipped, "yardstick": summary, "headline": headline(results)}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_group(param_set, dtype, grads, optimizer, group, params, config: RunConfig, skipped: list,
                   yardstick: Yardstick, prefix: str) -> tuple[dict, float, str]:
    """({contender name: its record}, yardstick bytes/s in these rounds, the progress line starting with
    ``prefix``); a contender that raises is added to ``skipped`` with its error instead of ending the run. All
    contenders step the same weights: no branch of a step depends on their values."""
    device = config.device
    where = dict(set=param_set.name, dtype=str(dtype).removeprefix("torch."), grads=grads, optimizer=optimizer)
    originals = [p.grad for p in params]

    def before_step():
        if grads == "new":
            renew_grads(params, originals)

    def failed(name: str, exc: Exception) -> None:
        line.append(f"{name} failed ({type(exc).__name__})")
        skipped.append({**where, "contender": name, "reason": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})

    line = [prefix]
    steps: dict[str, Step] = {}
    entries: dict[str, Contender] = {}
    first_step_s: dict[str, float] = {}
    backends_used: dict[str, str | None] = {}
    for contender in group:
        try:
            if contender.kind == "compiled":
                print(f"{prefix} compiling {contender.name} ... (first step)", file=sys.stderr, flush=True)
            build_start = time.perf_counter()
            step = contender.build(optimizer, params)
            before_step()
            step()  # allocates the state (and compiles, for foreach+compile)
            _sync(device)
            first_step_s[contender.name] = time.perf_counter() - build_start
            backends_used[contender.name] = stepped_by(step)
            for _ in range(config.warmup):
                before_step()
                step()
            _sync(device)
            steps[contender.name], entries[contender.name] = step, contender
        except Exception as exc:
            failed(contender.name, exc)
    times: dict[str, list[float]] = {name: [] for name in steps}
    yardstick_times = []
    names = list(steps)
    for round_index in range(config.steps):
        # The order rotates: the step after the yardstick finds the caches cold, and no contender should always be
        # the one that does (nor always follow the same neighbour).
        shift = round_index % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            if name not in steps:  # failed in an earlier round
                continue
            try:
                before_step()  # outside the timed region
                times[name].append(time_one_step(steps[name], device))
            except Exception as exc:
                failed(name, exc)
                del steps[name]
        yardstick_times.append(time_one_step(yardstick.step, device))
    if grads == "new":
        for p, g in zip(params, originals):
            p.grad = g
    floor = floor_name(optimizer, device)
    records = {}
    for name, step in steps.items():
        algorithm = entries[name].algorithm or optimizer
        storage = entries[name].storage
        byte_args = (dict(state_dtype=storage.state_dtype, kahan=storage.kahan)
                     if entries[name].kind == "ours" else {})
        records[name] = dict(
            kind=entries[name].kind, algorithm=algorithm,
            backend=entries[name].backend, stepped_by=backends_used[name],
            state_dtype=str(storage.state_dtype).removeprefix("torch.") if entries[name].kind == "ours" else None,
            rounding=storage.rounding if storage.state_dtype == torch.bfloat16 else None,
            kahan=storage.kahan if entries[name].kind == "ours" else None,
            median_ms=statistics.median(times[name]) * 1e3, min_ms=min(times[name]) * 1e3,
            max_ms=max(times[name]) * 1e3, steps=len(times[name]), round_ms=[t * 1e3 for t in times[name]],
            first_step_s=first_step_s[name],
            bytes_per_step=byte_model.bytes_per_step(algorithm, dtype, param_set.numel, **byte_args),
            footprint_bytes=byte_model.footprint_bytes(algorithm, dtype, param_set.numel, **byte_args),
            device_ops_per_step=device_ops_per_step(step, device),
            extra_memory_bytes=extra_memory_per_step(step, device),
        )
        label = f"{name} (floor)" if name == floor else name
        compiled = f" (first step {first_step_s[name]:.1f} s)" if entries[name].kind == "compiled" else ""
        line.append(f"{label} {records[name]['median_ms']:.3f} ms{compiled}")
    yardstick_bps = yardstick.bytes / statistics.median(yardstick_times)
    line[-1] += f"; yardstick {yardstick_bps / 1e9:.1f} GB/s"
    del steps
    _free(device)
    return records, yardstick_bps, " ".join(line)


def share_note(fraction: float | None, footprint: int, cache_bytes: int | None) -> str | None:
    """Why a step's bandwidth can exceed the out-of-cache yardstick's (None when it does not): a share above
    100% is never shown without this reason."""
    if fraction is None or fraction <= 1.0:
        return None
    if cache_bytes and footprint <= cache_bytes:
        return "data in cache"
    if cache_bytes and footprint <= 4 * cache_bytes:
        return "data partly in cache"
    return "above the yardstick in this run: a noisy machine?"


def paired_ratio(numerator_ms: list[float] | None, denominator_ms: list[float]) -> tuple[float, float, float] | None:
    """(median, first quartile, third quartile) of numerator / denominator taken round by round: a load that
    slows one round slows both sides of its ratio, so the spread shows the machine's noise rather than hiding
    it in two medians. None without a numerator or when a denominator is 0 (too fast for the clock)."""
    if numerator_ms is None or not all(denominator_ms):
        return None
    ratios = [a / b for a, b in zip(numerator_ms, denominator_ms, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def add_ratios(results: list[dict], cache_bytes: int | None) -> None:
    """Speed-ups vs the eager loop and vs foreach and the ratio to the optimizer's torch floor, each the median of
    per-round ratios (the floor's with its quartiles); the bandwidth and its share of the yardstick's in the same
    rounds (set, dtype, grads, optimizer)."""
    rounds = {(r["set"], r["dtype"], r["grads"], r["optimizer"], r["contender"]): r["round_ms"] for r in results}
    for r in results:
        group = (r["set"], r["dtype"], r["grads"], r["optimizer"])
        eager = paired_ratio(rounds.get((*group, "eager-loop")), r["round_ms"])
        foreach = paired_ratio(rounds.get((*group, "foreach")), r["round_ms"])
        floor_rounds = rounds.get((*group, r["floor"]))
        floor = paired_ratio(r["round_ms"], floor_rounds) if floor_rounds else None
        # Another storage of ours against the same backend with float32 state, in the same rounds.
        plain_rounds = rounds.get((*group, r.get("backend"))) if r.get("backend") != r["contender"] else None
        plain = paired_ratio(r["round_ms"], plain_rounds) if plain_rounds else None
        seconds = r["median_ms"] / 1e3
        r["speedup_vs_eager"] = eager[0] if eager else None
        r["speedup_vs_foreach"] = foreach[0] if foreach else None
        r["ratio_to_floor"] = floor[0] if floor else None
        r["ratio_to_floor_quartiles"] = list(floor[1:]) if floor else None
        r["ratio_to_float32_state"] = plain[0] if plain else None
        r["ratio_to_float32_state_quartiles"] = list(plain[1:]) if plain else None
        r["achieved_GBps"] = r["bytes_per_step"] / seconds / 1e9 if seconds > 0 else math.inf
        r["fraction_of_yardstick"] = r["achieved_GBps"] / r["yardstick_GBps"] if seconds > 0 else None
        r["share_note"] = share_note(r["fraction_of_yardstick"], r["footprint_bytes"], cache_bytes)


def headline(results: list[dict]) -> list[dict]:
    """Per (set, dtype, grads, optimizer) and per storage of our state: the fastest of our backends, with its
    ratios to the eager loop and to the torch floor (and, for bfloat16 state or Kahan, to the same backend with
    float32 state)."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["set"], r["dtype"], r["grads"], r["optimizer"], r.get("state_dtype"), r.get("rounding"),
               r.get("kahan"))
        if r["kind"] == "ours" and (key not in best or r["median_ms"] < best[key]["median_ms"]):
            best[key] = r
    return [dict(set=r["set"], dtype=r["dtype"], grads=r["grads"], optimizer=r["optimizer"], backend=r["contender"],
                 median_ms=r["median_ms"], speedup_vs_eager=r["speedup_vs_eager"], floor=r["floor"],
                 ratio_to_floor=r["ratio_to_floor"], ratio_to_floor_quartiles=r["ratio_to_floor_quartiles"],
                 state_dtype=r.get("state_dtype"), rounding=r.get("rounding"), kahan=r.get("kahan"),
                 stepped_by=r.get("stepped_by"), ratio_to_float32_state=r.get("ratio_to_float32_state"),
                 ratio_to_float32_state_quartiles=r.get("ratio_to_float32_state_quartiles"))
            for r in best.values()]


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.machine()


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import platform
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    commit = commit or os.environ.get("BENCH_GIT_COMMIT", "")  # a copy of the tree without .git
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__, triton=triton_version, python=platform.python_version(),
        git_commit=commit or "unknown",
        backends=tvlars_fused.available_backends(device),
    )
