#!/usr/bin/env bash
# Memory of wisp beside llama-server serving the same GGUF with the same capacity (8
# sequences x 1,024 tokens), measured in one run: peak RSS while loading (VmHWM once
# ready), RSS once ready, and RSS idle after 8 concurrent requests (and the peak by then).
# wisp runs twice: with the default prefix cache (limits.prefix_cache_mb unset: sized
# against the model) and without one, since the prefix cache is memory kept on purpose.
#
# Usage: scripts/bench-memory.sh [MODEL.gguf] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(realpath "${1:-models/gemma-3-270m-q4_k_m.gguf}")
THREADS=${2:-2}
SEQS=8
CTX=1024
LLAMA_BIN=$(scripts/build-llama.sh llama-server)
cargo build --release --bin wisp -q
WISP=$(realpath "${CARGO_TARGET_DIR:-target}/release/wisp")
source scripts/bench-lib.sh
kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
load() {  # load PORT MODEL_ID: 8 concurrent completions, ~120-token prompts, 64 tokens each
  python3 - "$1" "$2" "$SEQS" <<'PY'
import http.client, json, sys, threading
port, model, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def one(i):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    prompt = f"[{i}] " + "The river carries sand from the mountains to the sea, and its course bends. " * 8
    c.request("POST", "/v1/completions", json.dumps({"model": model, "prompt": prompt, "max_tokens": 64, "temperature": 0}),
              {"Content-Type": "application/json"})
    r = c.getresponse(); body = r.read()
    assert r.status == 200, body[:200]
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in threads]; [t.join() for t in threads]
PY
}
measure() {  # measure LABEL PORT MODEL_ID: the server must be starting as $server
  wait_ready "http://127.0.0.1:$2/$4"
  local peak_load ready
  peak_load=$(kb "$server" VmHWM); ready=$(kb "$server" VmRSS)
  load "$2" "$3"
  sleep 1
  echo "$1|$peak_load|$ready|$(kb "$server" VmRSS)|$(kb "$server" VmHWM)" >> "$dir/rows"
  stop "$server"
}

echo "memory: $(basename "$MODEL"), $SEQS sequences x $CTX tokens, $THREADS threads, $(date -u +%FT%TZ)"
"$LLAMA_BIN/llama-server" -m "$MODEL" -t "$THREADS" --port 18095 -np "$SEQS" -c $((SEQS * CTX)) >"$dir/llama.log" 2>&1 &
server=$!; pids+=("$server")
measure "llama-server -np $SEQS -c $((SEQS * CTX)) (f16 KV)" 18095 any health
for prefix in default 0; do
  printf '[[models]]\nid = "m"\npath = "%s"\ndevice = "cpu"\ncontext_length = %s\n[limits]\nmax_batch = %s\n' \
    "$MODEL" "$CTX" "$SEQS" > "$dir/wisp.toml"
  [ "$prefix" = default ] || echo "prefix_cache_mb = $prefix" >> "$dir/wisp.toml"
  (cd "$dir" && RAYON_NUM_THREADS=$THREADS RUST_LOG=warn exec "$WISP" serve --listen 127.0.0.1:18096 --config wisp.toml >"$dir/wisp.log" 2>&1) &
  server=$!; pids+=("$server")
  measure "wisp, max_batch $SEQS, context $CTX, prefix_cache_mb $prefix" 18096 m ready
done
echo
echo "| server | peak RSS loading MB | RSS ready MB | RSS idle after $SEQS requests MB | peak RSS MB |"
echo "|---|---:|---:|---:|---:|"
awk -F'|' '{ printf "| %s | %.0f | %.0f | %.0f | %.0f |\n", $1, $2/1024, $3/1024, $4/1024, $5/1024 }' "$dir/rows"
