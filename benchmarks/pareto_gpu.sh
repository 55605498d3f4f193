#!/usr/bin/env bash
# The accuracy-per-byte grid (benchmarks/pareto.py) on one GPU: WORKERS instances share one work dir
# (a lock file per run; a point waits for its first stage or its learning-rate search when another
# worker holds them). The model is small, so several processes keep the GPU busy.
#
#   WORKERS=10 DATA_DIR=../shared/glue SAMPLES=0 SST2_SAMPLES=8000 benchmarks/pareto_gpu.sh
#
# SAMPLES=0 trains on the full training sets (SST-2: its first SST2_SAMPLES examples), as the GLUE
# grid does; the CPU protocol is SAMPLES=500. Each protocol needs its own WORK dir. Afterwards, on
# any machine: python benchmarks/pareto.py --report-only --work-dir $WORK --results-dir $RESULTS
set -u
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-10}
DATA_DIR=${DATA_DIR:-../shared/glue}
SAMPLES=${SAMPLES:-0}
SST2_SAMPLES=${SST2_SAMPLES:-8000}
WORK=${WORK:-benchmarks/work/pareto_gpu_$SAMPLES}
RESULTS=${RESULTS:-$WORK/results}
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"
for i in $(seq 1 "$WORKERS"); do
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/pareto.py --data-dir "$DATA_DIR" --train-samples "$SAMPLES" \
        --sst2-train-samples "$SST2_SAMPLES" --work-dir "$WORK" --results-dir "$RESULTS" --no-progress \
        ${EXTRA_ARGS:-} >"$WORK/logs/worker-$i.log" 2>&1 &
    sleep 2
done
wait
