#!/usr/bin/env bash
# Multi-node GPU fine-tuning with the deepspeed launcher and a hostfile (passwordless ssh between
# nodes, the same repo path and venv everywhere). Run on the first node of the hostfile:
#   HOSTFILE=launch/hostfile CONFIG=ds_configs/zero3_bf16_fsam.json MODEL=/models/x DATA=/data/x \
#     bash launch/multinode_deepspeed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE="${HOSTFILE:-launch/hostfile}"
[ -f "$HOSTFILE" ] || { echo "error: hostfile $HOSTFILE not found; copy launch/hostfile.example" >&2; exit 2; }
MASTER_ADDR="${MASTER_ADDR:-$(grep -v '^#' "$HOSTFILE" | awk 'NF{print $1; exit}')}"
CMD=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}"
  launch/train.py --deepspeed_config "${CONFIG:-ds_configs/zero3_bf16_fsam.json}"
  --optimizer "${OPTIMIZER:-fsam}" --model_name_or_path "${MODEL:?set MODEL to a HF model dir}"
  --train_file "${DATA:?set DATA}/train.jsonl" --validation_file "$DATA/validation.jsonl"
  --epochs "${EPOCHS:-3}" --output_dir "${OUT:-outputs/multinode}")
echo "+ ${CMD[*]}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
"${CMD[@]}"
