#!/usr/bin/env bash
# One node: every GPU (or NPROC CPU ranks, default 2, when there is no GPU) through the deepspeed launcher.
#   bash launch/single_node.sh [CONFIG] [key=value ...]      e.g. NPROC=4 bash launch/single_node.sh configs/train/tiny_cpu.yaml parallel.tp=2
# SIGTERM or SIGUSR1 to this script's process: every rank checkpoints and the script exits 0 (pretrain/preemption.py).
# DS_LOG_LEVEL (default error) sets the deepspeed launcher's own logging; DRY_RUN=1 prints the command.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CONFIG="${1:-configs/train/tiny_cpu.yaml}"; shift || true
if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
else
    NPROC="${NPROC:-2}"
fi
exec python -m pretrain.preemption deepspeed --log_level "${DS_LOG_LEVEL:-error}" --num_nodes 1 --num_gpus "$NPROC" \
    --master_port "${MASTER_PORT:-29500}" pretrain/train.py --config "$CONFIG" "$@"
