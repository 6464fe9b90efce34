#!/usr/bin/env bash
# The GPU check's plumbing, run the way the GPU machine runs it, on a machine without a GPU: Python 3.12, torch 2.11
# (a CUDA 13.0 build), Triton 3.6, numpy 2.5, pytest-xdist and pytest-timeout, the package imported from this checkout
# through PYTHONPATH and never installed. As for the GPU machine, scripts/prebuild_gpu_libs.sh first builds both
# libraries (the CUDA one too) into .prebuilt-gpu/; this script checks that they load under that stack from there, and
# bench/gpu_check.sh then runs with the GPU check's own caps (90 s for the build) and must take them instead of
# building. Then the Triton kernels are compiled for sm_90 by that Triton (the one the GPU runs), and a sample of the
# Triton tests is interpreted by it.
#
#   scripts/gpu_stack_check.sh [OUTDIR]       (default: .gpu-stack-check/)
#
# The environment goes to $TVLARS_GPU_STACK_VENV (default ./.venv-gpu-stack). Triton 3.6's interpreter, which runs
# the Triton kernels on the CPU, fails with numpy 2.4 and later, and the GPU machine has numpy 2.5 (the package
# reports the interpreter as unavailable there; on a GPU the interpreter is never used). So everything runs with numpy
# 2.5 except the interpreted tests, which put a numpy<2.4 folder ($venv/numpy-lt-2.4, numpy alone) first on
# PYTHONPATH: same torch and Triton, one ~20 MB install, no second environment.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.gpu-stack-check}"
venv="${TVLARS_GPU_STACK_VENV:-.venv-gpu-stack}"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

find_python312() {
  local candidate
  for candidate in "${PYTHON312:-}" python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
    if [[ -n "$candidate" ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [[ ! -x "$venv/bin/python" ]]; then
  python312=$(find_python312) || { echo "gpu_stack_check: no Python 3.12 found (set PYTHON312)" >&2; exit 1; }
  step "creating $venv with $python312"
  "$python312" -m venv "$venv"
fi
venv=$(cd "$venv" && pwd)
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
if ! "$venv/bin/python" -c "import torch, triton, numpy, pytest, xdist, pytest_timeout, hypothesis, ninja, timm, sys
sys.exit(not (torch.__version__.startswith('2.11.') and triton.__version__.startswith('3.6.')
              and numpy.__version__.startswith('2.5.')))" 2>/dev/null; then
  # torchvision pinned to torch 2.11's (timm needs it): an unpinned one brings a newer torch along
  step "installing the GPU machine's stack: torch 2.11 (brings Triton 3.6), numpy 2.5, pytest and its plugins, timm"
  pip install "torch==2.11.0" "torchvision==0.26.0" "numpy==2.5.2" pytest pytest-xdist pytest-timeout hypothesis ninja \
    timm
fi
old_numpy="$venv/numpy-lt-2.4"
if ! PYTHONPATH="$old_numpy" "$venv/bin/python" -c "import numpy, sys
sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" 2>/dev/null; then
  step "installing numpy<2.4 into $old_numpy, for Triton 3.6's interpreter only"
  rm -rf "$old_numpy"
  pip install --no-deps --target "$old_numpy" "numpy<2.4"
fi
"$venv/bin/python" -c "import sys, torch, triton, numpy
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
if "$venv/bin/python" -P -c "import tvlars_fused" 2>/dev/null && [[ -z "${PYTHONPATH:-}" ]]; then
  echo "gpu_stack_check: tvlars_fused is installed in $venv; the GPU machine imports it from the checkout" >&2
  exit 1
fi

export TVLARS_FUSED_CACHE="$PWD/.torch_extensions"
step "both libraries built for that stack (sm_90) into .prebuilt-gpu/, as for the GPU machine"
PYTHON="$venv/bin/python" bash scripts/prebuild_gpu_libs.sh .prebuilt-gpu
# Both load from there under that stack with building forbidden; the CUDA one needs no driver to load (only to run).
PYTHONPATH="$PWD" TVLARS_FUSED_PREBUILT=.prebuilt-gpu TVLARS_FUSED_JIT=0 "$venv/bin/python" -c "
import sys, torch
from tvlars_fused import _extension
for kind in ('cpu', 'cuda'):
    reason = _extension.unavailable_reason(kind)
    print(f'{kind} library: {reason or \"loaded from \" + str(_extension._prebuilt(kind))}')
    if reason is not None:
        sys.exit(1)
for op in ('lars_step', 'lamb_step'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f'tvlars_fused::{op}', 'CUDA'), op"

step "bench/gpu_check.sh plumbing (GPU_CHECK_DEVICE=cpu) with that stack, from the checkout, with its own caps"
rm -rf "$out"
mkdir -p "$out"
# Two xdist workers, not the GPU machine's six: each imports torch and collects every test, which on two cores only
# queues (47-56 s for the tests stage with six here, 37 s with two).
PYTHON="$venv/bin/python" GPU_CHECK_DEVICE=cpu GPU_CHECK_SETS=tiny GPU_CHECK_WORKERS="${GPU_CHECK_WORKERS:-2}" \
  bash bench/gpu_check.sh "$out/gpu-check"
cat "$out/gpu-check/SUMMARY.md"
grep -qF "cpu extension: loaded, prebuilt: $PWD/.prebuilt-gpu/_C.so" "$out/gpu-check/SUMMARY.md" || {
  echo "gpu_stack_check: the GPU check built the CPU library instead of taking .prebuilt-gpu/_C.so" >&2
  exit 1
}

step "the Triton kernels compiled for sm_90 by Triton 3.6 (numpy 2.5), and interpreted by it (numpy<2.4)"
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest tests/test_triton_compile.py -q -rs -p no:cacheprovider
PYTHONPATH="$old_numpy:$PWD" TVLARS_FUSED_PREBUILT=.prebuilt-gpu "$venv/bin/python" -m pytest tests/test_build.py \
  tests/test_triton.py -q -rs -p no:cacheprovider -x \
  -k "test_build or found_inf or sharded_split_step_matches or bfloat16"
