#!/usr/bin/env bash
# The one script to run on a GPU machine: load (or build) csrc/'s libraries, run every GPU test, benchmark the GPU
# parameter sets, run compute-sanitizer over the fused kernels, and time torch.compile of the foreach step.
#
#   bench/gpu_check.sh OUTDIR
#
# OUTDIR gets at most 8 files (all that the device tool brings back), and only these: SUMMARY.md (date, GPU, git
# commit, versions, settings, where the libraries came from, each stage's outcome and time, the tests passed / failed
# / skipped per file with the names of the failures, what each sanitizer found or why it did not run, the benchmark
# tables), bench-results.json, bench-training-results.json and bench-compile-results.json (the benchmarks' full
# results) and gpu-check.tar.gz:
# everything else (one log per stage, tests.xml, the tests' summary, the benchmark folders). The stages write to a
# work folder outside OUTDIR ($GPU_CHECK_WORK, default a new folder under $TMPDIR or /tmp), which is packed into the
# tarball and removed at the end, also when a stage fails or times out and when this script is interrupted.
#
# Needs no network and installs nothing: the package is imported from this checkout (PYTHONPATH); torch, pytest and
# ninja must already be there (pytest-xdist and pytest-timeout are used when present). The commit is git's when the
# checkout has .git, else $BENCH_GIT_COMMIT (the device tool copies the tree without .git), else "unknown".
#
# Libraries built ahead for the GPU machine's torch (scripts/prebuild_gpu_libs.sh) are used from
# $TVLARS_FUSED_PREBUILT, default .prebuilt-gpu/ when it exists, provided csrc/ and tvlars_fused/_extension.py still
# hash as they did when they were built (sources.sha256 there) and they carry the running torch's version; otherwise
# the build stage JIT-builds them.
#
# The whole run fits GPU_CHECK_TOTAL_S (default 460 s, inside an 8-minute slot). Stages run in order of the value of
# their evidence, each in a process group of its own under `timeout` with the smaller of its cap and what is left;
# when a stage ends, whatever is left of its group (a pytest-xdist worker, say) is killed, so nothing runs on into
# the next stage:
#   stage           cap (env, default)          expected  what
#   build           GPU_CHECK_BUILD_S    90 s   ~3 s      load the prebuilt CPU and CUDA libraries; without them a
#                                               ~35 s     JIT build of the CPU (~7 s) and CUDA (~26 s) libraries
#   tests           GPU_CHECK_TESTS_S   200 s   ~120 s    pytest tests -m gpu on GPU_CHECK_WORKERS (6) workers
#   bench           GPU_CHECK_BENCH_S   100 s   100 s     python -m bench; new cases stop 25 s before its end
#   bench-training  GPU_CHECK_TRAINING_S 50 s   unknown   python -m bench --training: BERT-like iterations with the
#                                                         step inside backward, and a profile of where its kernels run
#   sanitize-TOOL   GPU_CHECK_SANITIZE_S 35 s   unknown   memcheck, racecheck, synccheck: 2 steps of each fused
#                   each                                  backend, where compute-sanitizer is found
#   bench-compile   the rest, if >= 75 s                  foreach vs foreach+compile on ResNet-50
# (The expected test and sanitizer times are estimates: neither has run on a GPU yet.) Tests not started 40 s before
# the tests' budget ends are reported as skipped, and each test's pytest-timeout (GPU_CHECK_TEST_TIMEOUT_S, 120 s) is
# cut to end 25 s before it, so pytest always finishes by itself and writes its JUnit report. With pytest-xdist the
# timeout uses pytest-timeout's thread method, which also stops a test hung inside a CUDA call (the signal method
# cannot interrupt one): it prints the stacks and ends the worker, and xdist reports that test as failed by name and
# goes on with a new worker. Without xdist the signal method is used, since the thread method would end pytest itself.
# A sanitizer that this machine refuses ("Device not supported", as under gVisor) or that runs out of time is
# reported so in SUMMARY.md and does not fail the check; the errors it finds do.
#
# GPU_CHECK_DEVICE=cpu and GPU_CHECK_SETS=tiny check this script's plumbing on a machine without a GPU (the GPU
# tests are collected and skip; no sanitizer runs). PYTHON picks the interpreter. Exits 1 when a stage failed.
set -u

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")} || exit 2
mkdir -p "$WORK/bench" || exit 2
WORK=$(cd "$WORK" && pwd)
case "$WORK/" in "$OUT"/*) echo "gpu_check: the work folder $WORK must be outside $OUT" >&2; exit 2 ;; esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SETS=${GPU_CHECK_SETS:-}
TOTAL_S=${GPU_CHECK_TOTAL_S:-460}
WORKERS=${GPU_CHECK_WORKERS:-6}
START=$(date +%s)
SETTINGS=$(env | grep -E '^(GPU_CHECK_|TVLARS_FUSED_|TORCH_CUDA_ARCH_LIST=)' | sort | tr '\n' ' ')  # as given
SUMMARY="$OUT/SUMMARY.md"
ROWS="$WORK/stages.md"
FAILED=0
STAGE_PGID=""
FINISHED=0
# timeout (not --foreground) puts itself in a process group of its own; setsid also takes the stage off the terminal
SETSID=$(command -v setsid || true)

if [ -e "$REPO/.git" ] && COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); then
    COMMIT_FROM="git"
    git -C "$REPO" diff --quiet HEAD -- 2>/dev/null || COMMIT_FROM="git, with uncommitted changes to tracked files"
elif [ -n "${BENCH_GIT_COMMIT:-}" ]; then
    COMMIT=$BENCH_GIT_COMMIT
    COMMIT_FROM="BENCH_GIT_COMMIT: the checkout has no usable .git"
    # the benchmark asks git too: keep git from answering with a repository that merely contains this copy
    export GIT_CEILING_DIRECTORIES="$(dirname "$REPO")"
else
    COMMIT=unknown
    COMMIT_FROM="no .git and no BENCH_GIT_COMMIT"
    export GIT_CEILING_DIRECTORIES="$(dirname "$REPO")"
fi
export BENCH_GIT_COMMIT=$COMMIT

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
row() { echo "| $1 | $2 | ${3:-} | ${4:-} |" >>"$ROWS"; }

# run_stage NAME SECONDS COMMAND...: runs COMMAND in a session (so a process group) of its own under timeout, logging
# to WORK/NAME.log, then kills whatever is left of that group. Sets STAGE_RC (its exit status, or 124 / 137 when it
# ran out of time) and STAGE_TIME, and STAGE_OUTCOME to the usual reading of STAGE_RC; the caller records the row.
# The stage runs in the background and is waited for, so that an INT or TERM to this script is handled at once.
run_stage() {
    local name=$1 budget=$2
    shift 2
    STAGE_TIME=0
    if [ "$budget" -lt 5 ]; then
        STAGE_RC=-1 STAGE_OUTCOME="not run: time budget spent"
        return 1
    fi
    local began
    began=$(date +%s)
    echo "== $name (at most ${budget}s)" >&2
    # a background job of a script is not a process group leader, so setsid makes no new process: $! leads the group
    ${SETSID:+"$SETSID"} timeout --kill-after=5 "$budget" "$@" >"$WORK/$name.log" 2>&1 </dev/null &
    STAGE_PGID=$!
    wait "$STAGE_PGID"
    STAGE_RC=$?
    kill -KILL -- "-$STAGE_PGID" 2>/dev/null  # workers or children that outlived the stage's main process
    STAGE_PGID=""
    STAGE_TIME=$(( $(date +%s) - began ))
    case $STAGE_RC in
        0) STAGE_OUTCOME="ok" ;;
        124 | 137) STAGE_OUTCOME="TIMED OUT after ${budget}s" ;;
        *) STAGE_OUTCOME="failed (exit $STAGE_RC)" ;;
    esac
    tail -n 3 "$WORK/$name.log" >&2
    return "$STAGE_RC"
}

# record NAME: the row of the stage just run, which fails the check unless it succeeded or had no time to run.
record() {
    if [ "$STAGE_RC" -lt 0 ]; then
        row "$1" "$STAGE_OUTCOME"
        return
    fi
    [ "$STAGE_RC" -ne 0 ] && FAILED=1
    row "$1" "$STAGE_OUTCOME" "${STAGE_TIME}s" "$1.log"
}

# in_cuda_home DIR...: the first compute-sanitizer in these CUDA installations (the toolkit has it in bin/ and in
# compute-sanitizer/).
in_cuda_home() {
    local home tool
    for home in "$@"; do
        for tool in "$home/bin/compute-sanitizer" "$home/compute-sanitizer/compute-sanitizer"; do
            [ -n "$home" ] && [ -x "$tool" ] && { echo "$tool"; return 0; }
        done
    done
    return 1
}

# The sanitizer, on PATH or in the CUDA installation: CUDA_HOME, /usr/local/cuda, nvcc's, then torch's guess.
find_sanitizer() {
    local nvcc
    command -v compute-sanitizer && return 0
    nvcc=$(command -v nvcc) && nvcc=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    in_cuda_home "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda "${nvcc:-}" /usr/local/cuda-* && return 0
    in_cuda_home "$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)"
}

finish() {
    [ "$FINISHED" = 1 ] && return
    FINISHED=1
    [ -n "$STAGE_PGID" ] && kill -KILL -- "-$STAGE_PGID" 2>/dev/null
    {
        echo "# GPU check"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "- GPU: ${GPU_NAME:-none found by nvidia-smi}"
        echo "- git commit: $COMMIT (from $COMMIT_FROM)"
        echo "- ${VERSIONS:-versions not read}"
        echo "- device: $DEVICE; total time $(( $(date +%s) - START ))s of ${TOTAL_S}s"
        echo "- settings: ${SETTINGS:-the defaults}"
        echo "- prebuilt libraries: ${PREBUILT_NOTE:-none}"
        echo "- compute-sanitizer: ${SANITIZED:-not reached}"
        [ -n "${INTERRUPTED:-}" ] && echo "- INTERRUPTED by $INTERRUPTED: the stages after the last row did not run"
        echo
        echo "| stage | outcome | time | log |"
        echo "|---|---|---|---|"
        cat "$ROWS" 2>/dev/null
        echo
        echo "## Build"
        echo
        sed 's/^/    /' "$WORK/build.log" 2>/dev/null | tail -n 20
        echo
        echo "## Tests (pytest tests -m gpu)"
        echo
        cat "$WORK/tests-summary.md" 2>/dev/null || echo "Not run."
        if [ -s "$WORK/hung-tests-stacks.log" ]; then
            echo
            echo "Tests that reached their timeout, their stacks' frames in this project (all: hung-tests-stacks.log):"
            echo
            grep -E '^Timeout|/(tests|tvlars_fused|triton_kernels)/' "$WORK/hung-tests-stacks.log" | head -n 40 |
                sed 's/^/    /'
        fi
        echo
        echo "## Sanitizers"
        echo
        for tool in memcheck racecheck synccheck; do
            if [ -n "${SANITIZER_RESULT[$tool]:-}" ]; then
                log=$([ -f "$WORK/sanitize-$tool.log" ] && echo " (sanitize-$tool.log)")
                echo "- $tool: ${SANITIZER_RESULT[$tool]}$log"
            else
                echo "- $tool: ${SANITIZED:-not reached}"
            fi
        done
        echo
        if [ -f "$WORK/bench/summary.md" ]; then
            sed 's/^\(#\+\) /\1# /' "$WORK/bench/summary.md"  # one heading level down
        else
            echo "No benchmark summary: see bench.log."
        fi
        if [ -f "$WORK/bench-training/summary.md" ]; then
            echo
            sed 's/^\(#\+\) /\1# /' "$WORK/bench-training/summary.md"  # one heading level down
        fi
        if [ -f "$WORK/bench-compile/summary.md" ]; then
            echo
            echo "## torch.compile"
            echo
            grep -E '^(## |\|)' "$WORK/bench-compile/summary.md" | sed 's/^## /### /'  # its tables, not its header
        fi
    } >"$SUMMARY"
    cp "$SUMMARY" "$WORK/SUMMARY.md"
    [ -f "$WORK/bench/results.json" ] && cp "$WORK/bench/results.json" "$OUT/bench-results.json"
    [ -f "$WORK/bench-compile/results.json" ] && cp "$WORK/bench-compile/results.json" "$OUT/bench-compile-results.json"
    [ -f "$WORK/bench-training/results.json" ] &&
        cp "$WORK/bench-training/results.json" "$OUT/bench-training-results.json"
    tar -czf "$OUT/gpu-check.tar.gz" -C "$(dirname "$WORK")" --transform "s,^$(basename "$WORK"),gpu-check," \
        "$(basename "$WORK")" || FAILED=1
    # All that comes back from the device machine is 8 files of OUTDIR: more would lose some of them.
    local files
    files=$(find "$OUT" -type f | wc -l)
    if [ "$files" -gt 8 ]; then
        echo "- FAILED: $OUT holds $files files; only 8 come back from the GPU machine" >>"$SUMMARY"
        FAILED=1
    fi
    [ -z "${GPU_CHECK_WORK:-}" ] && rm -rf "$WORK"
    echo "wrote $SUMMARY and $OUT/gpu-check.tar.gz" >&2
}
trap finish EXIT
trap 'INTERRUPTED=SIGINT; exit 130' INT
trap 'INTERRUPTED=SIGTERM; exit 143' TERM

declare -A SANITIZER_RESULT
: >"$ROWS"
rm -f "$SUMMARY" "$OUT"/bench*-results.json "$OUT/gpu-check.tar.gz"  # none stale
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
VERSIONS=$("$PY" -c 'import importlib.metadata, sys, torch
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
packages = ", ".join(name + " " + version(name)
                     for name in ("triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout"))
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), {packages}, "
      f"cuda available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")' 2>&1)

# 0. Libraries built ahead (scripts/prebuild_gpu_libs.sh), used only while they match the sources here.
PREBUILT=${TVLARS_FUSED_PREBUILT:-}
if [ -z "$PREBUILT" ] && [ -d "$REPO/.prebuilt-gpu" ]; then
    PREBUILT="$REPO/.prebuilt-gpu"
fi
unset TVLARS_FUSED_PREBUILT
if [ -z "$PREBUILT" ]; then
    PREBUILT_NOTE="none (no .prebuilt-gpu/ and no TVLARS_FUSED_PREBUILT)"
elif [ ! -f "$PREBUILT/sources.sha256" ]; then
    PREBUILT_NOTE="$PREBUILT not used: it has no sources.sha256 (scripts/prebuild_gpu_libs.sh writes one)"
elif ! sha256sum csrc/* tvlars_fused/_extension.py | cmp -s - "$PREBUILT/sources.sha256"; then
    PREBUILT_NOTE="$PREBUILT not used: built from other csrc/ or tvlars_fused/_extension.py than these"
else
    export TVLARS_FUSED_PREBUILT=$(cd "$PREBUILT" && pwd)
    PREBUILT_NOTE="$TVLARS_FUSED_PREBUILT (sources match; the build stage says whether each library was taken)"
fi

# 1. The extension: the CPU library always, the CUDA one on a GPU; the log says where each came from, or why it
#    cannot load. A build killed earlier (a timeout) leaves torch's lock file in its folder, and the next build would
#    wait on it forever: nothing else builds while this script runs, so any lock there is stale.
rm -f "${TVLARS_FUSED_CACHE:-$REPO/.torch_extensions}"/*/lock
KINDS=$([ "$DEVICE" = cuda ] && echo "cpu cuda" || echo "cpu")
run_stage build "$(min "${GPU_CHECK_BUILD_S:-90}" "$(left)")" "$PY" -c "
import os, sys, time
import torch
from tvlars_fused import _extension, available_backends
failed = False
for kind in '$KINDS'.split():
    began = time.monotonic()
    prebuilt = _extension._prebuilt(kind)
    reason = _extension.unavailable_reason(kind)
    if reason is not None:
        source = reason
    elif prebuilt is not None and os.path.realpath(prebuilt) in torch.ops.loaded_libraries:
        source = f'loaded, prebuilt: {prebuilt}'
    else:
        source = 'loaded, JIT-built (no prebuilt library for torch ' + torch.__version__ + ' was found or loaded)'
    print(f'{kind} extension: {source} ({time.monotonic() - began:.0f}s)')
    failed |= reason is not None
