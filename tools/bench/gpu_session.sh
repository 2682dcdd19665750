#!/usr/bin/env bash
# One lent-GPU session in one command: offline install, then the GPU checks, each under its own
# time limit, logs and JSON under $OUT (what the device tool brings back).
#
#   python -m tools.bench.gpu_wheelhouse                     # here first: runs/wheelhouse
#   device run: bash tools/bench/gpu_session.sh [PART ...]   with carry ["runs/wheelhouse"]
#
# Parts (default: env install diffusion bench):
#   env        nvidia-smi, Python / torch / CUDA versions
#   install    pip install --no-index from $WHEELS (the machine reaches no package index)
#   diffusion  the diffusion tests with CUDA visible (FlexAttention BlockMask, masks, loss)
#   bench      tools/bench/gpu_bench.py: ceilings, flex vs sdpa attention, 125M step MFU
#   profile    the top kernels of one BD3 step (gpu_bench --profile bd3-B16-flex)
#   trainer    the real trainer on runs/synth (prepared here, see docs/bench/gpu.md; carry it)
# SMOKE=1 runs the same parts on CPU with tiny shapes (checks this script without a GPU).
# Every part runs even if an earlier one failed; $OUT/summary.txt has one line per part
# (name, exit status, seconds) and the exit status is the number of parts that failed.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/gpu_session}
WHEELS=${WHEELS:-runs/wheelhouse}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline
failed=0

run_part() {  # name, limit in seconds, command...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

part_env() {
    if [ "$SMOKE" = 1 ]; then echo "SMOKE=1: no GPU expected"; else nvidia-smi; fi
    "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'
}

part_install() {
    if [ ! -f "$WHEELS/requirements.txt" ]; then
        echo "$WHEELS/requirements.txt not found: build it with python -m tools.bench.gpu_wheelhouse and carry it"
        return 2
    fi
    "$PY" -m pip install --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" &&
        "$PY" -c 'import megatron.core, deepspeed, webdataset, sentencepiece; print("imports ok")'
}

part_trainer() {
    local data=runs/synth
    if [ ! -f "$data/data/manifest.json" ]; then
        echo "$data/data/manifest.json not found: prepare it here (docs/bench/gpu.md) and carry $data"
        return 2
    fi
    launch/torchrun.sh owt_bd3_b16.yaml data.manifest="$data/data/manifest.json" \
        data.tokenizer="$data/tok" training.micro_batch_size=16 training.global_batch_size=16 \
        schedule.warmup_steps=10 training.train_iters=60 logging.output_dir="$OUT" \
        'logging.profile_steps=[50, 53]'
}

# the parts that are shell functions run under `timeout` through a child bash
export -f part_env part_install part_trainer
export PY WHEELS SMOKE OUT

BENCH=("$PY" -m tools.bench.gpu_bench)
[ "$SMOKE" = 1 ] && BENCH+=(--device cpu --quick)

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(env install diffusion bench)
for part in "${parts[@]}"; do
    case "$part" in
        env) run_part env 60 bash -c part_env ;;
        install) run_part install 300 bash -c part_install ;;
        diffusion) run_part diffusion 180 "$PY" -m pytest -q -x -p no:cacheprovider tests/diffusion ;;
        bench) run_part bench 420 "${BENCH[@]}" --json "$OUT/gpu.json" ;;
        profile) run_part profile 240 "${BENCH[@]}" --parts step --cases bd3-B16-flex \
                     --profile bd3-B16-flex ;;
        trainer) run_part trainer 420 bash -c part_trainer ;;
        *) echo "unknown part '$part' (env install diffusion bench profile trainer)"; exit 2 ;;
    esac
done
echo "failed parts: $failed (summary: $OUT/summary.txt)"
exit "$failed"
