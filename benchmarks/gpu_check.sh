#!/usr/bin/env bash
# Every GPU figure of fusionkern in one call, within a time budget, into one report folder:
# benchmarks/results/<YYYY-MM-DD>-<gpu>/ (report.md, correctness.md, bench.json/md/png, env.txt, check.log).
#
#   benchmarks/gpu_check.sh                  # the check, 450 s budget from this script's start
#   benchmarks/gpu_check.sh --dry-run        # any machine: setup, imports, phase plan, budget; no CUDA call
#   benchmarks/gpu_check.sh --budget-s 300 --phases correctness,timings
#
# Phases: setup (the checkout importable offline, wheels from .whl/, nvidia-smi, versions), correctness (every
# kernel and autotune config at the model's shapes against the reference), timings (the speed goals and model
# figures with CUDA events, by priority), scan (when rasterio is there). Each writes its results before the next
# starts. Nothing is installed into the Python it runs, no package index is used, and the GPU's settings are only
# read. Python: $PYTHON, else .venv/bin/python when it has torch, else python3. All options: --help.
#
# Exit code: 0 all passed, 1 something failed (see report.md), 2 the check could not run.

set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START="$(date +%s.%N 2>/dev/null || date +%s)"

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    PY="$REPO/.venv/bin/python"
else
    PY="python3"
fi
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no Python found ($PY); set PYTHON" >&2
    exit 2
fi
# The phases run in the work folder: the interpreter's path must not depend on the current folder.
case "$PY" in
    /*) ;;
    */*) PY="$(pwd)/$PY" ;;
    *) PY="$(command -v "$PY")" ;;
esac

cd "$REPO" || exit 2
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; echo ;;
    esac
done
PYTHONPATH="$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m gpucheck run --python "$PY" --start "$START" "$@"
