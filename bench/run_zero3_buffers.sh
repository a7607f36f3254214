#!/usr/bin/env bash
# ZeRO-3 step time and peak memory with Hugging Face's "auto" buffer sizes (from
# the hidden size, DeepSpeed's 1e9 sub-groups), the CPU configs' (host-memory sizes 5e6/1e7) and
# DeepSpeed's defaults, on one GPU (BENCHMARKS.md, 2026-12-02 evening).
#   bash bench/run_zero3_buffers.sh OUT_DIR      (CASES="1.3b:8 350m:8", SOURCES=..., ROUNDS=2)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/run_zero3_buffers.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# round 1 runs the variants one after another (per-variant peak memory), round 2 interleaved
# (ratios that share the card's drift; no per-variant peak)
for round in $(seq 1 "${ROUNDS:-2}"); do
  mode=$([ "$round" = 1 ] && echo "" || echo "--interleave")
  for case in ${CASES:-1.3b:8 350m:8}; do
    model=${case%%:*} mb=${case##*:}
    # the sources alternate within a round so that drift in the card's speed hits all alike
    for source in ${SOURCES:-hf_auto cpu_configs deepspeed}; do
      torchrun --standalone --nproc_per_node 1 bench/step_time.py --model "$model" --seq_len 1024 \
        --micro_batch "$mb" --zero_stage 3 --zero3_buffers "$source" --warmup 3 --steps 8 $mode \
        --variants "${VARIANTS:-adamw,sam,fsam_every_100}" \
        --out "$OUT/z3buf_${model}_${source}_r${round}.json" 2>&1 | grep "^| $model\|Error\|error" | head -5
      echo "[$model $source round $round] $(date +%T)"
    done
  done
done
