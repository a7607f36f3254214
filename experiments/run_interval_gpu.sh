#!/usr/bin/env bash
# Interval mode, cost and accuracy, on the GPU machine in one command from the repo root:
#
#   bash experiments/run_interval_gpu.sh   # device run: kind nvidia-h200, carry ["study_assets", ".whl"], timeout 600
#
# study.py --phase interval: movie_reviews (full and 500 examples) x {AdamW, SAM, FSAM with
# "sam_interval" 1, 2, 4} x seeds 0 1 2 = 30 runs on one H200, PROCS_PER_GPU (4) at a time, as the
# 2026-11-28 study shared each GPU (4 runs per GPU, 4 CPU threads each: the H200 kind has 16 cores).
# Then report.py --section interval. Files in $OUT:
#   results.jsonl  INTERVAL.md (the "Interval mode" section, with the repeat check against the
#   2026-11-28 records)  plots/interval_tradeoff.png  study.log  study_meta.json  run_logs.tar.gz
# Time: that study's seed runs of these cells took 585 run-seconds at 4 runs per GPU, so ~150 s of
# runs on 4 slots, plus ~30-40 s wheel install and worker start and ~10 s report: ~3.5-4 min. Runs
# that would end after TOTAL_BUDGET_S - REPORT_RESERVE_S (390 - 30 s) are skipped, last seeds first.
# Same knobs as run_gpu.sh. CPU check here (the smoke plan: 10 runs of 4 steps, ~3-5 min on 2 cores):
#   . .venv/bin/activate; SKIP_WHEELS=1 NGPU=0 TOTAL_BUDGET_S=900 STUDY_ARGS="--smoke --cpu_slots 1" \
#     OUT=outputs/interval_cpu_check bash experiments/run_interval_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PHASE=interval REPORT_NAME="${REPORT_NAME:-INTERVAL.md}"
export TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-390}" REPORT_RESERVE_S="${REPORT_RESERVE_S:-30}"
export PROCS_PER_GPU="${PROCS_PER_GPU:-4}"
export STUDY_ARGS="--fill_tail ${STUDY_ARGS:-}"   # the last runs share the GPU as the others did
export REPORT_ARGS="${REPORT_ARGS:---section interval --reference experiments/study_2026-11-28/results.jsonl}"
exec bash experiments/run_gpu.sh
