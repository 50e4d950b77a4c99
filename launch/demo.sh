#!/usr/bin/env bash
# Main job on the embedded default. Extra args go to the Python entry point.
source "$(dirname "$0")/env.sh"
python -m pretrain.demo "$@"
