#!/usr/bin/env bash
# Launch bd3-train (or bd3-eval: BD3_COMMAND=eval) with torchrun, on one node or many.
#
# Single node, 2 processes (a shipped config by name, or a path to your YAML):
#   launch/torchrun.sh tiny_cpu training.train_iters=200
# Multi-node (run the same command on every node; NODE_RANK differs):
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=node0.example MASTER_PORT=29500 \
#       launch/torchrun.sh owt_bd3_b4.yaml
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 2 without GPUs)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0)
#   MASTER_ADDR     rendezvous host (default 127.0.0.1); MASTER_PORT (default 29500)
#   RDZV_ENDPOINT   overrides MASTER_ADDR:MASTER_PORT (host:port, c10d rendezvous)
#   RDZV_ID         rendezvous job id for multi-node (default bd3)
#   BD3_COMMAND     train (default) or eval: e.g. BD3_COMMAND=eval launch/torchrun.sh RUN_DIR
#                   --data runs/data --tensor-model-parallel-size 2
#   PYTHON          interpreter (default: the active virtualenv's, else the checkout's .venv,
#                   else python3)
# Relative paths (the config, data.*, outputs) are taken from the directory this is run in.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(default_local_procs)}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-${MASTER_ADDR}:${MASTER_PORT}}"

if [[ "${NNODES}" -eq 1 ]]; then
    rdzv_args=(--standalone)
else
    rdzv_args=(--rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT}" --rdzv-id="${RDZV_ID:-bd3}"
               --node-rank="${NODE_RANK}")
fi

exec "${PYTHON}" -m torch.distributed.run \
    --nnodes="${NNODES}" \
    --nproc-per-node="${NPROC_PER_NODE}" \
    "${rdzv_args[@]}" \
    -m "${BD3_MODULE}" "$@"
