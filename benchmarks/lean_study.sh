#!/bin/bash
# issue 16: accuracy effect of the lean options and of candidate L0 (small CPU protocol)
cd "$(dirname "$0")/.."
COMMON="--tasks sst2 stsb mrpc --methods structured --max-train-samples 500 --no-progress"
SET="common.epochs=1 structured.fixmask_epochs=1 common.max_eval_samples=400"
mkdir -p benchmarks/work
for cfg in standard lean candidates; do
  extra=""
  [ $cfg = lean ] && extra="structured.memory=\"lean\""
  [ $cfg = candidates ] && extra="structured.memory=\"lean\" structured.candidates=0.05 structured.candidate_warmup_steps=32"
  OMP_NUM_THREADS=1 python benchmarks/glue_accuracy.py $COMMON --set $SET $extra \
    --work-dir benchmarks/work/lean_study/$cfg --results-dir benchmarks/results/lean_study/$cfg > "benchmarks/work/lean_study_$cfg.log" 2>&1
done
