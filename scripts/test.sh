#!/usr/bin/env bash
# Runs every test of the workspace in the release profile (the profile the binary uses,
# so CI builds once). End-to-end tests start the real binary with the real default model.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo nextest run --release --workspace --no-fail-fast "$@"
# The web chat in Chromium against the real binary and model.
(cd web && WISPTEST_BIN="${CARGO_TARGET_DIR:-$PWD/../target}/release/wisp" npm test)
# The OpenAPI document against the running server (schemathesis).
scripts/check-openapi.sh
# docker/ checked offline: compose and Kubernetes schemas, Dockerfile lint, shipped configs.
scripts/check-deploy.sh
# The SDK's documented example must compile.
cargo test --doc --manifest-path sdk/Cargo.toml -q
