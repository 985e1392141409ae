#!/usr/bin/env bash
# Property-based API test: schemathesis generates requests from the coordinator's
# /openapi.json (a bounded number of examples per operation) and checks that no answer is
# a server error and every answer matches the documented status codes, content types and
# schemas. The coordinator runs as a real process in loopback plaintext mode (the
# x-tabbify-identity header names the caller), on an ephemeral port, and is stopped (by
# its PID) on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

# `st` may not be on PATH right after `pip install` (e.g. pyenv shims not rehashed).
if command -v st >/dev/null 2>&1; then
  st=(st)
elif python3 -m schemathesis.cli --version >/dev/null 2>&1; then
  st=(python3 -m schemathesis.cli)
else
  echo "test-schemathesis: schemathesis is not installed;" \
       "run TABBIFY_SETUP_SCHEMATHESIS=1 scripts/setup.sh or 'pip install schemathesis'" >&2
  exit 1
fi

MAX_EXAMPLES="${TABBIFY_SCHEMATHESIS_EXAMPLES:-40}"
cargo build -q -p tabbify-control --bin tabbify-mesh-coordinator
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target_dir/debug/tabbify-mesh-coordinator"

work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/policy.json" <<'JSON'
{
  "tags": ["node", "supervisor", "worker"],
  "app_hosts": ["tag:supervisor"],
  "allow": [{"src": ["tag:node"], "dst": ["tag:supervisor:8730"]}],
  "deny": []
}
JSON

TABBIFY_ALLOW_INSECURE=1 RUST_LOG=warn "$bin" --bind 127.0.0.1:0 --insecure-no-mtls \
  --admin admin --policy-file "$work/policy.json" --state-dir "$work/state" \
  > "$work/stdout" 2> "$work/stderr" &
pid=$!
addr=""
for _ in $(seq 1 100); do
  addr="$(sed -n 's/^listening on //p' "$work/stdout" | head -n1)"
  [ -n "$addr" ] && break
  if ! kill -0 "$pid" 2>/dev/null; then cat "$work/stderr" >&2; exit 1; fi
  sleep 0.1
done
[ -n "$addr" ] || { echo "test-schemathesis: coordinator did not start" >&2; cat "$work/stderr" >&2; exit 1; }
echo "test-schemathesis: coordinator on $addr, $MAX_EXAMPLES examples per operation"

# Run from the scratch directory: schemathesis leaves a .schemathesis/ cache behind.
(cd "$work" && "${st[@]}" run "http://$addr/openapi.json" \
  --url "http://$addr" \
  --header "x-tabbify-identity: admin" \
  --exclude-path /v1/admin/stream \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "$MAX_EXAMPLES" \
  --seed 1 \
  --no-color)

if grep -q panicked "$work/stderr"; then
  echo "test-schemathesis: the coordinator panicked:" >&2
  cat "$work/stderr" >&2
  exit 1
fi
