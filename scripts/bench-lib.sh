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
