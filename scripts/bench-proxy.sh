#!/usr/bin/env bash
# The cost of wisp's proxy mode: llama-server (built from the PyPI sdist by
# scripts/build-llama.sh) on a GGUF, and wisp in front of it with wisp.toml's default plugin
# chain; scripts/proxy_bench.py alternates the same streamed requests between the two and
# prints TTFT and chunk gaps for each, and what wisp adds.
#
# With UPSTREAM=stub, scripts/stub_upstream.py (a reply of 4 chunks at once) takes
# llama-server's place: what wisp's own path costs with no model beside it.
#
# Usage: [UPSTREAM=stub] [WISP=path/to/wisp] scripts/bench-proxy.sh [MODEL.gguf] [PAIRS]
# (WISP: another build to measure, e.g. an earlier commit's binary; default: this tree's.)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/gemma-3-270m-q4_k_m.gguf}
PAIRS=${2:-40}
UPSTREAM=${UPSTREAM:-llama}
[ "$UPSTREAM" = llama ] && LLAMA_BIN=$(scripts/build-llama.sh llama-server)
if [ -z "${WISP:-}" ]; then
  cargo build --release --bin wisp -q
  WISP=$(realpath "${CARGO_TARGET_DIR:-target}/release/wisp")
fi

source scripts/bench-lib.sh

# One thread for llama-server: the other core is the proxy's (in production they would not
# share a machine; on 2 cores, -t 2 makes wisp wait for llama's spinning threads).
if [ "$UPSTREAM" = stub ]; then
  python3 scripts/stub_upstream.py 18091 &
  pids+=($!)
  wait_ready http://127.0.0.1:18091/v1/models
  upstream_name="scripts/stub_upstream.py"
else
  "$LLAMA_BIN/llama-server" -m "$MODEL" -t 1 --port 18091 -np 4 -c 8192 --metrics >"$dir/llama.log" 2>&1 &
  pids+=($!)
  wait_ready http://127.0.0.1:18091/health
  upstream_name="$(basename "$MODEL"), llama-server -t 1 -np 4"
fi

# wisp in front of llama-server twice: with the default chain of wisp.toml (rate limit,
# prompt guard, redaction), and with no plugins.
dist="$(pwd)/plugins/dist"
serve_front() {  # serve_front PORT WITH_CHAIN
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\n[store]\nurl = "sqlite://%s/wisp-%s.db"\n' "$1" "$dir" "$1"
    printf '[[models]]\nid = "proxied"\nupstreams = ["http://127.0.0.1:18091/v1"]\n'
    [ "$2" = 1 ] && sed -n '/^\[\[plugins\]\]/,$p' wisp.toml | sed "s|plugins/dist|$dist|"
  } >"$dir/wisp-$1.toml"
  "$WISP" serve --config "$dir/wisp-$1.toml" >"$dir/wisp-$1.log" 2>&1 &
  pids+=($!)
  front_pid=$!
  wait_ready "http://127.0.0.1:$1/ready"
}
serve_front 18090 1
chain_pid=$front_pid
serve_front 18092 0
bare_pid=$front_pid

echo "proxy: $upstream_name; wisp in front with wisp.toml's plugins (chain) and with none (bare)"
python3 scripts/proxy_bench.py --direct http://127.0.0.1:18091 --proxy "chain=http://127.0.0.1:18090@$chain_pid" \
  --proxy "bare=http://127.0.0.1:18092@$bare_pid" --model proxied --pairs "$PAIRS"
