#!/usr/bin/env bash
# The 2026-12-02 measurements on one GPU after the small-model work, in one call (BENCHMARKS.md):
# MiniLM-shaped FSAM/SAM/AdamW step times and op/sync counts at ZeRO 0 and 2 (twice, to show the
# run-to-run spread), then the interleaved 355M ZeRO-2/3 step times of every variant.
#   bash bench/run_small_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/run_small_check.sh OUT_DIR}
mkdir -p "$OUT/json"
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# interleaved (one step of each variant in turn): the ratios; seq 128 x 32 as the study's runs
for shape in "128 32" "64 8"; do
  set -- $shape
  torchrun --standalone --nproc_per_node 1 bench/small_overhead.py --seq_len $1 --micro_batch $2 \
    --warmup 5 --steps 60 --interleave --out "$OUT/json/small_overhead_minilm_s$1_mb$2_interleaved.json" 2>&1 \
    | grep -v "WARN\|Warning\|warn\|return func"
done
[ "${SMALL_ONLY:-0}" = 1 ] && exit 0
INTERLEAVE=1 BENCH=step_time GPU_COUNTS=1 STEP_CASES="350m:2:8 350m:3:8" \
  STEP_VARIANTS=adamw,sam,fsam_every_step,fsam_every_100,fsam_interval_2,fsam_interval_4 \
  RESULTS_DIR=$OUT/json bash bench/run_gpu.sh "$OUT/step_time"
