#!/usr/bin/env bash
# Set up ./.venv and run SplitFed on the embedded digits with `flwr run` on Flower's simulation
# engine (10 clients). Arguments go to `python -m simulation.launch` (try --help).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m simulation.launch "$@"
