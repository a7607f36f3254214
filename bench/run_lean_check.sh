#!/usr/bin/env bash
# The 2026-12-01 lean-first-pass measurements on one GPU, in one call (see BENCHMARKS.md):
# interleaved step times at 355M ZeRO-2/3, FSAM's memory at 355M ZeRO-3, the step anatomy.
#   bash bench/run_lean_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/run_lean_check.sh OUT_DIR}
mkdir -p "$OUT/json"
INTERLEAVE=1 BENCH=step_time GPU_COUNTS=1 STEP_CASES="350m:2:8 350m:3:8" \
  STEP_VARIANTS=adamw,sam,fsam_every_step,fsam_every_100,fsam_interval_2,fsam_interval_4 \
  RESULTS_DIR=$OUT/json bash bench/run_gpu.sh "$OUT/step_time"
BENCH=memory GPU_COUNTS=1 MEMORY_CASES="350m:3" RESULTS_DIR=$OUT/json bash bench/run_gpu.sh "$OUT/memory"
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
for z in 2 3; do
  torchrun --nproc_per_node 1 bench/step_anatomy.py --model 350m --seq_len 1024 --micro_batch 8 \
    --zero_stage $z --warmup 3 --steps 5 --variants adamw,sam,fsam_every_100 \
    --out "$OUT/json/step_anatomy_350m_z${z}.json" 2>&1 | grep -v "WARN\|Warning\|warn\|return func"
done
