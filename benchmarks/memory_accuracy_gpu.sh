#!/usr/bin/env bash
# Issue 16's GLUE cells the 2-core CPU has not run, on one lent GPU: WORKERS instances of
# memory_accuracy.py share one work dir (glue_accuracy's lock file per cell: a worker skips a cell
# another holds). The model is small, so several processes keep the GPU busy.
#
#   WORKERS=8 DATA_DIR=../shared/glue benchmarks/memory_accuracy_gpu.sh
#
# Phases, in the order the issue needs them (a worker moves on when a phase has nothing left):
#   0. --memory lean with bf16 frozen weights (--theta-dtype bf16, GPUs only), five tasks: the one lean
#      option no CPU can measure, left out of --memory lean until it is
#   1. candidate L0 at its default w lr (5e-4) at c = 2%, 5% and 10% on the five tasks (the issue's c
#      grid; cells the CPU finished are skipped)
#   2. candidate L0 5% with --memory lean (the configuration train_cost.py measures), five tasks
#   3. candidate L0 5% seeds 1-2 on RTE and MRPC (the dense grid has them)
#   4. each lean option alone: --optimizer-in-backward, --alpha-dtype bf16 (five tasks)
#   5. --w-dtype bf16 on the two tasks the CPU did not run (CoLA, SST-2)
# The work dir starts from the published records (memory_accuracy.py restores them), so cells the CPU
# finished are not trained again; copy a CPU work dir into WORK first to resume its half-trained cells.
# Every finished cell rewrites $RESULTS/memory_accuracy.{md,json} (published and new records together;
# cells trained on a GPU are marked in the table and their machine is listed): on a lent device machine
# copy those two files to $OUT at the end. A smoke test of this script on the CPU (phase 0 is refused
# there with one line, and the workers go on):
#   WORKERS=2 WORK=/tmp/ma_smoke RESULTS=/tmp/ma_smoke/results EXTRA_ARGS="--model TINY_BERT_DIR --max-train-samples 16" \
#       benchmarks/memory_accuracy_gpu.sh
set -u
cd "$(dirname "$0")/.."
WORKERS=${WORKERS:-8}
DATA_DIR=${DATA_DIR:-../shared/glue}
WORK=${WORK:-benchmarks/work/memory_accuracy}
RESULTS=${RESULTS:-benchmarks/results}  # the published records are read from here first, and the report written
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"
# EXTRA_ARGS: e.g. "--max-train-samples 64" for a smoke test of this script
# shellcheck disable=SC2206
bench=("$PYTHON" benchmarks/memory_accuracy.py run --data-dir "$DATA_DIR" --work-dir "$WORK" --results-dir "$RESULTS"
       ${EXTRA_ARGS:-})
worker() {
    "${bench[@]}" --configs lean_theta16
    "${bench[@]}" --configs c0.05_lr5e-4 c0.02_lr5e-4 c0.10_lr5e-4
    "${bench[@]}" --configs c0.05_lean
    "${bench[@]}" --configs c0.05_lr5e-4 --tasks rte mrpc --seeds 1 2
    "${bench[@]}" --configs in_backward alpha_bf16
    "${bench[@]}" --configs lean_w16 --tasks cola sst2
}
for i in $(seq 1 "$WORKERS"); do
    worker >"$WORK/logs/worker-$i.log" 2>&1 &
    sleep 2  # staggered starts
done
wait
