"""Running the cases: who competes (contenders), how a step is timed, and what is recorded per case.

A case is (parameter set, dtype, optimizer, contender). Parameters and gradients of a set are made once,
seeded, before any timing; every contender then builds its own optimizer on them, so the timed region is
``optimizer.step()`` and nothing else. The contenders of one (set, dtype, optimizer) are timed in interleaved
rounds (see ``run``).
"""

from __future__ import annotations

import gc
import importlib
import math
import os
import statistics
import sys
import time
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

Step = Callable[[], object]


@dataclass(frozen=True)
class Contender:
    """One implementation of a step for some optimizers. ``build(optimizer, params) -> step`` or raises;
    ``why_not(optimizer, device)`` says why it cannot run here (None when it can)."""

    name: str
    kind: str  # "ours", "baseline", "compiled", "sgd" (the floor) or "peer"
    optimizers: tuple[str, ...]  # the table rows it has an implementation for
    build: Callable[[str, list], Step]
    why_not: Callable[[str, torch.device], str | None]


def _ours(backend: str) -> Contender:
    def build(optimizer, params):
        return OUR_CLASSES[optimizer](params, backend=backend, **HYPER[optimizer]).step

    def why_not(optimizer, device):
        if backend == "triton" and device.type == "cpu":
            return "Triton runs on the CPU only in its interpreter: a correctness tool, not worth timing"
        return tvlars_fused.available_backends(device)[backend]

    return Contender(backend, "ours", OPTIMIZERS, build, why_not)


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


def _sgd(fused: bool) -> Contender:
    def build(optimizer, params):
        flags = dict(fused=True) if fused else dict(foreach=True)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, **flags).step

    def why_not(optimizer, device):
        if fused and device.type != "cuda":
            return "fused SGD is the floor on a GPU only; on the CPU the floor is sgd-foreach"
        return None

    return Contender("sgd-fused" if fused else "sgd-foreach", "sgd", ("sgd",), build, why_not)


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
             _sgd(fused=False), _sgd(fused=True)]
    return {c.name: c for c in every}


def sgd_floor_name(device: torch.device) -> str:
    return "sgd-fused" if device.type == "cuda" else "sgd-foreach"


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


# --------------------------------------------------------------------------------------------- timing
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
    start_s = time.perf_counter()
    step()
    return time.perf_counter() - start_s


