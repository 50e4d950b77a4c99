#!/usr/bin/env bash
# Runs the test suite (fast tests; add `-m slow` or `-m ''` for the long ones). Extra args go to pytest.
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
