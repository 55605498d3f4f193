#!/usr/bin/env bash
# The GLUE grid on one GPU: WORKERS instances of glue_accuracy.py share one work dir (a lock file
# per run), each taking the next unclaimed run, longest first. The model is small, so one process
# leaves the GPU mostly idle between kernel launches; several keep it busy.
#
# Phases, in order of what the results need most (a worker moves on when a phase has nothing
# left to claim):
#   1. every task and method, seed 0 (SST-2: the script's fixed training subset, SST2_SAMPLES);
#   2. seeds 1 and 2 on RTE and MRPC (the noisy ones), 3. on CoLA and STS-B, 4. on SST-2;
#   5. lambda study: diff and structured with 10x the paper's lambda (own work dir and results).
#
#   WORKERS=10 DATA_DIR=../shared/glue WORK=benchmarks/work/glue_accuracy_gpu benchmarks/glue_accuracy_gpu.sh
#
# Then rebuild the tables from the finished runs (on any machine):
#   python benchmarks/glue_accuracy.py --report-only --work-dir $WORK/grid --notes-file benchmarks/glue_accuracy_notes.md
set -u
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-10}
DATA_DIR=${DATA_DIR:-../shared/glue}
WORK=${WORK:-benchmarks/work/glue_accuracy_gpu}
RESULTS=${RESULTS:-$WORK/results}
SST2_SAMPLES=${SST2_SAMPLES:-8000}  # 0 = all 67k
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"

# EXTRA_ARGS: e.g. "--max-train-samples 64" for a smoke test of this script
# shellcheck disable=SC2206
bench=("$PYTHON" benchmarks/glue_accuracy.py --data-dir "$DATA_DIR" --sst2-train-samples "$SST2_SAMPLES" --no-progress ${EXTRA_ARGS:-})
worker() {
    local grid=(--work-dir "$WORK/grid" --results-dir "$RESULTS/grid")
    "${bench[@]}" "${grid[@]}" --seeds 0
    "${bench[@]}" "${grid[@]}" --tasks rte mrpc --seeds 1 2
    "${bench[@]}" "${grid[@]}" --tasks cola stsb --seeds 1 2
    "${bench[@]}" "${grid[@]}" --tasks sst2 --seeds 1 2
    "${bench[@]}" --work-dir "$WORK/lambda" --results-dir "$RESULTS/lambda" --tasks cola stsb mrpc rte \
        --methods diff structured --seeds 0 --set diff.l0_lambda=1.25e-6 structured.l0_lambda=1.25e-6
}

for i in $(seq 1 "$WORKERS"); do
    worker >"$WORK/logs/worker-$i.log" 2>&1 &
    sleep 2  # staggered starts: the lock files already keep two workers off one run
done
wait
