#!/usr/bin/env bash
# The one script to run on a GPU machine: build csrc/, run every GPU test, benchmark the GPU parameter sets, run
# compute-sanitizer over the fused kernels, and time torch.compile of the foreach step.
#
#   bench/gpu_check.sh OUTDIR
#
# Writes OUTDIR/SUMMARY.md (date, GPU, git commit, versions, each stage's outcome and time, the tests passed /
# failed / skipped per file with the names of the failures, whether each sanitizer ran and what it found, the
# benchmark tables), one log per stage, tests.xml (pytest's JUnit report) and OUTDIR/bench*/. OUTDIR holds more
# than a few files: tar it to carry it off the machine. Needs no network and installs nothing: the package is
# imported from this checkout (PYTHONPATH); torch, pytest and ninja must already be there (pytest-xdist and
# pytest-timeout are used when present).
#
# The whole run fits GPU_CHECK_TOTAL_S (default 460 s, inside an 8-minute slot). Stages run in order of the
# value of their evidence, each under `timeout` with the smaller of its cap and what is left:
#   stage           cap (env, default)          expected  what
#   build           GPU_CHECK_BUILD_S    90 s   ~35 s     JIT build of the CPU (~7 s) and CUDA (~26 s) libraries
#   tests           GPU_CHECK_TESTS_S   200 s   ~120 s    pytest tests -m gpu on GPU_CHECK_WORKERS (6) workers
#   bench           GPU_CHECK_BENCH_S   100 s   100 s     python -m bench; new cases stop 25 s before its end
#   sanitize-TOOL   GPU_CHECK_SANITIZE_S 40 s   unknown   memcheck, racecheck, synccheck: 2 steps of each fused
#                   each                                  backend (only where compute-sanitizer is on PATH)
#   bench-compile   the rest, if >= 75 s                  foreach vs foreach+compile on ResNet-50
# (The expected test and sanitizer times are estimates: neither has run on a GPU yet. Tests not started 40 s
# before the tests' budget ends are reported as skipped, so the JUnit report and the per-file counts are always
# written.)
#
# GPU_CHECK_DEVICE=cpu and GPU_CHECK_SETS=tiny check this script's plumbing on a machine without a GPU (the GPU
# tests are collected and skip; no sanitizer runs). PYTHON picks the interpreter.
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
TOTAL_S=${GPU_CHECK_TOTAL_S:-460}
WORKERS=${GPU_CHECK_WORKERS:-6}
START=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "${BENCH_GIT_COMMIT:-unknown}")
export BENCH_GIT_COMMIT=$COMMIT
SUMMARY="$OUT/SUMMARY.md"
FAILED=0

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
note() { echo "| $1 | $2 | | |" >>"$SUMMARY.stages"; }

# run_stage NAME SECONDS COMMAND...: runs it under timeout, logs to OUT/NAME.log, records the outcome.
run_stage() {
    local name=$1 budget=$2
    shift 2
    if [ "$budget" -lt 5 ]; then
        note "$name" "not run: time budget spent"
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
    [ "$rc" -ne 0 ] && FAILED=1
    echo "| $name | $outcome | $(( $(date +%s) - began ))s of ${budget}s | $name.log |" >>"$SUMMARY.stages"
    tail -n 3 "$OUT/$name.log" >&2
    return $rc
}

: >"$SUMMARY.stages"
rm -f "$OUT"/*.log "$OUT/tests.xml" "$OUT/tests-summary.md"  # nothing stale from an earlier run is reported
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
VERSIONS=$("$PY" -c 'import sys, torch
def version(name):
    try:
        return __import__(name).__version__
    except Exception as exc:
        return f"not importable ({exc})"
packages = ", ".join(name + " " + version(name) for name in ("triton", "numpy", "pytest"))
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), {packages}, "
      f"cuda available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")' 2>&1)

# 1. The extension: the CPU library always, the CUDA one on a GPU; the log says why one cannot load. A build
#    killed earlier (a timeout) leaves torch's lock file in its folder, and the next build would wait on it forever:
#    nothing else builds while this script runs, so any lock there is stale.
rm -f "${TVLARS_FUSED_CACHE:-$REPO/.torch_extensions}"/*/lock
KINDS=$([ "$DEVICE" = cuda ] && echo "cpu cuda" || echo "cpu")
run_stage build "$(min "${GPU_CHECK_BUILD_S:-90}" "$(left)")" "$PY" -c "
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

