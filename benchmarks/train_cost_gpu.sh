#!/usr/bin/env bash
# Issue 16's GPU rows of benchmarks/train_cost.py: Llama-3.2-1B and -3B shapes (random weights) in bf16
# at batch 4, the shape of PEFT's method comparison, every configuration against full finetuning in
# interleaved rounds; absolute peak memory (torch.cuda.max_memory_allocated) and step time. Writes
# benchmarks/results/train_cost.{md,json} (label "gpu bf16"). Not yet run on a GPU.
#
#   benchmarks/train_cost_gpu.sh                       # SEQ=512 ROUNDS=3 MODELS="llama-1b llama-3b"
#   DEVICE=cpu MODELS=llama-tiny SEQ=32 ROUNDS=1 WRITE= benchmarks/train_cost_gpu.sh   # a dry run here
#
# The dense L0 stage (36 bytes per diffed parameter) is left out at 3B: ~100 GB of state.
set -u
cd "$(dirname "$0")/.."
SEQ=${SEQ:-512}
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-"llama-1b llama-3b"}
DEVICE=${DEVICE:-cuda}
WRITE=${WRITE---write}
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
status=0
for m in $MODELS; do
    configs="full lora_all32 lora_qv8 fixed candidates l0_lean l0_lean_m16 l0_lean_w16 l0_lean_factored"
    [ "$m" != llama-3b ] && configs="$configs l0"
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/train_cost.py --model "$m" --device "$DEVICE" --dtype bf16 --batch 4 --seq-len "$SEQ" \
        --warmup 2 --steps 2 --rounds "$ROUNDS" --threads 4 --configs $configs --label "gpu bf16" $WRITE \
        --note "one GPU, bf16 weights for every method (diff state as each configuration keeps it), batch 4 x $SEQ, the shape of PEFT's method comparison" \
        ${EXTRA_ARGS:-} || { echo "train_cost on $m failed"; status=1; }
done
exit $status
