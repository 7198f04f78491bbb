#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite, end-to-end runs through Flower's engines included.
source "$(dirname "${BASH_SOURCE[0]}")/../simulation/setup_env.sh"
python -m pytest "$@"
