"""``python -m bench --training``: a whole training iteration (forward, backward, step), with the step inside backward.

The step-only cases of ``harness`` time ``optimizer.step()`` alone. Here each contender runs a whole iteration of a
real model: forward, backward, its step, ``zero_grad()``. Contenders, timed in interleaved rounds (one iteration of
each per round, the order rotating):

- ``torch-fused``: torch's fused optimizer of the same shape of work, the floor (``SGD(momentum=0.9, fused=True)``
  for TVLARS and LARS, ``AdamW(fused=True)`` for LAMB);
- ``ours``: the package's optimizer (``backend="auto"``), ordinary ``step()`` after backward;
- ``ours-in-backward``: the same with ``step_in_backward(bucket_mb)``: each bucket stepped as its gradients arrive;
- ``fwd+bwd``: forward and backward alone (gradients dropped), timed in the same rounds, so that the optimizer's
  **exposed time** of a contender is its iteration minus this, round by round.

Every ratio is taken within a round, then the median (with quartiles) over the rounds. Peak memory is measured in
one extra iteration per contender under ``torch.profiler`` (``profile_memory=True``): on the CPU the largest
"Total Allocated" of its memory events, i.e. the most memory allocated during the iteration above what was held
when it began (weights and optimizer state are held before it; gradients are not, they are set to None after each
step); on CUDA ``torch.cuda.max_memory_allocated`` above the memory allocated at the iteration's start.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .harness import HYPER, OUR_CLASSES, environment

CONTENDERS = ("torch-fused", "ours", "ours-in-backward", "fwd+bwd")
FLOOR = "torch-fused"
BUCKET_MB = 25.0


# ----------------------------------------------------------------------------------------------- models
class _Block(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet18(width: int = 64, classes: int = 100) -> nn.Module:
    """ResNet-18 for small images (a 3x3 stem, no max-pool, as for CIFAR)."""
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            layers.append(_Block(cin, cout, 2 if stage and not block else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def bert_stack(blocks: int = 6, width: int = 512, heads: int = 8, ffn: int = 2048) -> nn.Module:
    """A BERT-like stack of post-norm transformer encoder blocks (6 x 512 wide: 19 M parameters)."""
    layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)


@dataclass(frozen=True)
class Workload:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple]  # (inputs, targets), fixed
    loss: Callable[[nn.Module, tuple], torch.Tensor]


def _image_batch(batch: int, size: int):
    def make(device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, 100, (batch,), generator=g).to(device))
    return make


def _token_batch(batch: int, tokens: int, width: int):
    def make(device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch, tokens, width, generator=g).to(device),
                torch.randn(batch, tokens, width, generator=g).to(device))
    return make


WORKLOADS = {
    "resnet18-32px": Workload("resnet18-32px", resnet18, _image_batch(8, 32),
                              lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])),
    "bert6-512": Workload("bert6-512", bert_stack, _token_batch(2, 64, 512),
                          lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])),
    # For the test suite: a few milliseconds per iteration.
    "tiny": Workload("tiny", lambda: resnet18(width=4, classes=10), _image_batch(2, 8),
                     lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1] % 10)),
}


# ----------------------------------------------------------------------------------------------- contenders
def build(workload: Workload, optimizer: str, contender: str, device: torch.device, bucket_mb: float = BUCKET_MB):
    """(one training iteration, the model, the optimizer or None) of ``contender``: its own model, seeded alike,
    and its own optimizer."""
    torch.manual_seed(0)
    model = workload.make().to(device)
    params = list(model.parameters())
    if contender == FLOOR:
        fused = device.type in _fused_devices()
        flags = dict(fused=True) if fused else dict(foreach=True)
        if optimizer == "lamb":
            opt = torch.optim.AdamW(params, lr=HYPER["lamb"]["lr"], weight_decay=HYPER["lamb"]["weight_decay"],
                                    **flags)
        else:
            opt = torch.optim.SGD(params, lr=HYPER["lars"]["lr"], momentum=HYPER["lars"]["momentum"], **flags)
    elif contender in ("ours", "ours-in-backward"):
        opt = OUR_CLASSES[optimizer](params, backend="auto", **HYPER[optimizer])
        if contender == "ours-in-backward":
            opt.step_in_backward(bucket_mb=bucket_mb)
    elif contender == "fwd+bwd":
        opt = None
    else:
        raise ValueError(f"unknown contender {contender!r} (known: {', '.join(CONTENDERS)})")
    batch = workload.batch(device)

    def iteration():
        workload.loss(model, batch).backward()
        if opt is None:
            for p in params:
                p.grad = None
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return iteration, model, opt


def _fused_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return _get_fused_kernels_supported_devices()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(iteration: Callable[[], None], device: torch.device) -> int:
    """The most memory allocated during one iteration above what was held when it began (module docstring)."""
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        iteration()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        iteration()
    with tempfile.TemporaryDirectory() as folder:  # the memory events' running totals are in the trace
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    if not memory:
        return 0
    # "Total Allocated" is a running count the profiler keeps across sessions: relative to before the first event.
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def run_case(workload: Workload, optimizer: str, device: torch.device, rounds: int, warmup: int,
             bucket_mb: float = BUCKET_MB) -> dict:
    """One (workload, optimizer): every contender timed in the same interleaved rounds."""
    built = {name: build(workload, optimizer, name, device, bucket_mb) for name in CONTENDERS}
    for _ in range(max(warmup, 2)):  # the first in-backward iteration only records the order
        for iteration, _, _ in built.values():
            iteration()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for r in range(rounds):
        order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[:r % len(CONTENDERS)]
        for name in order:
            iteration = built[name][0]
            _sync(device)
            start = time.perf_counter()
            iteration()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    model = built[FLOOR][1]
    batch, kept = workload.batch(device), []
    # Forward alone, its saved activations kept: no iteration's peak can be below this.
    forward_peak = peak_bytes(lambda: kept.append(workload.loss(model, batch)), device)
    kept.clear()
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    result = dict(workload=workload.name, optimizer=optimizer, device=str(device), rounds=rounds,
                  params=sum(p.numel() for p in model.parameters()), grad_bytes=grad_bytes, bucket_mb=bucket_mb,
                  forward_peak_bytes=forward_peak, contenders={})
    fwd_bwd = times["fwd+bwd"]
    floor_exposed = [t - f for t, f in zip(times[FLOOR], fwd_bwd)]
    for name in CONTENDERS:
        row = dict(median_s=statistics.median(times[name]), times_s=times[name],
                   peak_bytes=peak_bytes(built[name][0], device))
        if name != "fwd+bwd":
            exposed = [t - f for t, f in zip(times[name], fwd_bwd)]
            row.update(
                ratio_to_floor=_quartiles([t / f for t, f in zip(times[name], times[FLOOR])]),
                exposed_s=_quartiles(exposed),
                # Exposed over the floor's exposed time, within each round (noisy where both are small).
                exposed_to_floor=_quartiles([e / fe for e, fe in zip(exposed, floor_exposed) if fe > 0] or [0.0]))
        result["contenders"][name] = row
    return result


# ----------------------------------------------------------------------------------------------- profile
# Our kernels' names (the CUDA kernel and its CPU twin's ops, the Triton kernels): what a profile counts as the step.
OPTIMIZER_KERNELS = ("lars_step_kernel", "lamb_step_kernel", "lars_norms_kernel", "lars_update_kernel",
                     "lamb_moments_kernel", "lamb_update_kernel", "layer_sums_kernel", "tvlars_fused::")


def interleaving(kernels: list[tuple[str, float, float]]) -> dict:
    """From one iteration's device kernels ``(name, start, end)``, how the optimizer's kernels lie among the others
    (forward and backward): how many there are, and how many start before the last other kernel ends, i.e. were
    queued between backward's kernels rather than after the whole backward."""
    ours = [(start, end) for name, start, end in kernels if any(k in name for k in OPTIMIZER_KERNELS)]
    others = [end for name, start, end in kernels if not any(k in name for k in OPTIMIZER_KERNELS)]
    last_other = max(others, default=float("-inf"))
    return dict(optimizer_kernels=len(ours), before_backward_ends=sum(start < last_other for start, _ in ours),
                other_kernels=len(others))


