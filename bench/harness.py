"""Running the cases: who competes (contenders), how a step is timed, and what is recorded per case.

A case is (parameter set, dtype, optimizer, contender). Parameters and gradients of a set are made once,
seeded, before any timing; every contender then builds its own optimizer on them, so the timed region is
``optimizer.step()`` and nothing else.
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


# Working memory per parameter beyond weights and gradients: the largest state (LAMB's two float32 moments)
# plus the eager baselines' temporaries (about three float32 copies of the biggest layers).
_STATE_AND_TEMPORARIES = 8 + 12


def does_not_fit(param_set: ParamSet, dtype: torch.dtype, device: torch.device) -> str | None:
    element = torch.empty((), dtype=dtype).element_size()
    need = param_set.numel * (2 * element + _STATE_AND_TEMPORARIES)
    have = _available_bytes(device)
    if need * 1.2 > have:
        return (f"needs about {need / 2**30:.1f} GiB with optimizer state and temporaries, "
                f"{have / 2**30:.1f} GiB available on {device.type}")
    return None


# --------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per step after ``warmup`` untimed steps: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(device: torch.device, numel: int, reps: int = 5) -> float:
    """Bytes per second of a plain ``dst.copy_(src)`` of ``numel`` float32: what the memory system can do."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    times = time_steps(lambda: dst.copy_(src), device, warmup=2, steps=reps)
    return byte_model.copy_bytes(numel) / statistics.median(times)


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
    on_case: Callable[[dict], None] = lambda record: None  # called after each case (incremental output)


def _cases(config: RunConfig):
    """(set, dtype, optimizer, contender) in run order, only where the contender has that optimizer; SGD,
    the floor, first in each set and dtype."""
    table = contenders()
    for param_set in config.sets:
        for dtype in config.dtypes:
            for optimizer in ("sgd", *config.optimizers):
                for name in config.contenders:
                    if optimizer in table[name].optimizers:
                        yield param_set, dtype, optimizer, table[name]


def run(config: RunConfig) -> dict:
    """Time every case; returns {"results": [...], "skipped": [...], "copy_bandwidth": bytes/s}."""
    device = config.device
    bandwidth = copy_bandwidth(device, numel=2**28 if device.type == "cuda" else 2**26)
    results: list[dict] = []
    skipped: list[dict] = []
    cases = list(_cases(config))
    started = time.monotonic()
    current_key, params, unfit = None, None, None
    for index, (param_set, dtype, optimizer, contender) in enumerate(cases, 1):
        where = dict(set=param_set.name, dtype=str(dtype).removeprefix("torch."), optimizer=optimizer,
                     contender=contender.name)
        if current_key != (param_set.name, dtype):
            params = None  # the last set's tensors go before the next set's memory is judged
            _free(device)
            current_key = (param_set.name, dtype)
            unfit = does_not_fit(param_set, dtype, device)
        reason = contender.why_not(optimizer, device)
        if reason is None and contender.kind == "compiled" and param_set.name not in config.compile_sets:
            reason = "torch.compile runs only on --compile-sets (each compile takes tens of seconds)"
        if reason is None:
            reason = unfit
        if reason is None and time.monotonic() - started > config.time_budget_s:
            reason = f"time budget of {config.time_budget_s:.0f} s spent before this case"
        if reason is not None:
            skipped.append({**where, "reason": reason})
            continue
        if params is None:
            params = make_params(param_set, dtype, device)
        print(f"[{index:3d}/{len(cases)}] {param_set.name} {where['dtype']} {optimizer} {contender.name} ...",
              end="", file=sys.stderr, flush=True)
        try:
            record = _measure(param_set, dtype, optimizer, contender, params, config)
        except Exception as exc:  # a contender that breaks is reported, not allowed to end the run
            print(f" failed: {type(exc).__name__}", file=sys.stderr, flush=True)
            skipped.append({**where, "reason": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
            _free(device)
            continue
        print(f" {record['median_ms']:.3f} ms", file=sys.stderr, flush=True)
        record = {**where, **record, "family": param_set.family, "num_tensors": param_set.num_tensors,
                  "numel": param_set.numel}
        results.append(record)
        config.on_case({"results": results, "skipped": skipped, "copy_bandwidth": bandwidth})
    params = None
    _free(device)
    add_ratios(results, bandwidth, sgd_floor_name(device))
    return {"results": results, "skipped": skipped, "copy_bandwidth": bandwidth}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(param_set, dtype, optimizer, contender, params, config: RunConfig) -> dict:
    device = config.device
    # A fresh optimizer starts from zero state; the weights carry over from the last contender, which
    # changes no timing (no branch depends on their values).
    build_start = time.perf_counter()
    step = contender.build(optimizer, params)
    step()  # first step: allocates state (and compiles, for foreach+compile)
    _sync(device)
    first_step_s = time.perf_counter() - build_start
    times = time_steps(step, device, config.warmup, config.steps)
    record = dict(
        median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
        steps=len(times), first_step_s=first_step_s,
        bytes_per_step=byte_model.bytes_per_step(optimizer, dtype, param_set.numel),
        device_ops_per_step=device_ops_per_step(step, device),
        extra_memory_bytes=extra_memory_per_step(step, device),
    )
    del step
    _free(device)
    return record


def add_ratios(results: list[dict], copy_bandwidth_bps: float, sgd_floor: str) -> None:
    """Speed-up vs the eager loop, ratio to the SGD floor and bandwidth, each against the same set and dtype."""
    median = {(r["set"], r["dtype"], r["optimizer"], r["contender"]): r["median_ms"] for r in results}
    for r in results:
        eager = median.get((r["set"], r["dtype"], r["optimizer"], "eager-loop"))
        sgd = median.get((r["set"], r["dtype"], "sgd", sgd_floor))
        seconds = r["median_ms"] / 1e3
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None
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
