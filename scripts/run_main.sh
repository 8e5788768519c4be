#!/usr/bin/env bash
# Quick start 1: set up, then a real GRPO run of the embedded model on the "larger" task, with
# held-out evaluation before and after. Extra arguments go to `python -m grpo_lib train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m grpo_lib train --preset cpu-tiny --run-dir "${RUN_DIR:-runs/main}" "$@"
