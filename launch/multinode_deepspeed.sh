#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (see launch/hostfile.example).
# Two ways for it to reach the nodes:
#   LAUNCHER=pdsh (default): passwordless ssh between nodes, the same repo path and venv on every
#     node; run it on the first node of the hostfile.
#   LAUNCHER=slurm: inside a Slurm allocation (sbatch/salloc); deepspeed runs `srun --mpi=pmix`, and
#     each rank learns its rank, world size and the head node from DeepSpeed's MPI discovery
#     (mpi4py over Slurm's PMIx). HOSTFILE defaults to the allocation's nodes, tasks per node slots.
#   HOSTFILE=launch/hostfile CONFIG=ds_configs/zero3_bf16_fsam.json MODEL=/models/x DATA=/data/x \
#     bash launch/multinode_deepspeed.sh
#   LAUNCHER=slurm sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 \
#     --wrap "bash launch/multinode_deepspeed.sh"           (MODEL, DATA, CONFIG as above)
# With arguments, runs that Python program instead of launch/train.py. DRY_RUN=1 prints the command.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
LAUNCHER="${LAUNCHER:-pdsh}"
if [ -z "${HOSTFILE:-}" ] && [ "$LAUNCHER" = slurm ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  HOSTFILE="${TMPDIR:-/tmp}/fsam_ds_hostfile_${SLURM_JOB_ID}"
  SLOTS="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}"   # "2(x2)" -> 2
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=${SLOTS%%,*}/" > "$HOSTFILE"
fi
HOSTFILE="${HOSTFILE:-launch/hostfile}"
[ -f "$HOSTFILE" ] || { echo "error: hostfile $HOSTFILE not found; copy launch/hostfile.example" >&2; exit 2; }
MASTER_ADDR="${MASTER_ADDR:-$(grep -v '^#' "$HOSTFILE" | awk 'NF{print $1; exit}')}"
export MASTER_PORT="${MASTER_PORT:-29500}"
case "$LAUNCHER" in
  pdsh)  LAUNCH=(--launcher pdsh) ;;
  # srun, not ssh, reaches the nodes: no ssh check; the rank discovery needs MPI in every task
  slurm) LAUNCH=(--launcher slurm "--launcher_args=${SRUN_ARGS:---mpi=pmix}" --no_ssh_check) ;;
  *) echo "error: LAUNCHER=$LAUNCHER; use pdsh or slurm" >&2; exit 2 ;;
esac
if [ $# -gt 0 ]; then
  PROGRAM=("$@")
else
  PROGRAM=(launch/train.py --deepspeed_config "${CONFIG:-ds_configs/zero3_bf16_fsam.json}"
    --optimizer "${OPTIMIZER:-fsam}" --model_name_or_path "${MODEL:?set MODEL to a HF model dir}"
    --train_file "${DATA:?set DATA}/train.jsonl" --validation_file "$DATA/validation.jsonl"
    --epochs "${EPOCHS:-3}" --output_dir "${OUT:-outputs/multinode}")
fi
CMD=(deepspeed --hostfile "$HOSTFILE" "${LAUNCH[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  "${PROGRAM[@]}")
echo "+ ${CMD[*]}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
"${CMD[@]}"
