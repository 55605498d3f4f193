#!/usr/bin/env bash
# The GLUE grid on one GPU: WORKERS instances of glue_accuracy.py share one work dir (a lock file
# per run), each taking the next unclaimed run, longest first. The model is small, so one process
# leaves the GPU mostly idle between kernel launches; several keep it busy.
#
# Phases, in order of what the results need most (a worker moves on when a phase has nothing
# left to claim):
#   1. every task and method, seed 0, full training sets (SST-2 too);
#   2. seeds 1 and 2 on the four smaller tasks (RTE and MRPC are the noisy ones);
#   3. lambda study: diff and structured with 10x the paper's lambda (own work dir and results);
#   4. seeds 1 and 2 on SST-2.
#
#   WORKERS=8 DATA_DIR=../shared/glue WORK=benchmarks/work/glue_accuracy_gpu benchmarks/glue_accuracy_gpu.sh
#
# Then rebuild the tables from the finished runs (on any machine):
#   python benchmarks/glue_accuracy.py --report-only --work-dir $WORK/grid --notes-file benchmarks/glue_accuracy_notes.md
set -u
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-8}
DATA_DIR=${DATA_DIR:-../shared/glue}
WORK=${WORK:-benchmarks/work/glue_accuracy_gpu}
RESULTS=${RESULTS:-$WORK/results}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"

PYTHON=${PYTHON:-python3}
# EXTRA_ARGS: e.g. "--max-train-samples 64" for a smoke test of this script
# shellcheck disable=SC2206
bench=("$PYTHON" benchmarks/glue_accuracy.py --data-dir "$DATA_DIR" --sst2-train-samples 0 --no-progress ${EXTRA_ARGS:-})
worker() {
    "${bench[@]}" --work-dir "$WORK/grid" --results-dir "$RESULTS/grid" --seeds 0
    "${bench[@]}" --work-dir "$WORK/grid" --results-dir "$RESULTS/grid" --tasks cola stsb mrpc rte --seeds 1 2
    "${bench[@]}" --work-dir "$WORK/lambda" --results-dir "$RESULTS/lambda" --tasks cola stsb mrpc rte \
        --methods diff structured --seeds 0 --set diff.l0_lambda=1.25e-6 structured.l0_lambda=1.25e-6
    "${bench[@]}" --work-dir "$WORK/grid" --results-dir "$RESULTS/grid" --tasks sst2 --seeds 1 2
}

for i in $(seq 1 "$WORKERS"); do
    worker >"$WORK/logs/worker-$i.log" 2>&1 &
    sleep 2  # staggered starts: the lock files already keep two workers off one run
done
wait
