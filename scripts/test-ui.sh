#!/usr/bin/env bash
# Browser test of the coordinator's dashboard (/ui), with API-registered members and two real
# joiners in network namespaces (root): Debian's chromium driven headless by
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
if [ "$(id -u)" != 0 ]; then
  echo "test-ui: FAIL: the real joiners run in network namespaces: run as root" >&2
  exit 1
fi
# The namespaces the test creates, removed even if Python is killed before its cleanup.
cleanup() {
  for ns in tui-ops-ui-lan tui-ops-ui-j1 tui-ops-ui-j2; do ip netns del "$ns" 2>/dev/null || true; done
  ip link del toui-host 2>/dev/null || true
}
trap cleanup EXIT
cargo build -q -p tabbify-control -p tabbify-dataplane --bins
"$venv/bin/python" scripts/ui_test.py