print('backends on $DEVICE:', available_backends('$DEVICE'))
sys.exit(1 if failed else 0)"
record build
if [ "$STAGE_RC" -ne 0 ]; then
    export TVLARS_FUSED_JIT=0  # a build that failed or ran out of time is not retried inside the later stages
fi

# 2. Every test marked gpu, most valuable files first. A plugin written here skips the tests not started 40 s
#    before the budget ends and cuts each test's timeout to end 25 s before it, so that pytest finishes and writes
#    its report.
TESTS_S=$(min "${GPU_CHECK_TESTS_S:-200}" "$(left)")
mkdir -p "$WORK/plugins"
cat >"$WORK/plugins/gpu_check_plugin.py" <<'EOF'
"""pytest plugin of bench/gpu_check.sh: run the most valuable GPU test files first, skip the tests that would
start after GPU_CHECK_TESTS_DEADLINE (seconds since the epoch), and with pytest-timeout give each test at most
GPU_CHECK_TEST_TIMEOUT_S seconds and never beyond GPU_CHECK_TESTS_END.

pytest-timeout prints a hung test's stacks, but an xdist worker's output is lost when the worker is ended; so
faulthandler, whose watchdog thread needs no interpreter lock (the test may hold it inside a CUDA call), appends
them to GPU_CHECK_STACKS 2 s before."""
import faulthandler
import os
import time