def copy_bandwidth(device: torch.device, numel: int, reps: int = 10) -> float:
    """Bytes per second of the fastest of ``reps`` plain ``dst.copy_(src)`` of ``numel`` float32: what the memory
    system can do (the best, not the median, so that a busy moment on a shared machine does not lower the bar)."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [time_one_step(lambda: dst.copy_(src), device) for _ in range(reps)]
    return byte_model.copy_bytes(numel) / min(times)


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


def _groups(config: RunConfig):
    """(set, dtype, optimizer, contenders that have it) in run order; SGD, the floor, first in each set and
    dtype."""
    table = contenders()
    for param_set in config.sets:
        for dtype in config.dtypes:
            for optimizer in ("sgd", *config.optimizers):
                group = [table[name] for name in config.contenders if optimizer in table[name].optimizers]
                if group:
                    yield param_set, dtype, optimizer, group


def run(config: RunConfig) -> dict:
    """Time every case; returns {"results": [...], "skipped": [...], "copy_bandwidth": bytes/s}.

    The contenders of one (set, dtype, optimizer) are timed in interleaved rounds, one step each per round,
    so that a load that comes and goes on the machine hits them all alike."""
    device = config.device
    bandwidth = copy_bandwidth(device, numel=2**28 if device.type == "cuda" else 2**26)
    results: list[dict] = []
    skipped: list[dict] = []
    groups = list(_groups(config))
    started = time.monotonic()
    current_key, params = None, None
    for index, (param_set, dtype, optimizer, group) in enumerate(groups, 1):
        where = dict(set=param_set.name, dtype=str(dtype).removeprefix("torch."), optimizer=optimizer)
        if current_key != (param_set.name, dtype):
            params = None  # the last set's tensors go before the next set's memory is judged
            _free(device)
            current_key = (param_set.name, dtype)
        runnable = []
        for contender in group:
            reason = contender.why_not(optimizer, device)
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
        print(f"[{index:3d}/{len(groups)}] {param_set.name} {where['dtype']} {optimizer}:", end="",
              file=sys.stderr, flush=True)
        records = _measure_group(param_set, dtype, optimizer, runnable, params, config, skipped)
        print(file=sys.stderr, flush=True)
        results += [{**where, "contender": name, **record, "family": param_set.family,
                     "num_tensors": param_set.num_tensors, "numel": param_set.numel}
                    for name, record in records.items()]
        config.on_case({"results": results, "skipped": skipped, "copy_bandwidth": bandwidth})
    params = None
    _free(device)
    add_ratios(results, bandwidth, sgd_floor_name(device))
    return {"results": results, "skipped": skipped, "copy_bandwidth": bandwidth}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_group(param_set, dtype, optimizer, group, params, config: RunConfig, skipped: list) -> dict:
    """{contender name: its record}; a contender that raises is added to ``skipped`` with its error instead of
    ending the run. All contenders step the same weights: no branch of a step depends on their values."""
    device = config.device
    where = dict(set=param_set.name, dtype=str(dtype).removeprefix("torch."), optimizer=optimizer)

    def failed(name: str, exc: Exception) -> None:
        print(f" {name} failed ({type(exc).__name__})", end="", file=sys.stderr, flush=True)
        skipped.append({**where, "contender": name, "reason": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})

    steps: dict[str, Step] = {}
    first_step_s: dict[str, float] = {}
    for contender in group:
        try:
            build_start = time.perf_counter()
            step = contender.build(optimizer, params)
            step()  # allocates the state (and compiles, for foreach+compile)
            _sync(device)
            first_step_s[contender.name] = time.perf_counter() - build_start
            for _ in range(config.warmup):
                step()
            _sync(device)
            steps[contender.name] = step
        except Exception as exc:
            failed(contender.name, exc)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(config.steps):
        for name in list(steps):
            try:
                times[name].append(time_one_step(steps[name], device))
            except Exception as exc:
                failed(name, exc)
                del steps[name]
    records = {}
    for name, step in steps.items():
        records[name] = dict(
            median_ms=statistics.median(times[name]) * 1e3, min_ms=min(times[name]) * 1e3,
            max_ms=max(times[name]) * 1e3, steps=len(times[name]), first_step_s=first_step_s[name],
            bytes_per_step=byte_model.bytes_per_step(optimizer, dtype, param_set.numel),
            device_ops_per_step=device_ops_per_step(step, device),
            extra_memory_bytes=extra_memory_per_step(step, device),
        )
        print(f" {name} {records[name]['median_ms']:.3f} ms", end="", file=sys.stderr, flush=True)
    del steps
    _free(device)
    return records


def add_ratios(results: list[dict], copy_bandwidth_bps: float, sgd_floor: str) -> None:
    """Speed-ups vs the eager loop and vs foreach, ratio to the SGD floor and bandwidth, each against the same
    set and dtype."""
    median = {(r["set"], r["dtype"], r["optimizer"], r["contender"]): r["median_ms"] for r in results}
    for r in results:
        eager = median.get((r["set"], r["dtype"], r["optimizer"], "eager-loop"))
        foreach = median.get((r["set"], r["dtype"], r["optimizer"], "foreach"))
        sgd = median.get((r["set"], r["dtype"], "sgd", sgd_floor))
        seconds = r["median_ms"] / 1e3
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None
        r["speedup_vs_foreach"] = foreach / r["median_ms"] if foreach else None
        r["ratio_to_sgd"] = r["median_ms"] / sgd if sgd else None
        r["achieved_GBps"] = r["bytes_per_step"] / seconds / 1e9 if seconds > 0 else math.inf
        r["fraction_of_copy_bandwidth"] = r["bytes_per_step"] / seconds / copy_bandwidth_bps if seconds > 0 else None


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
