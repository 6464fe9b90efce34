#!/usr/bin/env bash
# The GPU check's plumbing, run the way the GPU machine runs it, on a machine without a GPU: Python 3.12, torch 2.11
# (a CUDA 13.0 build), Triton 3.6, the package imported from this checkout through PYTHONPATH and never installed, the
# extension JIT-built from csrc/. Then the Triton kernels are compiled for sm_90 by that Triton (the one the GPU runs).
#
#   scripts/gpu_stack_check.sh [OUTDIR]       (default: .gpu-stack-check/)
#
# The environment goes to $TVLARS_GPU_STACK_VENV (default ./.venv-gpu-stack). numpy is pinned below 2.4 there:
# Triton 3.6's interpreter, which runs the Triton tests on the CPU, fails with numpy 2.4 and later.
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
if ! "$venv/bin/python" -c "import torch, triton, numpy, pytest, hypothesis, ninja, timm, sys
sys.exit(not (torch.__version__.startswith('2.11.') and triton.__version__.startswith('3.6.')))" 2>/dev/null; then
  step "installing the GPU machine's stack: torch 2.11 (brings Triton 3.6), numpy<2.4, pytest, hypothesis, ninja, timm"
  pip install "torch==2.11.0" "numpy<2.4" pytest hypothesis ninja timm
fi
"$venv/bin/python" -c "import sys, torch, triton, numpy
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
if "$venv/bin/python" -P -c "import tvlars_fused" 2>/dev/null && [[ -z "${PYTHONPATH:-}" ]]; then
  echo "gpu_stack_check: tvlars_fused is installed in $venv; the GPU machine imports it from the checkout" >&2
  exit 1
fi

step "bench/gpu_check.sh plumbing (GPU_CHECK_DEVICE=cpu) with that stack, from the checkout"
rm -rf "$out"
mkdir -p "$out"
export TVLARS_FUSED_CACHE="$PWD/.torch_extensions"
# Two cores build the extension several times slower than the GPU machine's sixteen: wider budgets than its defaults.
PYTHON="$venv/bin/python" GPU_CHECK_DEVICE=cpu GPU_CHECK_SETS=tiny GPU_CHECK_BUILD_S="${GPU_CHECK_BUILD_S:-600}" \
  GPU_CHECK_TOTAL_S="${GPU_CHECK_TOTAL_S:-1200}" bash bench/gpu_check.sh "$out/gpu-check"
cat "$out/gpu-check/SUMMARY.md"

step "the Triton kernels compiled for sm_90 by Triton 3.6, and the Triton tests interpreted by it (a sample)"
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest tests/test_triton_compile.py tests/test_build.py -q -rs -p no:cacheprovider
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest tests/test_triton.py -q -rs -p no:cacheprovider -x \
  -k "found_inf or sharded_split_step_matches or bfloat16"
