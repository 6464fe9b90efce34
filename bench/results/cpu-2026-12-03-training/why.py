"""Where the step inside backward's time and memory go (bench/results/cpu-2026-12-03-training/why.md).

    PYTHONPATH=. python bench/results/cpu-2026-12-03-training/why.py bert6-512 lars

One torch thread. Per contender, in rotating order over 10 rounds (after 2 untimed): forward+backward (for the step
inside backward, including its bucket steps), the time of those bucket steps alone, and step() after backward; then
each contender's peak memory above the iteration's start (bench/training.py's peak_bytes)."""

import statistics
import sys
import time

import torch

from bench import training
from tvlars_fused import _in_backward

torch.set_num_threads(1)
device = torch.device("cpu")
workload, optimizer = training.WORKLOADS[sys.argv[1]], sys.argv[2]
inside = [0.0]
step_slot = _in_backward.InBackward._step_slot


def timed_step_slot(self, slot, positions):
    start = time.perf_counter()
    step_slot(self, slot, positions)
    inside[0] += time.perf_counter() - start


_in_backward.InBackward._step_slot = timed_step_slot
contenders = {}
for name, mb in (("ours", 25), ("in-backward 25 MiB", 25), ("in-backward 4 MiB", 4), ("in-backward 1 MiB", 1),
                 ("fwd+bwd", 25)):
    kind = "ours-in-backward" if name.startswith("in-backward") else name
    contenders[name] = training.build(workload, optimizer, kind, device, bucket_mb=mb)
batch = workload.batch(device)
rows = {name: [] for name in contenders}
names = list(contenders)
for r in range(12):
    for name in names[r % len(names):] + names[:r % len(names)]:
        _, model, opt = contenders[name]
        inside[0] = 0.0
        t0 = time.perf_counter()
        workload.loss(model, batch).backward()
        t1 = time.perf_counter()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for p in model.parameters():
                p.grad = None
        t2 = time.perf_counter()
        if r >= 2:
            rows[name].append((t1 - t0, inside[0], t2 - t1))
print(f"{workload.name} {optimizer}, 1 thread, medians of 10 rounds")
print("| contender | forward+backward ms | of which bucket steps ms | step() ms | peak MiB above start |")
print("|---|---|---|---|---|")
for name, values in rows.items():
    fb, ins, st = (1e3 * statistics.median(v[k] for v in values) for k in range(3))
    peak = training.peak_bytes(contenders[name][0], device) / 2 ** 20
    print(f"| {name} | {fb:.1f} | {ins:.1f} | {st:.1f} | {peak:.1f} |")
