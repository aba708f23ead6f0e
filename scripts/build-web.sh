#!/usr/bin/env bash
# Builds the web chat (web/ → web/dist) from the npm registry's packages. The wisp binary
# embeds web/dist at compile time, so run this before cargo builds (make run / make test do).
set -euo pipefail
cd "$(dirname "$0")/../web"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "web: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi
node build.mjs
