"""The compiled ops (``csrc/``): load the prebuilt libraries, else JIT-build them, and say why not when neither works.

Two libraries: ``_C`` defines the ``tvlars_fused`` ops with their CPU implementation (the CPU twin, built
wherever a C++ compiler is), ``_C_cuda`` adds the CUDA implementation. A prebuilt library (``pip install -e .``
or ``python setup.py build_ext --inplace``) is used only when it was built for the running torch (it carries
the version as a string); ``$TVLARS_FUSED_PREBUILT`` names another folder searched first. Otherwise
``torch.utils.cpp_extension.load`` builds it with ninja into ``$TVLARS_FUSED_CACHE`` (default
``<repo>/.torch_extensions``). ``TVLARS_FUSED_JIT=0`` forbids JIT builds.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import re
import shutil
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR.parent / "csrc"
CPU_SOURCES = ["ops.cpp", "cpu_step.cpp"]
CUDA_SOURCES = ["cuda_step.cu"]
LIBRARY_NAMES = {"cpu": "_C", "cuda": "_C_cuda"}
DEFAULT_CUDA_ARCH = "9.0"  # the H200 test machine


def version_define(jit: bool) -> str:
    """The torch version as a C string macro. setup.py's ninja file quotes each flag; the JIT's passes them
    through the shell unquoted, so the quotes must be escaped there."""
    quote = '\\"' if jit else '"'
    return f"-DTVLARS_TORCH_VERSION={quote}{torch.__version__}{quote}"


def cxx_flags(jit: bool = False) -> list[str]:
    # no -std: torch.utils.cpp_extension picks the standard its headers need (C++17 or C++20)
    # -fno-math-errno lets sqrtf vectorise (results are unchanged: only errno is no longer set)
    return ["-O3", "-g0", "-fopenmp", "-fno-math-errno", version_define(jit)]


def nvcc_flags(jit: bool = False) -> list[str]:
    return ["-O3", version_define(jit)]  # nvcc emits no debug info unless asked (-g0 is a host flag)


def omp_link_flags() -> list[str]:
    return ["-fopenmp"]


def configure_cuda_env() -> None:
    """Defaults that make a CUDA build work here and on the GPU machine (see docs/building.md).

    ``CUDA_HOME``: /usr/local/bin/nvcc is a wrapper script, from which torch guesses /usr/local and misses the
    headers. ``TORCH_CUDA_ARCH_LIST``: the local GPU's architecture, else Hopper (unset without a GPU, torch's
    build fails)."""
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        nvcc = shutil.which("nvcc")
        if (nvcc is None or Path(nvcc).resolve().parent == Path("/usr/local/bin")) and \
                Path("/usr/local/cuda/include/cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH


def cuda_home() -> str | None:
    configure_cuda_env()
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        nvcc = shutil.which("nvcc")
        home = str(Path(nvcc).resolve().parent.parent) if nvcc else None
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return None
    return home


def _prebuilt(kind: str) -> Path | None:
    """The prebuilt library, when it was built for the running torch: first in the folder named by
    ``$TVLARS_FUSED_PREBUILT`` (libraries built elsewhere and brought along, scripts/prebuild_gpu_libs.sh), then
    next to this file."""
    marker = f"tvlars_fused built with torch {torch.__version__};".encode()
    folders = [Path(os.environ["TVLARS_FUSED_PREBUILT"])] if os.environ.get("TVLARS_FUSED_PREBUILT") else []
    for folder in folders + [PACKAGE_DIR]:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = folder / (LIBRARY_NAMES[kind] + suffix)
            if path.exists() and marker in path.read_bytes():
                return path
    return None


def _cache_dir(kind: str) -> Path:
    root = Path(os.environ.get("TVLARS_FUSED_CACHE", PACKAGE_DIR.parent / ".torch_extensions"))
    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    path = root / f"{kind}_torch{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build(kind: str) -> None:
    configure_cuda_env()  # before torch.utils.cpp_extension is first imported: it reads CUDA_HOME once
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if kind == "cuda" and (home is None or not (Path(home) / "include" / "cuda_runtime.h").exists()):
        # imported by someone else before configure_cuda_env() could set CUDA_HOME
        cpp_extension.CUDA_HOME = cuda_home()
    name = f"tvlars_fused{LIBRARY_NAMES[kind]}"
    common = dict(name=name, build_directory=str(_cache_dir(kind)), is_python_module=False, verbose=False)
    if kind == "cpu":
        cpp_extension.load(sources=[str(CSRC / s) for s in CPU_SOURCES], extra_cflags=cxx_flags(jit=True),
                           extra_ldflags=omp_link_flags(), **common)
    else:
        cpp_extension.load(sources=[str(CSRC / s) for s in CUDA_SOURCES], extra_cflags=cxx_flags(jit=True),
                           extra_cuda_cflags=nvcc_flags(jit=True), with_cuda=True, **common)


def _missing_tools(kind: str, jit: bool = True) -> str | None:
    if kind == "cuda":
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        if cuda_home() is None:
            return "nvcc not found: put it on PATH or set CUDA_HOME"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    if not jit:
        return None
    if os.environ.get("TVLARS_FUSED_JIT") == "0":
        return "TVLARS_FUSED_JIT=0 forbids building it"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the pip package's binary, when its bin folder is not on PATH
        except ImportError:
            return "ninja is needed to build it (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


@functools.cache
def _load(kind: str) -> str | None:
    """Loads the ``kind`` library once; None when loaded, else why it could not be."""
    if kind == "cuda":
        reason = _load("cpu")  # defines the ops the CUDA library implements
        if reason is not None:
            return f"the CPU library that defines the ops is unavailable: {reason}"
        configure_cuda_env()
    path = _prebuilt(kind)
    loaded = False
    if path is not None:
        try:
            torch.ops.load_library(str(path))
            loaded = True
        except OSError:  # e.g. a missing CUDA runtime library: a JIT build may still work
            pass
    if not loaded:
        reason = _missing_tools(kind)
        if reason is not None:
            return f"the tvlars_fused {kind} extension is not built and cannot be JIT-built: {reason}"
        try:
            _jit_build(kind)
        except Exception as exc:  # a compiler error: report it, the caller falls back or raises
            lines = str(exc).strip().splitlines()
            return f"JIT build of the tvlars_fused {kind} extension failed: {' | '.join(lines[-5:])}"
    if kind == "cpu":
        _register_fakes()
    return None


def unavailable_reason(kind: str) -> str | None:
    """None when the ops run on ``kind`` ("cpu" or "cuda") parameters, else one message saying what is missing."""
    if kind not in LIBRARY_NAMES:
        raise ValueError(f"Invalid kind: {kind!r} (must be 'cpu' or 'cuda')")
    return _load(kind)


def ops():
    """``torch.ops.tvlars_fused``, loading the CPU library first."""
    reason = _load("cpu")
    if reason is not None:
        raise RuntimeError(reason)
    return torch.ops.tvlars_fused


def _register_fakes() -> None:
    """The ops return nothing and only mutate their arguments, so their fake impls do nothing. The table forms
    are called in eager steps only (their schemas cannot declare the tensors they write); their fakes let
    fake-tensor tools inspect a call all the same."""
    for name in ("lars_step", "lamb_step", "lars_step_table", "lamb_step_table"):
        torch.library.register_fake(f"tvlars_fused::{name}", _no_output)


def _no_output(*args, **kwargs):
    return None
