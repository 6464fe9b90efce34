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
            raise BackendUnavailableError(reason)
        _resolved[key] = name
    return name


_loaded: dict[str, ModuleType] = {}


def module(name: str) -> ModuleType:
    # A dict lookup after the first import: torch.compile traces through it, not through importlib.
    loaded = _loaded.get(name)
    if loaded is None:
        loaded = _loaded[name] = importlib.import_module(_MODULES[name])
    return loaded
