import os

import pytest
import torch
from hypothesis import settings

# The Triton interpreter must be chosen before triton is first imported; without a GPU it is the only way
# the Triton kernels run (docs/building.md).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run (a failure in CI reproduces locally); deadline off because
# the first example of a backend pays its compilation. HYPOTHESIS_PROFILE=explore draws new random examples.
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """In a run that includes tests/ (the default `pytest`), bench/'s pytest-benchmark cases run each step once
    as a smoke test instead of timing it; `pytest bench --benchmark-only` (or --benchmark-enable) times them."""
    if config.pluginmanager.hasplugin("benchmark") and not (
            config.getoption("benchmark_only") or config.getoption("benchmark_enable")):
        config.option.benchmark_disable = True
