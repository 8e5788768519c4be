#!/usr/bin/env bash
# Quick start 2: set up (including the browser for the widget test), then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh
mkdir -p test-output
exec .venv/bin/python -m pytest -ra "$@"
