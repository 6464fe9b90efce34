"""``pytest bench --benchmark-only``: the harness's cases as pytest-benchmark tests.

BENCH_DEVICE picks the device (default: cuda when there is one, else cpu). Parameters and gradients of a set are
made once per session and shared by every test of that set."""

import functools
import os

import pytest
import torch

from bench.harness import make_params
from bench.param_sets import all_sets


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(os.environ.get("BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


@functools.lru_cache(maxsize=1)  # one set's tensors alive at a time
def _params(set_name: str, device: torch.device) -> list:
    return make_params(all_sets()[set_name], torch.float32, device)


@pytest.fixture
def params_of(device):
    return lambda set_name: _params(set_name, device)
