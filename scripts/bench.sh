#!/usr/bin/env bash
# Quick start, command 1: set everything up, then run the benchmark (arguments go to `python -m bench`;
# the default is the CPU run; see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n== running the benchmark (%s)\n' "$(date +%H:%M:%S)"
exec "${TVLARS_VENV:-.venv}/bin/python" -m bench "$@"
