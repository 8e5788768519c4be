#!/usr/bin/env bash
# Installs what tests/test_browser.py needs: Debian's Chromium (apt) and Playwright (pip, into the
# project's .venv). Playwright drives /usr/bin/chromium, so `playwright install` is never needed.
# Idempotent: skips what is already there. Another interpreter: PYTHON=/path/to/python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PLAYWRIGHT_VERSION=1.65.2

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi
if ! "$PY" -c "import importlib.metadata as m; assert m.version('playwright') == '$PLAYWRIGHT_VERSION'" 2>/dev/null; then
  "$PY" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi
echo "browser test: $(/usr/bin/chromium --version 2>/dev/null), playwright $PLAYWRIGHT_VERSION"
