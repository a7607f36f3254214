#!/usr/bin/env bash
# The whole study on the GPU machine, in one command from the repo root:
#
#   bash experiments/run_gpu.sh          # device run: carry ["study_assets", ".whl"], OUT is set there
#
# Before (here, on the CPU machine): python experiments/prepare_assets.py   (-> study_assets/, 49 MiB)
#                                    bash ../shared/device/fetch_wheels.sh  (-> .whl/, DeepSpeed 0.19.8)
# It installs the wheels (DeepSpeed and its pure dependencies; torch 2.11, transformers 5.x, scipy,
# matplotlib are in the image), runs experiments/study.py --phase all (grid, then seeds with the
# settings chosen on validation) with NGPU x PROCS_PER_GPU concurrent world-size-1 runs, then
# experiments/report.py. Files in $OUT (at most 8 come back from the device machine):
#   results.jsonl  RESULTS.md  plots/seed_spread.png  plots/loss_curves.png  study.log
#   study_meta.json  run_logs.tar.gz (every run's log, DeepSpeed JSON, metrics.json; GPU utilisation)
#
# Knobs (environment):
#   TOTAL_BUDGET_S    540  wall seconds from this script's start; runs that would end later than
#                          TOTAL_BUDGET_S - REPORT_RESERVE_S are skipped (recorded "skipped_budget")
#   REPORT_RESERVE_S   45  kept for the report and the archive
#   GRID_BUDGET_S     200  grid runs must end this long after the study starts (then seeds only)
#   PROCS_PER_GPU       4  concurrent runs per GPU (MiniLM needs ~2-3 GB each)
#   NGPU                   default: nvidia-smi -L count
#   MODE           worker  or "process" (one `python launch/train.py` per run; +10-20 s each)
#   PHASE             all  study.py --phase (experiments/run_interval_gpu.sh sets "interval")
#   REPORT_NAME RESULTS.md the report's file name in $OUT
#   REPORT_ARGS            extra report.py arguments, e.g. "--section interval"
#   STUDY_ARGS             extra study.py arguments, e.g. "--sparsities 0.9" (trim the grid) or
#                          "--seeds 0 1 2" or "--precision bf16"
#   ASSETS    study_assets
#   SKIP_WHEELS         1 skips the wheel install. CPU check of this script here:
#     . .venv/bin/activate; SKIP_WHEELS=1 NGPU=0 TOTAL_BUDGET_S=300 STUDY_ARGS="--smoke --cpu_slots 2" \
#       OUT=outputs/run_gpu_cpu_check bash experiments/run_gpu.sh
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/study_gpu}"
WORK="${WORK:-/tmp/fsam_study}"
ASSETS="${ASSETS:-study_assets}"
TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-540}"
REPORT_RESERVE_S="${REPORT_RESERVE_S:-45}"
GRID_BUDGET_S="${GRID_BUDGET_S:-200}"
PROCS_PER_GPU="${PROCS_PER_GPU:-4}"
MODE="${MODE:-worker}"
PHASE="${PHASE:-all}"
REPORT_NAME="${REPORT_NAME:-RESULTS.md}"
REPORT_ARGS="${REPORT_ARGS:-}"
STUDY_ARGS="${STUDY_ARGS:-}"
mkdir -p "$OUT" "$WORK"

if [ "${SKIP_WHEELS:-0}" != 1 ]; then   # SKIP_WHEELS=1: DeepSpeed already importable (CPU test here)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: wheel install failed (carry .whl; make it with ../shared/device/fetch_wheels.sh)"; exit 1; }
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
[ -f "$ASSETS/model/model.safetensors" ] \
  || { echo "error: $ASSETS/model/model.safetensors missing (carry study_assets; make it with experiments/prepare_assets.py)"; exit 1; }
NGPU="${NGPU:-$(nvidia-smi -L | grep -c '^GPU ')}"
python3 -c "import torch, transformers, deepspeed, scipy, matplotlib; print('[run_gpu] torch', torch.__version__, \
'| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, '| cuda', torch.cuda.is_available(), \
torch.cuda.device_count(), 'GPUs', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | grep -v WARNING \
  | tee "$OUT/study.log"
echo "[run_gpu] phase $PHASE, $NGPU GPUs x $PROCS_PER_GPU runs, mode $MODE, setup took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/study.log"

nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -l 5 > "$WORK/gpu_util.csv" 2>/dev/null &
SMI_PID=$!
DEADLINE=$(( T0 + TOTAL_BUDGET_S - REPORT_RESERVE_S ))
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=20 $(( DEADLINE - $(date +%s) + 30 )) \
  python3 experiments/study.py --phase "$PHASE" --gpus "$NGPU" --procs_per_gpu "$PROCS_PER_GPU" --mode "$MODE" \
    --assets "$ASSETS" --out_dir "$WORK" --results "$OUT/results.jsonl" \
    --grid_budget_s "$GRID_BUDGET_S" --deadline "$DEADLINE" $STUDY_ARGS 2>&1 | tee -a "$OUT/study.log"
kill "$SMI_PID" 2>/dev/null

cp "$WORK/study_meta.json" "$OUT/" 2>/dev/null
# shellcheck disable=SC2086
python3 experiments/report.py --results "$OUT/results.jsonl" --meta "$OUT/study_meta.json" \
  --out "$OUT/$REPORT_NAME" --plots_dir "$OUT/plots" $REPORT_ARGS 2>&1 | tee -a "$OUT/study.log"
tar czf "$OUT/run_logs.tar.gz" -C "$WORK" --exclude='*/model' --exclude='*.safetensors' . 2>/dev/null
echo "[run_gpu] done in $(( $(date +%s) - T0 )) s" | tee -a "$OUT/study.log"
