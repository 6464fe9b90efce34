"""Build script: the pure-Python package, the Triton kernels shipped as ``tvlars_fused.triton_kernels``, and
the compiled ops of ``csrc/``.

``tvlars_fused._C`` (ops + CPU twin) is built whenever a C++ compiler is present; ``tvlars_fused._C_cuda``
when torch has CUDA and nvcc is found. ``TVLARS_FUSED_CUDA=0`` skips the CUDA library, ``=1`` makes a missing
nvcc an error; default: auto. Build with ``pip install --no-build-isolation -e .`` (or, incrementally,
``python setup.py build_ext --inplace``). Without a prebuilt library, tvlars_fused JIT-builds it on first use.
"""

import os
import shutil
import sys

from setuptools import setup


def _extensions():
    try:
        import torch  # noqa: F401
    except ImportError:
        return [], {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tvlars_fused import _extension as build

    build.configure_cuda_env()  # before cpp_extension reads CUDA_HOME
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("tvlars_fused: no C++ compiler; the ops will be JIT-built on first use where one exists")
        return [], {}
    csrc = "csrc"
    extensions = [cpp_extension.CppExtension(
        "tvlars_fused._C", [f"{csrc}/{s}" for s in build.CPU_SOURCES],
        extra_compile_args=build.cxx_flags(), extra_link_args=build.omp_link_flags())]

    want_cuda = os.environ.get("TVLARS_FUSED_CUDA", "auto")
    if want_cuda not in ("0", "1", "auto"):
        raise ValueError(f"Invalid TVLARS_FUSED_CUDA: {want_cuda!r} (must be 0, 1 or auto)")
    missing = build._missing_tools("cuda", jit=False) if want_cuda != "0" else None
    if want_cuda == "1" and missing is not None:
        raise RuntimeError(f"TVLARS_FUSED_CUDA=1 but the CUDA library cannot be built: {missing}")
    if want_cuda != "0" and missing is None:
        cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or build.cuda_home()
        extensions.append(cpp_extension.CUDAExtension(
            "tvlars_fused._C_cuda", [f"{csrc}/{s}" for s in build.CUDA_SOURCES],
            extra_compile_args={"cxx": build.cxx_flags(), "nvcc": build.nvcc_flags()}))
    elif want_cuda != "0":
        print(f"tvlars_fused: skipping the CUDA library: {missing}")
    return extensions, {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=["tvlars_fused", "tvlars_fused.triton_kernels"],
    package_dir={"tvlars_fused.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
