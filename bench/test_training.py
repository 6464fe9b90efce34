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
