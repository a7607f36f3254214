#!/usr/bin/env bash
# Run the fsam_ds benchmarks on one GPU machine (1, 2 or 4 GPUs; torch + CUDA + transformers
# installed, DeepSpeed installed or carried as wheels in .whl/). From the repo root:
#
#   bash bench/run_gpu.sh OUT_DIR                       # everything, on all GPUs of the machine
#   BENCH=step_time STEP_CASES="350m:2:8" bash bench/run_gpu.sh OUT_DIR
#   BENCH="threshold memory" GPU_COUNTS="1 2 4" bash bench/run_gpu.sh OUT_DIR
#   DRY_RUN=1 bash bench/run_gpu.sh /tmp/x              # print the commands only
#
# DeepSpeed: the GPU image lacks it. Here (a machine with pip access), from the repo root, run
# `bash ../shared/device/fetch_wheels.sh` (or build the same wheels: deepspeed==0.19.8 with
# DS_BUILD_OPS=0, pydantic, pydantic-core, annotated-types, typing-inspection, hjson for
# Python 3.12) into .whl/ and carry .whl to the GPU machine; this script installs them into
# /tmp/site when `import deepspeed` fails.
#
# Environment (defaults in brackets):
#   BENCH         which benchmarks, any of: step_time threshold memory cpu_ratio profile
#                 [all but profile]; profile = bench/profile_step.py on each STEP_CASES case
#   GPU_COUNTS    torchrun --nproc_per_node values to run                  [all GPUs present]
#   STEP_CASES    step_time cases, model:zero_stage:micro_batch[:ckpt]
#                 [350m:2:8 350m:3:8 1.3b:2:8 1.3b:3:8]; e.g. 7b:3:2:ckpt on 2-4 GPUs (7B's
#                 fp32 masters, AdamW state and FSAM's buffers do not fit one 141 GB GPU)
#   STEP_VARIANTS step_time variants, comma-separated, in run order  [adamw,sam,fsam_every_step,
#                 fsam_every_100]; put a variant that may not fit last (each is saved as it ends)
#   INTERLEAVE=1  step_time builds all variants' engines and runs their steps round-robin
#                 (fairer ratios on a machine whose speed drifts; needs memory for all)
#   SEQ_LEN       sequence length for step_time and memory                 [1024]
#   WARMUP STEPS  step_time warm-up and timed steps                         [3 8]
#   MEMORY_CASES  fsam_memory cases, model:zero_stage[:micro_batch]  [350m:2 350m:3 1.3b:2 1.3b:3]
#   THRESHOLD_NUMELS  scores per rank for threshold.py                      [1e8 1e9]
#   RESULTS_DIR   where the per-run JSON files go                           [OUT_DIR/json]
#                 (point it outside OUT_DIR when only a few files may come back: OUT_DIR then
#                 holds just summary.md, all_results.json and run.log)
#   RUN_TIMEOUT   seconds one torchrun may take before it is stopped        [900]
#   WHEEL_DIR     where the DeepSpeed wheels are                            [.whl]
#   BENCH_DIST_BACKEND  process-group backend string, e.g. "cpu:gloo,cuda:nccl"   [unset:
#                 DeepSpeed's NCCL-only group]. fsam_ds as of commit 079b25f all-reduces a CPU
#                 tensor at its first mask refresh, which fails on an NCCL-only group with
#                 "No backend type associated with device type cpu" on 2+ GPUs; this setting
#                 works around that until fsam_ds is fixed (the JSON records it)
#   DRY_RUN=1     print the commands, run nothing
# Each invocation's wall time is logged ("[run_gpu] ... took N s") so the next plan can use it.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:?usage: bash bench/run_gpu.sh OUT_DIR}
RESULTS_DIR=${RESULTS_DIR:-$OUT_DIR/json}
BENCH=${BENCH:-step_time threshold memory cpu_ratio}
BENCH=${BENCH//,/ }
STEP_CASES=${STEP_CASES:-350m:2:8 350m:3:8 1.3b:2:8 1.3b:3:8}
MEMORY_CASES=${MEMORY_CASES:-350m:2 350m:3 1.3b:2 1.3b:3}
THRESHOLD_NUMELS=${THRESHOLD_NUMELS:-1e8 1e9}
SEQ_LEN=${SEQ_LEN:-1024}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-8}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
WHEEL_DIR=${WHEEL_DIR:-.whl}
DRY_RUN=${DRY_RUN:-0}
LOG=$OUT_DIR/run.log
mkdir -p "$OUT_DIR" "$RESULTS_DIR"

