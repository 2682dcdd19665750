#!/usr/bin/env bash
# Launch bd3-train with DeepSpeed's launcher (ssh to every host of a hostfile).
#
# Single node, 2 processes (no hostfile):
#   launch/deepspeed.sh configs/tiny_cpu.yaml
# Multi-node (passwordless ssh to every host; same path and venv everywhere):
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 launch/deepspeed.sh configs/owt_bd3_b4.yaml
# Environment (all optional):
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" per line); unset = this machine only
#   NUM_GPUS        processes on this machine when there is no hostfile (default: GPUs, or 2)
#   MASTER_ADDR     address of the first host (default 127.0.0.1); MASTER_PORT (default 29500)
#   PYTHON          interpreter (default: .venv/bin/python if present, else python3)
# The training config picks the ZeRO stage (deepspeed.config=configs/deepspeed/zero2.json).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [section.key=value ...] [--resume auto|none|DIR]" >&2
    exit 2
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${repo_root}/.venv/bin/python" ]]; then
        PYTHON="${repo_root}/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

launcher_args=(--master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}")
if [[ -n "${HOSTFILE:-}" ]]; then
    launcher_args+=(--hostfile="${HOSTFILE}")
else
    if [[ -z "${NUM_GPUS:-}" ]]; then
        gpus="$("${PYTHON}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
        if [[ "${gpus}" -gt 0 ]]; then NUM_GPUS="${gpus}"; else NUM_GPUS=2; fi
    fi
    launcher_args+=(--num_gpus="${NUM_GPUS}")
fi

cd "${repo_root}"
# DeepSpeed's launcher forwards --local_rank; tools.train accepts and ignores it (the rank comes
# from the environment it also sets).
exec "${PYTHON}" -m deepspeed.launcher.runner "${launcher_args[@]}" \
    --module tools.train "$@"
