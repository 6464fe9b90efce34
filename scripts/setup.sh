#!/usr/bin/env bash
# Sets up everything the package, its tests and its benchmark need, in a virtual environment (default
# ./.venv, or $TVLARS_VENV): PyTorch 2.14.1 (the build that can compile CUDA code), the test and benchmark
# tools, and the package itself, editable, with its C++ (and, where nvcc is found, CUDA) extensions.
# Safe to run again: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TVLARS_VENV:-.venv}"
python="${PYTHON:-python3}"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

if [[ ! -x "$venv/bin/python" ]]; then
  step "creating $venv"
  "$python" -m venv "$venv"
fi
# This machine's pip configuration names local package folders that may be absent; pip warns about each.
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

step "installing torch (its own pip call: the package's build imports it)"
pip install "torch==${TVLARS_TORCH:-2.14.1}"
step "installing build, test and benchmark tools"
pip install "setuptools>=64" wheel ninja pytest pytest-benchmark hypothesis numpy timm matplotlib
step "building and installing tvlars-fused (C++ CPU twin, CUDA kernels when nvcc is found)"
pip install --no-build-isolation -e .
"$venv/bin/python" -c "import tvlars_fused as t; print('backends on cpu:', {k: v is None for k, v in t.available_backends('cpu').items()})"
