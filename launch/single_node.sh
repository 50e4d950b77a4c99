#!/usr/bin/env bash
# One node: every GPU (or NPROC CPU ranks, default 2, when there is no GPU) through the deepspeed launcher.
#   bash launch/single_node.sh [CONFIG] [key=value ...]      e.g. NPROC=4 bash launch/single_node.sh configs/train/tiny_cpu.yaml parallel.tp=2
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CONFIG="${1:-configs/train/tiny_cpu.yaml}"; shift || true
if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
else
    NPROC="${NPROC:-2}"
fi
exec deepspeed --num_nodes 1 --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    pretrain/train.py --config "$CONFIG" "$@"
