#!/usr/bin/env bash
# The one script to run on a GPU machine: build csrc/, run the GPU tests, benchmark the GPU parameter sets.
#
#   bench/gpu_check.sh OUTDIR
#
# Writes OUTDIR/SUMMARY.md (date, GPU, git commit, each stage's outcome, the benchmark tables),
# OUTDIR/bench/{results.json,summary.md,step_time.png} and one log per stage. Needs no network and installs
# nothing: the package is imported from this checkout (PYTHONPATH), torch must already be there.
#
# Every stage runs under `timeout` and gets at most what is left of GPU_CHECK_TOTAL_S (default 330 s, for
# a 6-minute slot), so a stage that hangs cannot eat the others' time:
#   GPU_CHECK_BUILD_S  (170)  JIT build of the C++/CUDA extension
#   GPU_CHECK_TESTS_S  (60)   pytest tests -m gpu (when none is marked gpu: the tests named cuda/triton/gpu)
#   the benchmark gets the rest; foreach+compile runs after it only when 75 s are still left.
# GPU_CHECK_DEVICE=cpu and GPU_CHECK_SETS=tiny check this script's plumbing on a machine without a GPU.
set -u

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT/bench" || exit 2
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SETS=${GPU_CHECK_SETS:-}
TOTAL_S=${GPU_CHECK_TOTAL_S:-330}
START=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "${BENCH_GIT_COMMIT:-unknown}")
export BENCH_GIT_COMMIT=$COMMIT
SUMMARY="$OUT/SUMMARY.md"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# run_stage NAME SECONDS COMMAND...: runs it under timeout, logs to OUT/NAME.log, records the outcome.
run_stage() {
    local name=$1 budget=$2
    shift 2
    if [ "$budget" -lt 5 ]; then
        echo "| $name | not run: time budget spent | | |" >>"$SUMMARY.stages"
        return 1
    fi
    local began rc outcome
    began=$(date +%s)
    echo "== $name (at most ${budget}s)" >&2
    timeout --kill-after=5 "$budget" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) outcome="ok" ;;
        5) outcome="no tests collected" ;;
        124 | 137) outcome="TIMED OUT after ${budget}s" ;;
        *) outcome="failed (exit $rc)" ;;
    esac
    echo "| $name | $outcome | $(( $(date +%s) - began ))s | $name.log |" >>"$SUMMARY.stages"
    tail -n 3 "$OUT/$name.log" >&2
    return $rc
}

: >"$SUMMARY.stages"
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
VERSIONS=$("$PY" -c 'import sys, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"not importable ({exc})"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, "
      f"cuda available: {torch.cuda.is_available()}")' 2>&1)

# 1. The extension: the CPU library always, the CUDA one on a GPU; the log says why one cannot load.
KINDS=$([ "$DEVICE" = cuda ] && echo "cpu cuda" || echo "cpu")
run_stage build "$(min "${GPU_CHECK_BUILD_S:-170}" "$(left)")" "$PY" -c "
import sys, time
from tvlars_fused import _extension, available_backends
failed = False
for kind in '$KINDS'.split():
    began = time.monotonic()
    reason = _extension.unavailable_reason(kind)
    print(f'{kind} extension: {\"loaded\" if reason is None else reason} ({time.monotonic() - began:.0f}s)')
    failed |= reason is not None
print('backends on $DEVICE:', available_backends('$DEVICE'))
sys.exit(1 if failed else 0)"
if [ $? -ne 0 ]; then
    export TVLARS_FUSED_JIT=0  # a build that failed or ran out of time is not retried inside the later stages
fi

# 2. Tests: the GPU-marked ones; when none is marked yet, the ones whose names say cuda, triton or gpu (all of
#    tests/ would not fit the budget; these are the parity and spec cases of the GPU backends).
TESTS_S=$(min "${GPU_CHECK_TESTS_S:-60}" "$(left)")
TESTS_BEGAN=$(date +%s)
run_stage tests "$TESTS_S" "$PY" -m pytest tests -m gpu -q -rs
if [ $? -eq 5 ]; then  # pytest's "no tests collected"
    run_stage tests-gpu-backends "$(min $(( TESTS_S - ($(date +%s) - TESTS_BEGAN) )) "$(left)")" \
        "$PY" -m pytest tests -q -rs -k "cuda or triton or gpu"
fi

# 3. The benchmark, stopping new cases 30 s before its own timeout so that the tables and plot get written
#    (results.json is also rewritten after every case). torch.compile is left to stage 4: it costs a minute.
BENCH_S=$(( $(left) - 10 ))
run_stage bench "$BENCH_S" "$PY" -m bench --device "$DEVICE" --out "$OUT/bench" --compile-sets "" \
    --time-budget $(( BENCH_S - 30 )) ${SETS:+--sets "$SETS"}

# 4. foreach vs foreach+compile on ResNet-50, only with time to spare.
if [ "$(left)" -ge 75 ]; then
    mkdir -p "$OUT/bench-compile"
    run_stage bench-compile $(( $(left) - 5 )) "$PY" -m bench --device "$DEVICE" --out "$OUT/bench-compile" \
        --sets "${SETS:-resnet50}" --optimizers lars --backends eager-loop,foreach,foreach+compile,sgd-foreach,sgd-fused \
        --compile-sets "${SETS:-resnet50}"
else
    echo "| bench-compile | not run: under 75 s left | | |" >>"$SUMMARY.stages"
fi

{
    echo "# GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- GPU: ${GPU_NAME:-none found by nvidia-smi}"
    echo "- git commit: $COMMIT"
    echo "- $VERSIONS"
    echo "- device benchmarked: $DEVICE; total time $(( $(date +%s) - START ))s of ${TOTAL_S}s"
    echo
    echo "| stage | outcome | time | log |"
    echo "|---|---|---|---|"
    cat "$SUMMARY.stages"
    echo
    echo "## Build"
    echo
    sed 's/^/    /' "$OUT/build.log" 2>/dev/null | tail -n 20
    echo
    echo "## Tests"
    echo
    for log in tests tests-gpu-backends; do
        [ -f "$OUT/$log.log" ] && echo "- $log: $(tail -n 1 "$OUT/$log.log")"
    done
    echo
    if [ -f "$OUT/bench/summary.md" ]; then
        sed 's/^\(#\+\) /\1# /' "$OUT/bench/summary.md"  # one heading level down
    else
        echo "No benchmark summary: see bench.log."
    fi
    if [ -f "$OUT/bench-compile/summary.md" ]; then
        echo
        echo "## torch.compile"
        echo
        grep -E '^(## |\|)' "$OUT/bench-compile/summary.md" | sed 's/^## /### /'  # its tables, not its header
    fi
} >"$SUMMARY"
rm -f "$SUMMARY.stages"
echo "wrote $SUMMARY" >&2
