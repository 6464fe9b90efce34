"""Fused layer-wise adaptive optimizers for PyTorch: TVLARS, LARS and LAMB.

The math of every backend is ``docs/algorithms.md``; ``reference.py`` is its eager reading.
"""

import importlib.util
import sys
from pathlib import Path


def _attach_triton_kernels() -> None:
    """Makes ``tvlars_fused.triton_kernels`` importable from a plain checkout.

    The Triton kernels live in the repository's top-level ``triton_kernels/`` folder. An install maps that folder into
    the package (setup.py's package_dir); a checkout put on PYTHONPATH without installing (how the GPU check runs) has
    no such mapping, so the folder is registered here under its package name. Never as a top-level ``triton_kernels``:
    Triton's own repository ships a package of that name."""
    name = __name__ + ".triton_kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "triton_kernels"
    if not (folder / "__init__.py").exists():
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_attach_triton_kernels()

from . import integrations  # noqa: E402  (imports timm only when register_with_timm is called)
from ._backends import BACKENDS, BackendUnavailableError  # noqa: E402
from ._optimizer import exclude_1d  # noqa: E402
from .lamb import LAMB  # noqa: E402
from .lars import LARS, lars  # noqa: E402
from .reference import phi  # noqa: E402
from .tvlars import TVLARS  # noqa: E402

__all__ = ["TVLARS", "LARS", "LAMB", "phi", "lars", "exclude_1d", "BACKENDS", "BackendUnavailableError",
           "available_backends", "integrations"]
__version__ = "0.1.0"


def available_backends(device="cpu") -> dict[str, str | None]:
    """Each concrete backend and why it cannot run on ``device`` (None when it can)."""
    import torch

    from ._backends import unavailable_reason

    device = torch.device(device)
    return {name: unavailable_reason(name, device) for name in BACKENDS if name != "auto"}
