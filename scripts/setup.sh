#!/usr/bin/env bash
# Sets up everything the package, its tests, its benchmark and its example need, in a virtual environment (default
# ./.venv, or $TVLARS_VENV): PyTorch 2.14.1 (the build that can compile CUDA code), the test, benchmark and example
# tools, and the package itself, editable, with its C++ (and, where nvcc is found, CUDA) extensions.
# Safe to run again: what is already there is kept, and the package is rebuilt only when its build inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TVLARS_VENV:-.venv}"
python="${PYTHON:-python3}"
torch_version="${TVLARS_TORCH:-2.14.1}"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

if [[ ! -x "$venv/bin/python" ]]; then
  step "creating $venv"
  "$python" -m venv "$venv"
fi
export PATH="$PWD/$venv/bin:$PATH"  # the venv's ninja: without it the build falls back to one file at a time
# This machine's pip configuration names local package folders that may be absent; pip warns about each.
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
# transformers and accelerate: tests/test_ecosystem.py trains a tiny BERT with the Hugging Face Trainer (offline).
tools=(setuptools wheel ninja pytest pytest-benchmark hypothesis numpy timm matplotlib scikit-learn
       transformers accelerate)

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null
then
  step "installing torch $torch_version (its own pip call: the package's build imports it)"
  pip install "torch==$torch_version"
fi
if ! "$venv/bin/python" -c "import ninja, pytest, pytest_benchmark, hypothesis, numpy, timm, matplotlib, sklearn, \
    transformers, accelerate" 2>/dev/null; then
  step "installing build, test, benchmark and example tools"
  pip install "${tools[@]}"
fi

# The build's inputs: rebuild only when one of them (or torch) changed since the last build into this venv.
stamp="$venv/.tvlars_fused_build"
inputs=$({ cat setup.py pyproject.toml csrc/* tvlars_fused/_extension.py; "$venv/bin/python" -c \
  "import torch; print(torch.__version__)"; } | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]] || ! "$venv/bin/python" -c "import tvlars_fused" 2>/dev/null; then
  step "building and installing tvlars-fused (C++ CPU twin, CUDA kernels when nvcc is found)"
  pip install --no-build-isolation -e .
  echo "$inputs" >"$stamp"
else
  step "tvlars-fused is built and up to date (nothing in its build inputs changed)"
fi
"$venv/bin/python" - <<'PY'
import tvlars_fused

print("backends on the CPU:")
for name, reason in tvlars_fused.available_backends("cpu").items():
    print(f"  {name:9s} {'runs' if reason is None else 'unavailable: ' + reason}")
PY
