#!/usr/bin/env bash
# The GPU check in one call, on a machine with one NVIDIA GPU (H100 / H200) and a CUDA build of
# torch: install fastseq with its CUDA extra, run the GPU tests at real sizes (tests/test_*_gpu.py)
# and `fastseq-bench --device cuda`, all within ~8 minutes, and write every log and result under
# bench/results/gpu-<UTC date-time>/ (and a copy under $OUT/ when OUT is set).  Each step has its
# own timeout; a step that fails or times out is recorded and the next one still runs.
# Exit status: 0 all steps passed, 1 some step failed, 2 no GPU here (nothing was run).
# See bench/gpu/README.md.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BUDGET="${FASTSEQ_GPU_BUDGET_S:-470}"            # whole run, seconds (8 minutes less a margin)
BENCH_ARGS="${FASTSEQ_GPU_BENCH_ARGS:---quick}"   # e.g. "" for the full suite, "--quick --only overhead"

die() { echo "bench/gpu/run.sh: $*" >&2; exit 2; }

# ---- 0. is there a GPU?  Stop before installing or writing anything if not.
command -v nvidia-smi >/dev/null 2>&1 ||
    die "no NVIDIA GPU here (nvidia-smi not found): this script runs the GPU tests and fastseq-bench --device cuda; run it on a machine with an NVIDIA GPU (H100/H200) and a CUDA build of torch."
nvidia-smi -L >/dev/null 2>&1 ||
    die "no NVIDIA GPU here (nvidia-smi -L failed: $(nvidia-smi -L 2>&1 | head -1))."
why=$("$PY" -c "
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f'torch is not installed for $PY ({e}); install a CUDA build of torch first')
if not torch.cuda.is_available():
    sys.exit(f'torch {torch.__version__} sees no CUDA device (a CPU-only build?); install a CUDA build of torch')
" 2>&1) || die "$why"

STAMP="$(date -u +%Y%m%d-%H%M%S)"
RES="${FASTSEQ_GPU_RESULTS:-$ROOT/bench/results/gpu-$STAMP}"
mkdir -p "$RES" || die "cannot create $RES"
RES="$(cd "$RES" && pwd)"
SCRATCH="$(mktemp -d)"                     # tests and bench run from here: not the source tree,
trap 'rm -rf "$SCRATCH"' EXIT             # so the installed (compiled) fastseq is imported
SUMMARY="$RES/summary.txt"
FAILED=0
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)" &&
    { git -C "$ROOT" diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT + uncommitted changes"; } || COMMIT="not a git checkout"
echo "fastseq GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit: $COMMIT, budget ${BUDGET}s" > "$SUMMARY"

copy_out() {                               # the device machine returns only what is under $OUT
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/$(basename "$RES")" && cp -r "$RES/." "$OUT/$(basename "$RES")/"
    fi
}

# step NAME MAX_SECONDS COMMAND...: run with a timeout (at most what the budget has left),
# output to $RES/NAME.log, one line in summary.txt; never stops the script.
step() {
    local name="$1" max="$2"; shift 2
    local left=$((BUDGET - SECONDS))
    local t=$((max < left ? max : left))
    if ((t < 10)); then
        echo "$name: skipped (time budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"; FAILED=1; return
    fi
    local what="$*"
    what="${what//$'\n'/ }"
    echo "== $name (timeout ${t}s): ${what:0:120}"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$t" "$@" > "$RES/$name.log" 2>&1
    rc=$?
    local how="ok"
    if ((rc == 124 || rc == 137)); then how="TIMED OUT after ${t}s"; FAILED=1
    elif ((rc != 0)); then how="FAILED (exit $rc)"; FAILED=1; fi
    echo "$name: $how in $((SECONDS - t0))s; log $name.log" | tee -a "$SUMMARY"
    tail -n 3 "$RES/$name.log" | sed 's/^/    /'
    copy_out
}

step nvidia-smi 20 nvidia-smi
step nvidia-smi-q 20 nvidia-smi -q

# ---- 1. install (SKIP_INSTALL=1: use what is installed).  Offline, the isolated build cannot
# fetch its build requirements: then build with what is installed, without dependencies.
do_install() {
    "$PY" -m pip install --no-input ".[cuda,test,bench]" && return 0
    echo "-- pip install with dependencies failed; trying --no-build-isolation --no-deps (offline machine?)"
    "$PY" -m pip install --no-input --no-build-isolation --no-deps .
}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    export -f do_install; export PY
    step install 200 bash -c do_install
fi

step versions 30 bash -c "cd '$SCRATCH' && '$PY' -c \"
import torch, fastseq
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())
print('GPU', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print('fastseq', fastseq.__file__, 'backends', fastseq.available_backends())
for m in ('numba', 'numba_cuda', 'numpy', 'llvmlite'):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, 'not importable:', e)
\"; '$PY' -m pip freeze 2>/dev/null | grep -iE '^(torch|numba|numba-cuda|numba_cuda|llvmlite|numpy|cython|fastseq|nvidia-|cuda-|pytest|matplotlib|tqdm)' > '$RES/pip-freeze.txt'; cat '$RES/pip-freeze.txt'"

# ---- 2. the GPU tests at real sizes
step tests 170 bash -c "cd '$SCRATCH' && '$PY' -m pytest -p no:cacheprovider -rA --durations=20 \
    --junitxml='$RES/tests.xml' '$ROOT'/tests/test_*_gpu.py"
if [ -f "$RES/tests.log" ]; then               # all skipped (no numba-cuda?) is no GPU test at all
    last="$(grep -E '^=+ .*(passed|failed|skipped|error).* in [0-9.]+s' "$RES/tests.log" | tail -1)"
    echo "    pytest: ${last:-no summary line}" | tee -a "$SUMMARY"
    if ! grep -qE '[0-9]+ passed' <<<"$last"; then
        echo "tests: no GPU test passed (skipped: is numba-cuda installed? see tests.log)" | tee -a "$SUMMARY"
        FAILED=1
    fi
fi

# ---- 3. the benchmark suite on the GPU (table in bench.log; results.json/.csv and PNGs in bench/)
step bench 220 bash -c "cd '$SCRATCH' && '$PY' -m fastseq.bench --device cuda $BENCH_ARGS --out '$RES/bench'"

echo "total $SECONDS s; results in $RES" | tee -a "$SUMMARY"
copy_out
[ -n "${OUT:-}" ] && echo "copied to $OUT/$(basename "$RES")"
exit $FAILED
