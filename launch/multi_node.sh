#!/usr/bin/env bash
# Several nodes listed in a hostfile (see launch/hostfile.example).
#   bash launch/multi_node.sh HOSTFILE CONFIG [key=value ...]
# With passwordless ssh (pdsh) the launcher on the first node starts every node. Without ssh, run the same
# command on every node with NODE_RANK (0..N-1) and MASTER_ADDR (the first node's address) set: each node then
# starts only its own ranks (deepspeed --no_ssh --node_rank). Then SIGTERM or SIGUSR1 to this script's process
# makes this node's ranks checkpoint and the script exit 0 (pretrain/preemption.py); under ssh a signal goes to
# DeepSpeed's launcher, which stops every node's ranks its own way (SIGKILL 30 s later).
# DS_LOG_LEVEL (default warning) sets the deepspeed launcher's own logging; DRY_RUN=1 prints the command.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
HOSTFILE="${1:?usage: multi_node.sh HOSTFILE CONFIG [key=value ...]}"; CONFIG="${2:?missing CONFIG}"; shift 2
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE" >&2; exit 2; }
ARGS=(--log_level "${DS_LOG_LEVEL:-warning}" --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
[ -n "${NODE_RANK:-}" ] && ARGS+=(--no_ssh --node_rank "$NODE_RANK")
exec python -m pretrain.preemption deepspeed "${ARGS[@]}" pretrain/train.py --config "$CONFIG" "$@"
