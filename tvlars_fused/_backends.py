"""Backend choice, in one place.

Every backend module exposes ``lars_step(bucket, hp, grad_scale, found_inf)`` and
``lamb_step(bucket, hp, grad_scale, found_inf)`` (see ``_types.py``). Modules are imported lazily so that
``import tvlars_fused`` needs neither Triton nor a compiler.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "foreach", "triton", "cuda", "cpp")
# Backends that take GradScaler's grad_scale / found_inf themselves (no host synchronisation).
FUSED_BACKENDS = ("triton", "cuda", "cpp")

_MODULES = {
    "reference": "tvlars_fused.reference",
    "foreach": "tvlars_fused._foreach",
    "triton": "tvlars_fused._triton_backend",
    "cuda": "tvlars_fused._cpp_backend",
    "cpp": "tvlars_fused._cpp_backend",
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can step parameters on ``device``, else why not."""
    if backend in ("reference", "foreach"):
        return None
    if backend == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (device.type == "cpu" and interpreted):
            return (f"backend='triton' needs CUDA parameters (got {device.type}); on the CPU it runs only "
                    "under the Triton interpreter (TRITON_INTERPRET=1 set before the first import of triton)")
        try:
            importlib.import_module(_MODULES["triton"])
        except ImportError as exc:
            return f"backend='triton' needs the triton package: {exc}"
        if device.type == "cpu":
            return _interpreter_problem()
        return None
    if backend in ("cuda", "cpp"):
        want = "cuda" if backend == "cuda" else "cpu"
        if device.type != want:
            return f"backend='{backend}' steps {want} parameters only (got {device.type})"
        if backend == "cuda" and not torch.cuda.is_available():
            return "backend='cuda' needs a CUDA GPU and driver, and torch.cuda.is_available() is False"
        from . import _extension

        return _extension.unavailable_reason(want)
    return f"unknown backend {backend!r}"


def _interpreter_problem() -> str | None:
    """Triton before 3.7 interprets kernels with numpy calls that numpy 2.4 removed (every kernel fails with "only
    0-dimensional arrays can be converted to Python scalars"): say so instead of failing in every test."""
    import numpy
    import triton

    def version(text: str) -> tuple[int, int]:
        major, minor = text.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"backend='triton' on the CPU runs in Triton's interpreter, which in triton {triton.__version__} "
                f"does not work with numpy {numpy.__version__}: install numpy<2.4 or triton>=3.7")
    return None


def _auto(device: torch.device) -> str:
    order = ("cuda", "triton", "foreach") if device.type == "cuda" else ("cpp", "foreach")
    for backend in order:
        if unavailable_reason(backend, device) is None:
            return backend
    return "foreach"


_resolved: dict[tuple[str, torch.device], str] = {}


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means for ``device``, or BackendUnavailableError saying why."""
    key = (backend, device)
    name = _resolved.get(key)
    if name is None:
        name = _auto(device) if backend == "auto" else backend
        reason = unavailable_reason(name, device)
        if reason is not None:
            runnable = [b for b in BACKENDS[1:] if b != name and unavailable_reason(b, device) is None]
            raise BackendUnavailableError(f"{reason}. Backends that run on {device.type} here: "
                                          f"{', '.join(runnable)} (or backend='auto')")
        _resolved[key] = name
    return name


_loaded: dict[str, ModuleType] = {}


def module(name: str) -> ModuleType:
    # A dict lookup after the first import: torch.compile traces through it, not through importlib.
    loaded = _loaded.get(name)
    if loaded is None:
        loaded = _loaded[name] = importlib.import_module(_MODULES[name])
    return loaded
