#!/usr/bin/env bash
# Builds the SDK's plugins (plugins/) for wasm32-wasip2 and copies the components to
# plugins/dist/NAME.wasm, where the example configs and tests find them. Installs the
# wasm32-wasip2 target if it is missing. Idempotent and incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "plugins: installing the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi

target_dir="${CARGO_TARGET_DIR:-$PWD/target}/plugins"
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml --target-dir "$target_dir" "$@"
mkdir -p plugins/dist
for wasm in "$target_dir"/wasm32-wasip2/release/*.wasm; do
  cp "$wasm" plugins/dist/
done
# The example custom plugin, made by `wisp plugin new`, must keep building too.
cargo build --release --target wasm32-wasip2 --manifest-path examples/no-secrets/Cargo.toml --target-dir "$target_dir" -q
cp "$target_dir/wasm32-wasip2/release/no_secrets.wasm" plugins/dist/
echo "plugins: $(ls plugins/dist | tr '\n' ' ')"
