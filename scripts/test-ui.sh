#!/usr/bin/env bash
# Browser test of the coordinator's dashboard (/ui): Debian's chromium driven headless by
# Playwright (Python, from the venv target/ui-venv that scripts/setup.sh makes with
# TABBIFY_SETUP_UI=1; no browser is downloaded), axe-core for accessibility. The test
# itself is scripts/ui_test.py; screenshots and the axe report go to target/ui-artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  echo "test-ui: FAIL: /usr/bin/chromium is missing; install the Debian package chromium" \
       "(apt-get install chromium, or TABBIFY_SETUP_UI=1 scripts/setup.sh)" >&2
  exit 1
fi
venv="${TABBIFY_UI_VENV:-target/ui-venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "test-ui: FAIL: no Python venv at $venv with playwright and axe-playwright-python;" \
       "run TABBIFY_SETUP_UI=1 scripts/setup.sh" >&2
  exit 1
fi
cargo build -q -p tabbify-control --bins
exec "$venv/bin/python" scripts/ui_test.py
