#!/usr/bin/env bash
# Fetches what compiling (not running) the TensorRT shim needs, idempotently, into .deps/:
#   .deps/tensorrt/include   TensorRT 11.4 headers (Apache-2.0), from the crates.io crate trtx-sys
#   .deps/cuda/include, lib  CUDA runtime headers + libcudart, from the PyPI wheels
#   .deps/tensorrt-lean/     libnvinfer_lean.so.11 (PyPI), to test the no-driver path with a real library
#   .deps/cuda/nvrtc         libnvrtc.so.13 (PyPI): compiles the denoising step kernel to PTX in tests (no GPU needed)
#   .deps/libclang           libclang.so (PyPI wheel `libclang`): bindgen reads TensorRT's enums and version at build time
# and appends the matching exports to .deps/env (TENSORRT_INCLUDE_DIR, CUDA_INCLUDE_DIR, QWEN_EDIT_TEST_*).
# Nothing here is built or linked: trtx-sys is only downloaded for its header folder.
# Usage: scripts/fetch-gpu-headers.sh            (called by scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEPS=$ROOT/.deps
log() { printf '[gpu-headers] %s\n' "$*" >&2; }

TRTX_VERSION="0.9.1+rtx1.7"         # crate that ships TensorRT-Headers/TRT-Enterprise-11.4
TRT_HEADERS="TRT-Enterprise-11.4"
CUDA_VERSION="13.2.86"               # nvidia-cuda-runtime / nvidia-cuda-crt wheels (same release)
TRT_LEAN_VERSION="11.4.0.106"        # tensorrt-lean-cu12-libs wheel
LIBCLANG_VERSION="18.1.1"            # libclang wheel (libclang.so for bindgen in build.rs)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$DEPS"

# --- TensorRT headers from the trtx-sys crate -----------------------------------------
TRT_INC=$DEPS/tensorrt/include
if [ ! -f "$TRT_INC/NvInferRuntime.h" ] || [ "$(cat "$DEPS/tensorrt/.version" 2>/dev/null)" != "$TRTX_VERSION" ]; then
  log "fetching trtx-sys $TRTX_VERSION with cargo (headers only)"
  HELPER=$DEPS/trtx-fetch
  mkdir -p "$HELPER/src"
  cat > "$HELPER/Cargo.toml" <<EOF
[package]
name = "qwen-edit-trt-headers"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
trtx-sys = { version = "=${TRTX_VERSION%%+*}", default-features = false }

[workspace]
EOF
  : > "$HELPER/src/lib.rs"
  cargo fetch --manifest-path "$HELPER/Cargo.toml" >&2
  CARGO_DIR=${CARGO_HOME:-$HOME/.cargo}
  CRATE=$(ls "$CARGO_DIR"/registry/cache/*/"trtx-sys-$TRTX_VERSION.crate" 2>/dev/null | head -n1 || true)
  [ -n "$CRATE" ] || { log "trtx-sys-$TRTX_VERSION.crate not found in $CARGO_DIR/registry/cache"; exit 1; }
  TMP=$(mktemp -d)
  tar -xzf "$CRATE" -C "$TMP" "trtx-sys-$TRTX_VERSION/TensorRT-Headers/$TRT_HEADERS"
  rm -rf "$DEPS/tensorrt"
  mkdir -p "$DEPS/tensorrt"
  mv "$TMP/trtx-sys-$TRTX_VERSION/TensorRT-Headers/$TRT_HEADERS" "$TRT_INC"
  rm -rf "$TMP"
  echo "$TRTX_VERSION" > "$DEPS/tensorrt/.version"
fi

# --- wheels: CUDA runtime headers + libcudart, CUDA crt headers, TensorRT lean runtime --
fetch_wheel() { # name version dest-dir
  local name=$1 version=$2 dest=$3 tmp
  if [ "$(cat "$dest/.version-$name" 2>/dev/null)" = "$version" ]; then return; fi
  log "downloading $name==$version from PyPI"
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" "$name==$version" >&2
  mkdir -p "$dest"
  "$PY" -m zipfile -e "$tmp"/*.whl "$dest/wheel-$name" >&2
  rm -rf "$tmp"
  echo "$version" > "$dest/.version-$name"
}
CUDA=$DEPS/cuda
fetch_wheel nvidia-cuda-runtime "$CUDA_VERSION" "$CUDA"
fetch_wheel nvidia-cuda-crt "$CUDA_VERSION" "$CUDA"
mkdir -p "$CUDA/include" "$CUDA/lib"
# -p keeps the wheel's timestamps: build.rs watches these headers, and a fresh mtime on every
# setup would rebuild the crate on every `make serve` / `make test`.
cp -Rp "$CUDA"/wheel-nvidia-cuda-runtime/nvidia/cu13/include/. "$CUDA/include/"
cp -Rp "$CUDA"/wheel-nvidia-cuda-crt/nvidia/cu13/include/. "$CUDA/include/"
cp -p "$CUDA"/wheel-nvidia-cuda-runtime/nvidia/cu13/lib/libcudart.so.* "$CUDA/lib/"
CUDART=$(ls "$CUDA"/lib/libcudart.so.* | head -n1)
fetch_wheel nvidia-cuda-nvrtc "$CUDA_VERSION" "$CUDA"
NVRTC=$(ls "$CUDA"/wheel-nvidia-cuda-nvrtc/nvidia/cu13/lib/libnvrtc.so.* | head -n1)

LEAN=$DEPS/tensorrt-lean
fetch_wheel tensorrt-lean-cu12-libs "$TRT_LEAN_VERSION" "$LEAN"
LEAN_LIB=$(ls "$LEAN"/wheel-tensorrt-lean-cu12-libs/tensorrt_lean_libs/libnvinfer_lean.so.* | head -n1)

fetch_wheel libclang "$LIBCLANG_VERSION" "$DEPS/libclang"
LIBCLANG_SO=$(find "$DEPS/libclang/wheel-libclang" -name 'libclang.so*' | head -n1)
[ -n "$LIBCLANG_SO" ] || { log "libclang.so not found in the libclang wheel"; exit 1; }

[ -f "$TRT_INC/NvInferRuntime.h" ] && [ -f "$TRT_INC/NvOnnxParser.h" ] || { log "TensorRT headers incomplete"; exit 1; }
[ -f "$CUDA/include/cuda_runtime_api.h" ] && [ -f "$CUDA/include/crt/host_defines.h" ] || { log "CUDA headers incomplete"; exit 1; }

# --- environment: replace our block in .deps/env, keep everyone else's lines -----------
ENV=$DEPS/env
touch "$ENV"
sed -i '/^# >>> gpu-headers/,/^# <<< gpu-headers/d' "$ENV"
{
  echo "# >>> gpu-headers (scripts/fetch-gpu-headers.sh)"
  echo "export TENSORRT_INCLUDE_DIR='$TRT_INC'"
  echo "export CUDA_INCLUDE_DIR='$CUDA/include'"
  echo "export QWEN_EDIT_TEST_CUDART_LIB='$CUDART'"
  echo "export QWEN_EDIT_TEST_TRT_LEAN_LIB='$LEAN_LIB'"
  echo "export QWEN_EDIT_TEST_NVRTC_LIB='$NVRTC'"
  echo "export LIBCLANG_PATH='$(dirname "$LIBCLANG_SO")'"
  echo "# <<< gpu-headers"
} >> "$ENV"
log "TensorRT headers: $TRT_INC; CUDA headers: $CUDA/include"
