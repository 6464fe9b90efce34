"""Fused layer-wise adaptive optimizers for PyTorch: TVLARS, LARS and LAMB.

The math of every backend is ``shared/spec/ALGORITHMS.md``; ``reference.py`` is its eager reading.
"""

from ._backends import BACKENDS, BackendUnavailableError
from ._optimizer import exclude_1d
from .lamb import LAMB
from .lars import LARS, lars
from .reference import phi
from .tvlars import TVLARS

__all__ = ["TVLARS", "LARS", "LAMB", "phi", "lars", "exclude_1d", "BACKENDS", "BackendUnavailableError",
           "available_backends"]
__version__ = "0.1.0"


def available_backends(device="cpu") -> dict[str, str | None]:
    """Each concrete backend and why it cannot run on ``device`` (None when it can)."""
    import torch

    from ._backends import unavailable_reason

    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in BACKENDS if name != "auto"}
