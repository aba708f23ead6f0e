# Shared by the bench scripts (source it after `set -euo pipefail`): a work directory
# `$dir` removed on exit, the servers started in the background and added to `pids`
# killed on exit, and a wait for a server to answer.
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

# wait_ready URL [LOG]: until URL answers 200 (60 s), else the end of LOG (if given) and exit.
wait_ready() {
  for _ in $(seq 1 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "bench: $1 never answered"
  if [ -n "${2:-}" ]; then echo "its log ends:"; grep -v "^ *[0-9]*: \|^ *at " "$2" | tail -20; fi
  exit 1
}

# stop PID: a server the script started, before the next one.
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# llama_bench LLAMA_BIN ARGS...: llama-bench's results as `TEST T/S` lines (pp512, tg64).
llama_bench() {
  "$1/llama-bench" "${@:2}" -o json 2>/dev/null | python3 -c 'import json, sys
for r in json.load(sys.stdin):
    print("pp%d" % r["n_prompt"] if r["n_prompt"] else "tg%d" % r["n_gen"], r["avg_ts"])'
}

# wisp_bench WISP ARGS...: `wisp bench`'s table as `TEST T/S` lines (pp512, tg64, tg64x8).
wisp_bench() {
  "$1" bench "${@:2}" 2>/dev/null | sed -n 's/^| wisp | \([a-z0-9x]*\) | \([0-9.]*\) .*/\1 \2/p'
}
