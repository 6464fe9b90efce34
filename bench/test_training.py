"""The training-iteration case of ``python -m bench --training`` (bench/training.py), run once on a tiny model as a
smoke test: every contender iterates, the step inside backward stays bit-identical to the ordinary step, and the
report has every column."""

import pytest
import torch

from bench import training


@pytest.fixture
def one_thread():
    """A tiny model's ops wait at OpenMP barriers for milliseconds when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_case_runs_and_in_backward_matches_the_ordinary_step(one_thread):
    device = torch.device("cpu")
    workload = training.WORKLOADS["tiny"]
    (ordinary, model, _), (in_backward, twin, opt) = (
        training.build(workload, "tvlars", name, device, bucket_mb=0.001) for name in ("ours", "ours-in-backward"))
    for _ in range(3):
        ordinary()
        in_backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert len(opt._in_backward._slots) > 1  # backward stepped the buckets
    case = training.run_case(workload, "lamb", device, rounds=2, warmup=1)
    assert set(case["contenders"]) == set(training.CONTENDERS)
    assert case["grad_bytes"] == 4 * case["params"] and all(
        row["peak_bytes"] > 0 for row in case["contenders"].values())
    assert "ours-in-backward" in training.table([case])


def test_interleaving_counts_the_optimizer_kernels_queued_before_backward_ends():
    """The GPU check's overlap evidence, on hand-made kernel lists: two of three of our kernels start before the last
    backward kernel ends; after the whole backward, none does."""
    backward = [("void at::native::elementwise_kernel<...>", 0.0, 1.0), ("ampere_sgemm_128x64_nn", 1.0, 5.0)]
    inside = backward + [("void tvlars::lars_step_kernel<float, false>(...)", 2.0, 2.5),
                         ("lars_update_kernel", 4.0, 4.2), ("lamb_update_kernel", 6.0, 6.1)]
    assert training.interleaving(inside) == dict(optimizer_kernels=3, before_backward_ends=2, other_kernels=2)
    after = backward + [("void tvlars::lars_step_kernel<float, false>(...)", 5.5, 6.0)]
    assert training.interleaving(after) == dict(optimizer_kernels=1, before_backward_ends=0, other_kernels=2)
