#!/usr/bin/env bash
# The API with curl against a running wisp (make run). WISP_URL and WISP_KEY override.
set -euo pipefail
URL="${WISP_URL:-http://127.0.0.1:8080}"
AUTH=()
[ -n "${WISP_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $WISP_KEY")

echo "# models"
curl -sS "${AUTH[@]}" "$URL/v1/models"; echo
echo "# a chat reply"
curl -sS "${AUTH[@]}" "$URL/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Name three colours."}],"max_tokens":24}'; echo
echo "# the same, streamed (server-sent events)"
curl -sSN "${AUTH[@]}" "$URL/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Name three colours."}],"max_tokens":24,"stream":true}'
echo "# a session: create it, chat twice sending only the new message, read it back"
session=$(curl -sS "${AUTH[@]}" "$URL/v1/sessions" -H 'content-type: application/json' -d '{"system_prompt":"Be brief."}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for question in "What is a wisp?" "Say it shorter."; do
  curl -sS "${AUTH[@]}" "$URL/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"session_id\":\"$session\",\"messages\":[{\"role\":\"user\",\"content\":\"$question\"}],\"max_tokens\":24}" >/dev/null
done
curl -sS "${AUTH[@]}" "$URL/v1/sessions/$session"; echo
