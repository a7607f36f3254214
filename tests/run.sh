#!/usr/bin/env bash
# The test command (README, CI): installs what it needs, then runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
FSAM_SLURM="${FSAM_SLURM:-1}" source launch/setup_env.sh
# DeepSpeed's CLI sets LOCAL_SIZE, which makes it use a /dev/shm all-reduce buffer it never frees.
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true' EXIT
python -m pytest -q tests "$@"
