#!/usr/bin/env bash
# Several nodes listed in a hostfile (see launch/hostfile.example).
#   bash launch/multi_node.sh HOSTFILE CONFIG [key=value ...]
# With passwordless ssh (pdsh) the launcher on the first node starts every node. Without ssh, run the same
# command on every node with NODE_RANK (0..N-1) and MASTER_ADDR (the first node's address) set: each node then
# starts only its own ranks (deepspeed --no_ssh --node_rank).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
HOSTFILE="${1:?usage: multi_node.sh HOSTFILE CONFIG [key=value ...]}"; CONFIG="${2:?missing CONFIG}"; shift 2
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE" >&2; exit 2; }
ARGS=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
[ -n "${NODE_RANK:-}" ] && ARGS+=(--no_ssh --node_rank "$NODE_RANK")
exec deepspeed "${ARGS[@]}" pretrain/train.py --config "$CONFIG" "$@"
