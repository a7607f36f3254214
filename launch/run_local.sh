#!/usr/bin/env bash
# Fine-tune on one machine with any launcher; every setting is an environment variable.
#   LAUNCHER=deepspeed|torchrun|mpirun  NUM_RANKS=2  CONFIG=ds_configs/zero2_fsam.json
#   OPTIMIZER=fsam|sam|adamw  MODEL=<HF dir>  DATA=<dir with train/validation/test.jsonl>
#   OUT=outputs/run  STEPS=0 (0: EPOCHS)  EPOCHS=1  TASK=classification  DRY_RUN=1 (print only)
#   EXTRA_ARGS="--max_seq_length 64 ..." is appended to train.py's arguments.
# CPU: DS_ACCELERATOR=cpu (set by launch/setup_env.sh); GPU: one rank per GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
LAUNCHER="${LAUNCHER:-deepspeed}"
NUM_RANKS="${NUM_RANKS:-2}"
CONFIG="${CONFIG:-ds_configs/zero2_fsam.json}"
OPTIMIZER="${OPTIMIZER:-fsam}"
DATA="${DATA:-data/movie_reviews}"
OUT="${OUT:-outputs/${LAUNCHER}_${OPTIMIZER}}"
MASTER_PORT="${MASTER_PORT:-29512}"
MODEL="${MODEL:-$(python launch/prepare_data.py --model_dir)}"
TRAIN_ARGS=(launch/train.py --deepspeed_config "$CONFIG" --optimizer "$OPTIMIZER"
  --model_name_or_path "$MODEL" --task "${TASK:-classification}"
  --train_file "$DATA/train.jsonl" --validation_file "$DATA/validation.jsonl"
  --epochs "${EPOCHS:-1}" --max_steps "${STEPS:-0}" --seed "${SEED:-42}" --output_dir "$OUT")
# shellcheck disable=SC2206
TRAIN_ARGS+=(${EXTRA_ARGS:-})
case "$LAUNCHER" in
  deepspeed) CMD=(deepspeed --num_gpus "$NUM_RANKS" --master_port "$MASTER_PORT" "${TRAIN_ARGS[@]}") ;;
  torchrun)  CMD=(torchrun --nproc_per_node "$NUM_RANKS" --master_port "$MASTER_PORT" "${TRAIN_ARGS[@]}") ;;
  mpirun)    # DeepSpeed discovers rank/world through mpi4py; loopback-only transport for one host
             CMD=(mpirun --allow-run-as-root --oversubscribe -np "$NUM_RANKS" --mca btl self,vader
                  --mca oob_tcp_if_include lo -x DS_ACCELERATOR -x HF_HUB_OFFLINE -x PATH
                  -x MASTER_PORT="$MASTER_PORT"
                  python "${TRAIN_ARGS[@]}") ;;
  *) echo "error: LAUNCHER=$LAUNCHER; use deepspeed, torchrun or mpirun" >&2; exit 2 ;;
esac
echo "+ ${CMD[*]}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true' EXIT
"${CMD[@]}"
