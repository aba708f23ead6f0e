#!/usr/bin/env bash
# Style gates of CI: rustfmt on every crate (host and helpers, the SDK, the plugins, the
# example plugin) and clippy with warnings as errors on the native workspace, all targets.
# The plugins' wasm target is installed by scripts/build-plugins.sh, which clippy does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
for manifest in sdk/Cargo.toml plugins/Cargo.toml examples/no-secrets/Cargo.toml; do
  cargo fmt --all --check --manifest-path "$manifest"
done
# Runs after `make test`, which built web/dist (the host embeds it).
cargo clippy --workspace --all-targets --release -- -D warnings
