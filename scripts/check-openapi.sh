#!/usr/bin/env bash
# Runs schemathesis (PyPI) against a running wisp's /openapi.json: every documented
# operation with generated valid and invalid inputs. Passes only with no server error
# (5xx) and every response conforming to the document (status, content type, schema).
# The server gets a 64-token context so that generated max_tokens values stay quick.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$(pwd)/$target" ;; esac
WISP="$target/release/wisp"
.venv/bin/pip install --quiet --disable-pip-version-check -r host/tests/openapi-requirements.txt

dir="$(mktemp -d)"
cleanup() { [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
cat > "$dir/wisp.toml" <<TOML
[[models]]
id = "gemma-3-270m"
path = "$(pwd)/models/gemma-3-270m-q4_k_m.gguf"
context_length = 64
[admin]
key = "schemathesis-admin"
TOML
(cd "$dir" && RUST_LOG=warn exec "$WISP" serve --listen 127.0.0.1:0 --config wisp.toml > stdout.log 2> stderr.log) &
pid=$!
for _ in $(seq 1 600); do
  url="$(sed -n 's/^wisp listening on //p' "$dir/stdout.log" 2>/dev/null | head -1)"
  [ -n "$url" ] && curl -sf "$url/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
[ -n "$url" ] || { echo "openapi: wisp did not start"; cat "$dir/stderr.log"; exit 1; }

echo "openapi: schemathesis against $url/openapi.json"
.venv/bin/schemathesis run "$url/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples 15 --workers 1 --request-timeout 60 --seed 1 \
  --header "Authorization: Bearer schemathesis-admin"
echo "openapi: what the server answered (route, status: count)"
curl -sf "$url/metrics" | sed -n 's/^wisp_requests_total{route="\([^"]*\)",status="\([^"]*\)"} \(.*\)/  \1 \2: \3/p' | sort
