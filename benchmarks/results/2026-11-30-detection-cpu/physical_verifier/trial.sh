#!/bin/bash
# trial.sh NAME VERIFIER BUDGET
set -e
export OMP_NUM_THREADS=2
cd /tmp/rc
/work/main/.venv/bin/python recal.py /tmp/dv /tmp/rc/$1 $3 $2 2>&1 | grep -E "^(plain|verified):" > /tmp/rc/$1.log
/work/main/.venv/bin/python /work/main/benchmarks/detection_quality.py /tmp/rc/$1/best.pt --out /tmp/rc/$1/dq --modes verified --regions 0:2048:32 7:2048:32 11:3072:64 13:1536:96 17:2048:16 2>&1 | grep "^|" >> /tmp/rc/$1.log