# 2. Every test marked gpu, most valuable files first. A plugin written here skips the tests not started 40 s
#    before the budget ends, so that pytest finishes and writes its report.
TESTS_S=$(min "${GPU_CHECK_TESTS_S:-200}" "$(left)")
mkdir -p "$OUT/plugins"
cat >"$OUT/plugins/gpu_check_plugin.py" <<'EOF'
"""pytest plugin of bench/gpu_check.sh: run the most valuable GPU test files first, and skip the tests that
would start after GPU_CHECK_TESTS_DEADLINE (seconds since the epoch)."""
import os
import time

import pytest

FIRST = ("test_gpu_parity.py", "test_cuda_gpu.py", "test_gpu_integrations.py", "test_gpu_graphs_streams.py",
         "test_gpu_large.py", "test_triton.py", "test_gpu_generic.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


def pytest_runtest_setup(item):
    if time.time() > float(os.environ["GPU_CHECK_TESTS_DEADLINE"]):
        pytest.skip("not run: the GPU check's time budget for tests was spent")
EOF
PYTEST_ARGS=(-m gpu -q -rfEs -p no:cacheprovider -p no:randomly -p gpu_check_plugin
             --junitxml "$OUT/tests.xml")
if "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST_ARGS+=(-n "$WORKERS")
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST_ARGS+=(--timeout 120)
fi
GPU_CHECK_TESTS_DEADLINE=$(( $(date +%s) + TESTS_S - 40 )) PYTHONPATH="$OUT/plugins:$PYTHONPATH" \
    run_stage tests "$TESTS_S" "$PY" -m pytest tests "${PYTEST_ARGS[@]}"
"$PY" - "$OUT/tests.xml" >"$OUT/tests-summary.md" 2>&1 <<'EOF'
"""Passed / failed / errors / skipped per test file from pytest's JUnit report, the failures by name, and the
skip reasons with their counts."""
import collections
import os
import sys
import xml.etree.ElementTree as ET


def test_file(classname):
    """tests.test_x (or tests.test_x.TestClass) -> tests/test_x.py: the module that collected the test, which
    for a test imported into another module is that module."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        path = "/".join(parts[:end]) + ".py"
        if os.path.exists(path):
            return path
    return classname or "?"


try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as exc:
    print(f"No JUnit report ({exc}): pytest did not finish; see tests.log.")
    sys.exit(0)
counts = collections.defaultdict(collections.Counter)
failures, reasons = [], collections.Counter()
for case in root.iter("testcase"):
    file = test_file(case.get("classname") or case.get("name") or "")  # a collection error: no classname
    row = counts[file]
    row["time"] += float(case.get("time") or 0)
    failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
    bad = failure if failure is not None else error
    if bad is not None:
        row["failed" if failure is not None else "errors"] += 1
        message = (bad.get("message") or bad.text or "").strip().splitlines() or [""]
        where = f"{file}::{case.get('name')}" if case.get("classname") else file
        failures.append(f"{where}: {message[0][:240]}")
    elif skipped is not None:
        row["skipped"] += 1
        reason = skipped.get("message") or ""
        if reason == "collection skipped":  # a module skipped as a whole: the reason is in the text
            reason = skipped.text or reason
        reasons[reason.strip()[:160]] += 1
    else:
        row["passed"] += 1
print("| file | passed | failed | errors | skipped | time |")
print("|---|---|---|---|---|---|")
total = collections.Counter()
for file in sorted(counts):
    row = counts[file]
    total.update(row)
    print(f"| {file} | {row['passed']} | {row['failed']} | {row['errors']} | {row['skipped']} | {row['time']:.0f}s |")
print(f"| all | {total['passed']} | {total['failed']} | {total['errors']} | {total['skipped']} | "
      f"{total['time']:.0f}s |")
print()
print(f"Failures and errors ({len(failures)}):" if failures else "No failures or errors.")
for line in failures:
    print(f"- {line}")
if reasons:
    print()
    print("Skip reasons:")
    for reason, count in reasons.most_common(15):
        print(f"- {count} x {reason}")
EOF

# 3. The benchmark, stopping new cases 25 s before its own timeout so that the tables and plot get written
#    (results.json is also rewritten after every case). torch.compile is left to the last stage.
BENCH_S=$(min "${GPU_CHECK_BENCH_S:-100}" "$(left)")
run_stage bench "$BENCH_S" "$PY" -m bench --device "$DEVICE" --out "$OUT/bench" --compile-sets "" \
    --time-budget $(( BENCH_S - 25 )) ${SETS:+--sets "$SETS"}

# 4. compute-sanitizer (memcheck, racecheck, synccheck) over two steps of each fused backend, in a small script.
#    Without the caching allocator every tensor is its own allocation, so memcheck sees accesses past its end.
SANITIZER=$(command -v compute-sanitizer || true)
if [ "$DEVICE" != cuda ]; then
    SANITIZED="not run: no GPU (GPU_CHECK_DEVICE=$DEVICE)"
elif [ -z "$SANITIZER" ]; then
    SANITIZED="not run: compute-sanitizer is not on PATH"
else
    SANITIZED="ran: $SANITIZER"
    cat >"$OUT/sanitize_steps.py" <<'EOF'
"""Two steps of each fused GPU backend for compute-sanitizer: TVLARS and LAMB, float32 and bfloat16 with master
weights, layers of one to several chunks, the second step with GradScaler's grad_scale and found_inf."""
import torch

from tvlars_fused import LAMB, TVLARS

SHAPES = [(64, 33), (17,), (1,), (0,), (3, 3, 4, 4), ((1 << 16) + 5,)]
gen = torch.Generator().manual_seed(0)
for backend in ("cuda", "triton"):
    for cls, kwargs in ((TVLARS, dict(lr=0.5)), (LAMB, dict(lr=1e-2, max_grad_norm=1.0))):
        for dtype, masters in ((torch.float32, False), (torch.bfloat16, True)):
            params = [torch.randn(s, generator=gen).to("cuda", dtype).requires_grad_() for s in SHAPES]
            opt = cls(params, backend=backend, master_weights=masters, **kwargs)
            for step in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to("cuda", dtype)
                if step == 1:  # what GradScaler hands a fused optimizer
                    opt.grad_scale, opt.found_inf = torch.tensor(2.0, device="cuda"), torch.tensor(0.0, device="cuda")
                opt.step()
            torch.cuda.synchronize()
            print(f"{backend} {cls.__name__} {dtype}: 2 steps", flush=True)
EOF
    for tool in memcheck racecheck synccheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage "sanitize-$tool" \
            "$(min "${GPU_CHECK_SANITIZE_S:-40}" "$(left)")" \
            "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 "$PY" "$OUT/sanitize_steps.py"
    done
fi
[ "$SANITIZED" = "ran: $SANITIZER" ] || note sanitize "$SANITIZED"

# 5. foreach vs foreach+compile on ResNet-50, only with time to spare.
if [ "$(left)" -ge 75 ]; then
    mkdir -p "$OUT/bench-compile"
    run_stage bench-compile $(( $(left) - 5 )) "$PY" -m bench --device "$DEVICE" --out "$OUT/bench-compile" \
        --sets "${SETS:-resnet50}" --optimizers lars \
        --backends eager-loop,foreach,foreach+compile,sgd-foreach,sgd-fused \
        --compile-sets "${SETS:-resnet50}"
else
    note bench-compile "not run: under 75 s left"
fi

{
    echo "# GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- GPU: ${GPU_NAME:-none found by nvidia-smi}"
    echo "- git commit: $COMMIT"
    echo "- $VERSIONS"
    echo "- device: $DEVICE; total time $(( $(date +%s) - START ))s of ${TOTAL_S}s"
    echo "- compute-sanitizer: $SANITIZED"
    echo
    echo "| stage | outcome | time | log |"
    echo "|---|---|---|---|"
    cat "$SUMMARY.stages"
    echo
    echo "## Build"
    echo
    sed 's/^/    /' "$OUT/build.log" 2>/dev/null | tail -n 20
    echo
    echo "## Tests (pytest tests -m gpu)"
    echo
    cat "$OUT/tests-summary.md"
    echo
    echo "## Sanitizers"
    echo
    for tool in memcheck racecheck synccheck; do
        if [ -f "$OUT/sanitize-$tool.log" ]; then
            echo "- $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize-$tool.log" | tail -n 1 || true)" \
                "(sanitize-$tool.log)"
        else
            echo "- $tool: $SANITIZED"
        fi
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
exit $FAILED