def profile_interleaving(workload: Workload, optimizer: str, device: torch.device, out: Path,
                         bucket_mb: float = BUCKET_MB) -> dict:
    """One iteration of ours inside backward and one of ours after it, under torch.profiler: the traces go to
    ``out`` (chrome format) and each gives ``interleaving``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    result = {}
    for contender in ("ours-in-backward", "ours"):
        iteration = build(workload, optimizer, contender, device, bucket_mb)[0]
        for _ in range(3):  # the first in-backward iteration only records the order
            iteration()
        _sync(device)
        with profile(activities=activities) as prof:
            iteration()
            _sync(device)
        prof.export_chrome_trace(str(out / f"profile-{workload.name}-{optimizer}-{contender}.json"))
        if device.type == "cuda":  # CPU ops nest (a step encloses its ops), so only device kernels are counted
            kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type.name == "CUDA"]
            result[contender] = interleaving(kernels)
    return result


# ----------------------------------------------------------------------------------------------- report
def table(results: list[dict]) -> str:
    lines = []
    for case in results:
        floor_name = "AdamW(fused)" if case["optimizer"] == "lamb" else "SGD(momentum, fused)"
        lines.append(f"\n{case['workload']} ({case['params'] / 1e6:.2f} M params, gradients "
                     f"{case['grad_bytes'] / 2 ** 20:.1f} MiB), {case['optimizer']}; floor torch {floor_name}; "
                     f"{case['rounds']} rounds on {case['device']}; in backward: buckets of {case['bucket_mb']} MiB; "
                     f"forward alone peaks at {case['forward_peak_bytes'] / 2 ** 20:.1f} MiB")
        lines.append("| contender | iteration ms (median) | / floor (q1-q3) | exposed ms (q1-q3) | exposed / floor's "
                     "(q1-q3) | peak MiB above start |")
        lines.append("|---|---|---|---|---|---|")
        for name, row in case["contenders"].items():
            ms = f"{1e3 * row['median_s']:.1f}"
            peak = f"{row['peak_bytes'] / 2 ** 20:.1f}"
            if name == "fwd+bwd":
                lines.append(f"| {name} | {ms} | | | | {peak} |")
                continue
            r, e, x = row["ratio_to_floor"], row["exposed_s"], row["exposed_to_floor"]
            lines.append(f"| {name} | {ms} | {r[1]:.3f} ({r[0]:.3f}-{r[2]:.3f}) | {1e3 * e[1]:.1f} "
                         f"({1e3 * e[0]:.1f}-{1e3 * e[2]:.1f}) | {x[1]:.2f} ({x[0]:.2f}-{x[2]:.2f}) | {peak} |")
    return "\n".join(lines)


def main(args) -> int:
    """Runs every (workload, optimizer) of ``args`` (see ``bench/__main__.py``) and writes results.json and
    summary.md to ``args.out``."""
    device = args.device
    workloads = [WORKLOADS[name] for name in (args.workloads or ("resnet18-32px", "bert6-512"))]
    meta = environment(device)
    meta.update(mode="training", rounds=args.steps, warmup=args.warmup, threads=torch.get_num_threads())
    results = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profiles = []
    for workload in workloads:
        for optimizer in args.optimizers:
            case = run_case(workload, optimizer, device, args.steps, args.warmup, args.bucket_mb)
            if args.profile:
                case["interleaving"] = profile_interleaving(workload, optimizer, torch.device(device), out,
                                                            args.bucket_mb)
                profiles.append(f"- {workload.name} {optimizer}: " + ("; ".join(
                    f"{name}: {p['before_backward_ends']} of {p['optimizer_kernels']} optimizer kernels start "
                    f"before the last of {p['other_kernels']} other kernels ends"
                    for name, p in case["interleaving"].items()) or "traces written; kernels are counted on a GPU "
                    "only (on the CPU the hooks run on backward's own thread, between its ops)"))
            results.append(case)
            print(table([case]), flush=True)
            (out / "results.json").write_text(json.dumps(dict(meta=meta, cases=results), indent=1))
    header = "\n".join(f"- {key}: {value}" for key, value in meta.items())
    overlap = ("\n\n## Where the optimizer's kernels run (torch.profiler, one iteration)\n\n" + "\n".join(profiles)
               if profiles else "")
    (out / "summary.md").write_text(f"# Training iteration: the step inside backward\n\n{header}\n{table(results)}"
                                    f"{overlap}\n")
    print(f"\nwrote {out / 'results.json'}, {out / 'summary.md'}")
    return 0
