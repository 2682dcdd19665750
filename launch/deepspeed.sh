#!/usr/bin/env bash
# Launch bd3-train with DeepSpeed's launcher (ssh to every host of a hostfile).
# Without ssh (each host started on its own, e.g. a hostfile naming only this machine):
#   NO_SSH=1 HOSTFILE=hostfile launch/deepspeed.sh tiny_cpu
#
# Single node, 2 processes (no hostfile):
#   launch/deepspeed.sh tiny_cpu
# Multi-node (passwordless ssh to every host; same path and venv everywhere):
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node0 launch/deepspeed.sh owt_bd3_b4.yaml
# Environment (all optional):
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" per line); unset = this machine only
#   NUM_GPUS        processes on this machine when there is no hostfile (default: GPUs, or 2)
#   MASTER_ADDR     address of the first host (default 127.0.0.1); MASTER_PORT (default 29500)
#   NO_SSH=1        start only this machine's processes, without ssh (DeepSpeed's --no_ssh):
#                   run the same command on every host of the hostfile, each with its NODE_RANK
#                   (index of the host in the hostfile, default 0); a localhost hostfile then
#                   needs no ssh server
#   NO_SSH_CHECK=1  skip DeepSpeed's passwordless-ssh check of the first host (--no_ssh_check)
#   DEEPSPEED_LAUNCHER_ARGS  more options for DeepSpeed's launcher (split on spaces), e.g.
#                   "--ssh_port 2222" or "--launcher openmpi"
#   PYTHON          interpreter (default: the active virtualenv's, else the checkout's .venv,
#                   else python3)
# The training config picks the ZeRO stage (deepspeed.config=deepspeed/zero2.json). Relative paths
# (the config, data.*, outputs) are taken from the directory this is run in.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launcher_args=(--master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}")
if [[ -n "${HOSTFILE:-}" ]]; then
    launcher_args+=(--hostfile="${HOSTFILE}")
else
    launcher_args+=(--num_gpus="${NUM_GPUS:-$(default_local_procs)}")
fi
if [[ "${NO_SSH:-0}" == 1 ]]; then
    launcher_args+=(--no_ssh --node_rank="${NODE_RANK:-0}")
fi
if [[ "${NO_SSH_CHECK:-0}" == 1 ]]; then
    launcher_args+=(--no_ssh_check)
fi
read -r -a extra_launcher_args <<< "${DEEPSPEED_LAUNCHER_ARGS:-}"
launcher_args+=("${extra_launcher_args[@]}")

# DeepSpeed's launcher forwards --local_rank; bd3-train and bd3-eval accept and ignore it (the
# rank comes from the environment it also sets).
exec "${PYTHON}" -m deepspeed.launcher.runner "${launcher_args[@]}" \
    --module "${BD3_MODULE}" "$@"
