"""One optimizer step per (parameter set, optimizer, contender), timed by pytest-benchmark.

The same contenders as ``python -m bench`` except the slow-to-build ones (foreach+compile) and the PyPI peers;
torch's SGD and AdamW (the floors) are in the group of each optimizer they are the floor of. The fused backends also
run with bfloat16 state (``cpp+bf16``: stochastic rounding), as ``python -m bench --state-dtypes float32,bfloat16``. Sizes stay small
enough for a CPU. Cases that cannot run here are skipped with the reason. Run from the repository root:
``pytest bench --benchmark-only`` (or ``pytest bench/test_bench_steps.py``)."""

import pytest
import torch

from bench import byte_model
from bench.harness import OPTIMIZERS, Storage, contenders, with_storage
from bench.param_sets import all_sets

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (pip install -e '.[bench]')")

SETS = ("resnet50", "many-tiny-1M", "many-tiny-2000x1")
# bfloat16 state on the fused backends only: the stochastic rounding in reference and foreach is many torch ops per
# tensor, seconds a ResNet-50 step, too slow for the default run's smoke test.
BF16_STATE = {c.name: c for c in (with_storage(contenders()[name], Storage(torch.bfloat16))
                                  for name in ("cpp", "cuda", "triton"))}
TABLE = {**contenders(), **BF16_STATE}
CONTENDERS = [name for name, c in TABLE.items() if c.kind in ("ours", "baseline", "torch")]
CASES = [(s, o, c) for s in SETS for o in OPTIMIZERS for c in CONTENDERS if o in TABLE[c].optimizers]


@pytest.mark.parametrize("set_name,optimizer,contender", CASES, ids=["-".join(case) for case in CASES])
def test_step(benchmark, params_of, device, set_name, optimizer, contender):
    entry = TABLE[contender]
    reason = entry.why_not(optimizer, device)
    if reason is not None:
        pytest.skip(reason)
    params = params_of(set_name)
    step = entry.build(optimizer, params)
    step()  # allocates the state outside the timing

    def timed_step():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    param_set = all_sets()[set_name]
    benchmark.group = f"{set_name} {optimizer}"
    algorithm = entry.algorithm or optimizer  # the floors move their own bytes
    state = dict(state_dtype=entry.storage.state_dtype) if entry.kind == "ours" else {}
    benchmark.extra_info.update(numel=param_set.numel, num_tensors=param_set.num_tensors,
                                bytes_per_step=byte_model.bytes_per_step(algorithm, torch.float32, param_set.numel,
                                                                         **state))
    benchmark.pedantic(timed_step, rounds=5, warmup_rounds=2, iterations=1)