import pytest

FIRST = ("test_gpu_parity.py", "test_cuda_gpu.py", "test_gpu_integrations.py", "test_gpu_graphs_streams.py",
         "test_gpu_large.py", "test_triton.py", "test_gpu_generic.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


_stacks = []  # the file, opened once per process


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Runs before pytest-timeout's own wrapper reads the test's timeout marker."""
    if not item.config.pluginmanager.hasplugin("timeout"):
        yield
        return
    left = float(os.environ["GPU_CHECK_TESTS_END"]) - time.time()
    timeout = max(1.0, min(float(os.environ["GPU_CHECK_TEST_TIMEOUT_S"]), left))
    item.add_marker(pytest.mark.timeout(timeout), append=False)
    if not _stacks:
        _stacks.append(open(os.environ["GPU_CHECK_STACKS"], "a"))
    faulthandler.dump_traceback_later(max(0.5, timeout - 2), file=_stacks[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_runtest_setup(item):
    if time.time() > float(os.environ["GPU_CHECK_TESTS_DEADLINE"]):
        pytest.skip("not run: the GPU check's time budget for tests was spent")
EOF
PYTEST_ARGS=(-m gpu -q -rfEs -p no:cacheprovider -p no:randomly -p gpu_check_plugin --junitxml "$WORK/tests.xml")
if "$PY" -c "import xdist" 2>/dev/null; then
    PYTEST_ARGS+=(-n "$WORKERS")
    TIMEOUT_METHOD=thread
else
    TIMEOUT_METHOD=signal
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST_ARGS+=(--timeout "${GPU_CHECK_TEST_TIMEOUT_S:-120}" --timeout-method "$TIMEOUT_METHOD")
fi
TESTS_BEGAN=$(date +%s)
GPU_CHECK_TESTS_DEADLINE=$(( TESTS_BEGAN + TESTS_S - 40 )) GPU_CHECK_TESTS_END=$(( TESTS_BEGAN + TESTS_S - 25 )) \
    GPU_CHECK_TEST_TIMEOUT_S=${GPU_CHECK_TEST_TIMEOUT_S:-120} GPU_CHECK_STACKS="$WORK/hung-tests-stacks.log" \
    PYTHONPATH="$WORK/plugins:$PYTHONPATH" \
    run_stage tests "$TESTS_S" "$PY" -m pytest tests "${PYTEST_ARGS[@]}"
[ "$STAGE_RC" = 5 ] && STAGE_OUTCOME="no tests collected"
record tests
"$PY" - "$WORK/tests.xml" >"$WORK/tests-summary.md" 2>&1 <<'EOF'
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
run_stage bench "$BENCH_S" "$PY" -m bench --device "$DEVICE" --out "$WORK/bench" --compile-sets "" \
    --time-budget $(( BENCH_S - 25 )) ${SETS:+--sets "$SETS"}
record bench

# 3b. Whole training iterations, the step inside backward against the ordinary step and torch's fused optimizers,
#     and a profile of one iteration each that counts our kernels queued before backward's last kernel ends.
TRAINING_S=$(min "${GPU_CHECK_TRAINING_S:-50}" "$(left)")
mkdir -p "$WORK/bench-training"
if [ -n "$SETS" ]; then  # the plumbing check: the tiny model, briefly
    TRAINING_ARGS=(--workloads tiny --optimizers lars --steps 2 --warmup 1)
else
    TRAINING_ARGS=(--workloads bert6-512 --optimizers lars,lamb --steps 5 --warmup 2)
fi
run_stage bench-training "$TRAINING_S" "$PY" -m bench --training --device "$DEVICE" --out "$WORK/bench-training" \
    "${TRAINING_ARGS[@]}" --profile
record bench-training

# 4. compute-sanitizer (memcheck, racecheck, synccheck) over two steps of each fused backend, in a small script.
#    Without the caching allocator every tensor is its own allocation, so memcheck sees accesses past its end.
if [ "$DEVICE" != cuda ]; then
    SANITIZED="not run: no GPU (GPU_CHECK_DEVICE=$DEVICE)"
elif ! SANITIZER=$(find_sanitizer); then
    SANITIZED="not run: compute-sanitizer is neither on PATH nor in the CUDA installation (CUDA_HOME, /usr/local/cuda)"
else
    SANITIZED="$SANITIZER"
    cat >"$WORK/sanitize_steps.py" <<'EOF'
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
        if [ -n "${REFUSED:-}" ]; then
            SANITIZER_RESULT[$tool]="not run: $REFUSED"
            row "sanitize-$tool" "not run: the machine refused compute-sanitizer"
            continue
        fi
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage "sanitize-$tool" "$(min "${GPU_CHECK_SANITIZE_S:-35}" "$(left)")" \
            "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 "$PY" "$WORK/sanitize_steps.py"
        found=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$WORK/sanitize-$tool.log" 2>/dev/null | tail -n 1)
        refusal=$(grep -m 1 -iE 'device not supported|not supported on this (device|platform)' \
            "$WORK/sanitize-$tool.log" 2>/dev/null)
        if [ -n "$refusal" ]; then  # the machine, not the code: gVisor refuses the device to the sanitizer
            REFUSED="this machine refused it: ${refusal//|/\\|}"
            SANITIZER_RESULT[$tool]="not run: $REFUSED"
            row "sanitize-$tool" "not run: the machine refused compute-sanitizer" "${STAGE_TIME}s" "sanitize-$tool.log"
        elif [ "$STAGE_RC" = 124 ] || [ "$STAGE_RC" = 137 ]; then
            SANITIZER_RESULT[$tool]="timed out after $STAGE_TIME s, not counted as a failure${found:+; last: $found}"
            row "sanitize-$tool" "$STAGE_OUTCOME (not counted as a failure)" "${STAGE_TIME}s" "sanitize-$tool.log"
        else
            SANITIZER_RESULT[$tool]=${found:-$STAGE_OUTCOME}
            record "sanitize-$tool"
        fi
    done
fi
[ -n "${SANITIZER:-}" ] || row sanitize "$SANITIZED"

# 5. foreach vs foreach+compile on ResNet-50, only with time to spare.
if [ "$(left)" -ge 75 ]; then
    mkdir -p "$WORK/bench-compile"
    run_stage bench-compile $(( $(left) - 5 )) "$PY" -m bench --device "$DEVICE" --out "$WORK/bench-compile" \
        --sets "${SETS:-resnet50}" --optimizers lars \
        --backends eager-loop,foreach,foreach+compile,sgd-foreach,sgd-fused \
        --compile-sets "${SETS:-resnet50}"
    record bench-compile
else
    row bench-compile "not run: under 75 s left"
fi

finish
exit $FAILED
