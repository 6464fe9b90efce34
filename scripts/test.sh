#!/usr/bin/env bash
# Quick start, command 2: set everything up, then run the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n== running the tests (%s)\n' "$(date +%H:%M:%S)"
exec "${TVLARS_VENV:-.venv}/bin/python" -m pytest "$@"
