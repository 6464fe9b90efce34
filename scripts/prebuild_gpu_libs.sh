#!/usr/bin/env bash
# Builds both compiled libraries here for the GPU machine's stack, so that bench/gpu_check.sh spends none of the GPU
# machine's time on them: the CPU library _C and the CUDA library _C_cuda, for Python 3.12, torch 2.11 (CUDA 13.0)
# and sm_90, into one folder that the device tool brings along (carry [".prebuilt-gpu"]).
#
#   scripts/prebuild_gpu_libs.sh [OUTDIR]       (default: .prebuilt-gpu/, ignored by git)
#
# PYTHON picks the interpreter whose torch the libraries are built for (default: the GPU-stack environment that
# scripts/gpu_stack_check.sh creates, .venv-gpu-stack). The build is the package's own JIT build (same sources and
# flags as on the GPU machine), into $TVLARS_FUSED_CACHE (default .torch_extensions/, one folder per torch version, so
# a second run recompiles only what changed). OUTDIR gets _C.so and _C_cuda.so, each carrying the marker
# "tvlars_fused built with torch <version>;" that tvlars_fused/_extension.py matches against the running torch before
# it loads a library (TVLARS_FUSED_PREBUILT=OUTDIR), and sources.sha256, the hashes of what they were built from:
# gpu_check.sh uses the folder only while those still match the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.prebuilt-gpu}"
py="${PYTHON:-.venv-gpu-stack/bin/python}"
export TVLARS_FUSED_CACHE="${TVLARS_FUSED_CACHE:-$PWD/.torch_extensions}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # the H200; nvcc builds no other architecture
began=$(date +%s)
rm -f "$TVLARS_FUSED_CACHE"/*/lock  # left by a build that was killed; nothing else builds while this runs
mkdir -p "$out"
rm -f "$out"/_C*.so "$out/sources.sha256"
sources=$(sha256sum csrc/* tvlars_fused/_extension.py)  # before the build: an edit during it makes the folder stale
PYTHONPATH="$PWD" TVLARS_FUSED_PREBUILT= "$py" - "$out" <<'EOF'
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from tvlars_fused import _extension

out = Path(sys.argv[1])
if torch.version.cuda is None:
    sys.exit(f"prebuild_gpu_libs: torch {torch.__version__} is a CPU-only build; the CUDA library needs a CUDA torch")
for kind in ("cpu", "cuda"):
    missing = _extension._missing_tools(kind)
    if missing is not None:
        sys.exit(f"prebuild_gpu_libs: cannot build the {kind} library: {missing}")
    began = time.monotonic()
    _extension._jit_build(kind)  # builds (or finds up to date) and loads it: a library that cannot load fails here
    name = _extension.LIBRARY_NAMES[kind]
    built = _extension._cache_dir(kind) / f"tvlars_fused{name}.so"
    marker = f"tvlars_fused built with torch {torch.__version__};".encode()
    if marker not in built.read_bytes():
        sys.exit(f"prebuild_gpu_libs: {built} lacks the marker {marker!r}")
    shutil.copyfile(built, out / f"{name}.so")
    print(f"{kind}: {out / (name + '.so')} ({built.stat().st_size / 2**20:.1f} MiB, {time.monotonic() - began:.0f}s)")
print(f"for python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
EOF
echo "$sources" >"$out/sources.sha256"
echo "prebuild_gpu_libs: $out in $(( $(date +%s) - began ))s ($(du -sh "$out" | cut -f1))"
