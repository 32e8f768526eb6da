#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the GPU-only tests, then the full benchmark suite, into
# benchmarks/results/<YYYY-MM-DD>-<gpu-name>/ (test log + JUnit XML, bench.json/md/png, nvidia-smi output, versions).
#
#   benchmarks/gpu_check.sh                 # runs $PYTHON, else .venv/bin/python, else python3
#   benchmarks/gpu_check.sh --install       # first pip-installs fusionkern[geo,kernels,export,scan,bench,dev]
#   benchmarks/gpu_check.sh --quick         # the benchmark suite's quick mode (checks it runs, measures nothing)
#
# Options: --install, --install-trt (also the trt extra), --quick, --time SECONDS (per benchmark case),
#          --select EXPR (pytest -k for the benchmarks), --out DIR, --skip-tests, --skip-bench, -h/--help.
# Nothing is installed unless asked. The GPU's settings are only read (nvidia-smi queries), never changed.
# A failing test does not stop the benchmarks; the exit code is non-zero if anything failed.

set -u
set -o pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

INSTALL=0
INSTALL_TRT=0
QUICK=0
TIME=""
SELECT=""
OUT=""
RUN_TESTS=1
RUN_BENCH=1
while [ $# -gt 0 ]; do
    case "$1" in
        --install) INSTALL=1 ;;
        --install-trt) INSTALL=1; INSTALL_TRT=1 ;;
        --quick) QUICK=1 ;;
        --time) TIME="${2:?--time needs a value}"; shift ;;
        --select) SELECT="${2:?--select needs a value}"; shift ;;
        --out) OUT="${2:?--out needs a value}"; shift ;;
        --skip-tests) RUN_TESTS=0 ;;
        --skip-bench) RUN_BENCH=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
else
    PY="python3"
fi

FAILED=()
note() { echo "gpu_check: $*"; }

# 1. A CUDA GPU, seen by the driver and by torch.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: this machine has no NVIDIA driver" >&2
    exit 2
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi sees no GPU" >&2
    exit 2
fi

# 2. Optional installation (only when asked).
if [ "$INSTALL" = 1 ]; then
    EXTRAS="geo,kernels,export,scan,bench,dev"
    [ "$INSTALL_TRT" = 1 ] && EXTRAS="$EXTRAS,trt"
    note "installing fusionkern[$EXTRAS] into $("$PY" -c 'import sys; print(sys.prefix)')"
    if ! "$PY" -m pip install --quiet -e ".[$EXTRAS]"; then
        echo "gpu_check: pip install failed" >&2
        exit 2
    fi
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: torch in $PY does not see a CUDA GPU (a CPU-only torch build?): $("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1)" >&2
    exit 2
fi

# The kernels must run compiled on the GPU, never on Triton's CPU interpreter.
unset TRITON_INTERPRET

# 3. The report folder.
DATE="$(date -u +%Y-%m-%d)"
GPU_NAME="$("$PY" -c 'from fusionkern.bench.machine import machine_name; print(machine_name("cuda"))' 2>/dev/null)"
[ -n "$GPU_NAME" ] || GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')"
DEST="${OUT:-$REPO/benchmarks/results/$DATE-$GPU_NAME}"
mkdir -p "$DEST" || exit 2
note "report folder $DEST"

nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1
nvidia-smi -q > "$DEST/nvidia-smi-q.txt" 2>&1
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "python: $PY ($("$PY" --version 2>&1))"
    echo "commit: $(git --no-optional-locks -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [ -n "$(git --no-optional-locks -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        echo "uncommitted changes: yes"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2
    echo
    "$PY" - <<'EOF'
import json
from fusionkern.bench.machine import describe_machine
print(json.dumps(describe_machine("cuda"), indent=2))
EOF
    echo
    "$PY" -m pip freeze 2>/dev/null
} > "$DEST/versions.txt" 2>&1

# 4. The whole test suite with CUDA visible: the GPU sweeps (marked gpu) run, and the kernel and backend parity
#    tests that run on the CPU interpreter elsewhere run compiled on the card.
if [ "$RUN_TESTS" = 1 ]; then
    note "tests on the GPU: pytest tests/ (TRITON_INTERPRET unset)"
    "$PY" -m pytest tests/ -p no:cacheprovider -rfEs --junitxml="$DEST/tests-gpu.xml" 2>&1 | tee "$DEST/tests-gpu.log"
    status=$?
    if [ "$status" != 0 ]; then
        FAILED+=("GPU tests (pytest exit code $status, see tests-gpu.log)")
    fi
fi

# 5. The full benchmark suite on the GPU.
if [ "$RUN_BENCH" = 1 ]; then
    BENCH_ARGS=(bench --device cuda --out "$DEST" --note "GPU figures from benchmarks/gpu_check.sh on $(hostname), $DATE")
    [ "$QUICK" = 1 ] && BENCH_ARGS+=(--quick)
    [ -n "$TIME" ] && BENCH_ARGS+=(--time "$TIME")
    [ -n "$SELECT" ] && BENCH_ARGS+=(--select "$SELECT")
    note "benchmarks: fusionkern ${BENCH_ARGS[*]}"
    "$PY" -m fusionkern.cli "${BENCH_ARGS[@]}" 2>&1 | tee "$DEST/bench.log"
    status=$?
    if [ "$status" != 0 ]; then
        FAILED+=("benchmarks (exit code $status, see bench.log and bench.md)")
    fi
fi

echo
if [ "${#FAILED[@]}" -gt 0 ]; then
    note "FAILED:"
    for item in "${FAILED[@]}"; do echo "  - $item"; done
    note "report in $DEST"
    exit 1
fi
note "all passed; report in $DEST"
exit 0