# NVLink multicast off: on shared hosts a program using it can take the GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "$DRY_RUN" != 1 ] && ! python3 -c "import deepspeed" >/dev/null 2>&1; then
  if ! ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    echo "DeepSpeed is not installed and $WHEEL_DIR/ holds no wheels: see this script's header" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEEL_DIR"/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

if [ -z "${GPU_COUNTS:-}" ]; then
  GPU_COUNTS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$DRY_RUN" = 1 ] && [ "$GPU_COUNTS" = 0 ]; then GPU_COUNTS=1; fi
  if [ "$GPU_COUNTS" = 0 ]; then echo "no GPU visible to torch" >&2; exit 2; fi
fi

failures=()
run() {   # run NAME CMD...: log, time, and keep going after a failure (an OOM in one case)
  local name=$1; shift
  echo "[run_gpu] $name: $*" | tee -a "$LOG"
  [ "$DRY_RUN" = 1 ] && return 0
  local start=$SECONDS
  timeout --signal=TERM --kill-after=30 "$RUN_TIMEOUT" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "[run_gpu] $name: exit $rc, took $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || failures+=("$name (exit $rc)")
}

wants() { [[ " $BENCH " == *" $1 "* ]]; }

for n in $GPU_COUNTS; do
  launch=(torchrun --standalone --nproc_per_node "$n")
  if wants step_time; then
    for case in $STEP_CASES; do
      IFS=: read -r model zero mb ckpt <<<"$case"
      extra=(); tag=""
      if [ "${ckpt:-}" = ckpt ]; then extra=(--activation_checkpointing); tag=_ckpt; fi
      run "step_time $model zero$zero n$n" "${launch[@]}" bench/step_time.py --model "$model" \
        --zero_stage "$zero" --micro_batch "${mb:-8}" --seq_len "$SEQ_LEN" --warmup "$WARMUP" \
        --steps "$STEPS" "${extra[@]}" ${STEP_VARIANTS:+--variants "$STEP_VARIANTS"} \
        $([ "${INTERLEAVE:-0}" = 1 ] && echo --interleave) \
        --out "$RESULTS_DIR/step_time_${model}_z${zero}_mb${mb:-8}${tag}$([ "${INTERLEAVE:-0}" = 1 ] && echo _interleaved)_n$n.json"
    done
  fi
  if wants profile; then
    for case in $STEP_CASES; do
      IFS=: read -r model zero mb ckpt <<<"$case"
      run "profile_step $model zero$zero n$n" "${launch[@]}" bench/profile_step.py --model "$model" \
        --zero_stage "$zero" --micro_batch "${mb:-8}" --seq_len "$SEQ_LEN" \
        --out "$RESULTS_DIR/profile_step_${model}_z${zero}_mb${mb:-8}_n$n.json"
    done
  fi
  if wants threshold; then
    for numel in $THRESHOLD_NUMELS; do
      run "threshold $numel n$n" "${launch[@]}" bench/threshold.py --numel "$numel" \
        --out "$RESULTS_DIR/threshold_${numel}_n$n.json"
    done
  fi
  if wants memory; then
    for case in $MEMORY_CASES; do
      IFS=: read -r model zero mb <<<"$case"
      run "fsam_memory $model zero$zero n$n" "${launch[@]}" bench/fsam_memory.py --model "$model" \
        --zero_stage "$zero" --micro_batch "${mb:-1}" --seq_len "$SEQ_LEN" \
        --out "$RESULTS_DIR/fsam_memory_${model}_z${zero}_n$n.json"
    done
  fi
done

if wants cpu_ratio; then   # the CPU check, here too: the same ratios without a GPU
  run "cpu_ratio" env CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu python3 bench/cpu_ratio.py \
    --ranks 2 --out "$RESULTS_DIR/cpu_ratio.json"
fi

if [ "$DRY_RUN" != 1 ]; then
  python3 bench/summarize.py "$RESULTS_DIR" --markdown "$OUT_DIR/summary.md" \
    --combined "$OUT_DIR/all_results.json" | tee -a "$LOG"
fi
if [ ${#failures[@]} -gt 0 ]; then
  printf '[run_gpu] failed: %s\n' "${failures[@]}" | tee -a "$LOG"
  exit 1
fi
