# Shared by launch/torchrun.sh and launch/deepspeed.sh (sourced, not run): argument check,
# interpreter, GPU count and the environment defaults of every launcher. Nothing here changes
# directory: the config path and every relative path in it (data, outputs) are taken from the
# directory the launcher is run in.
# The command launched on every process: bd3-train (default), or bd3-eval with BD3_COMMAND=eval.
BD3_COMMAND="${BD3_COMMAND:-train}"
case "${BD3_COMMAND}" in
    train) usage="$0 CONFIG.yaml [section.key=value ...] [--resume auto|none|DIR]" ;;
    eval) usage="BD3_COMMAND=eval $0 MODEL --data ... [bd3-eval options]" ;;
    *) echo "$0: BD3_COMMAND must be train or eval, got '${BD3_COMMAND}'" >&2; exit 2 ;;
esac
BD3_MODULE="megatron_bd3.cli.${BD3_COMMAND}"
if [[ $# -lt 1 ]]; then
    echo "usage: ${usage}" >&2
    exit 2
fi

# The interpreter with megatron_bd3 installed: $PYTHON, else the active virtualenv's, else the
# checkout's .venv (make install), else python3.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
        PYTHON="${VIRTUAL_ENV}/bin/python"
    elif [[ -x "${repo_root}/.venv/bin/python" ]]; then
        PYTHON="${repo_root}/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

# processes per machine by default: one per GPU, or 2 without GPUs
local_gpu_count() {
    "${PYTHON}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}
default_local_procs() {
    local gpus
    gpus="$(local_gpu_count)"
    if [[ "${gpus}" -gt 0 ]]; then echo "${gpus}"; else echo 2; fi
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
