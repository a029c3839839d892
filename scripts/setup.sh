#!/usr/bin/env bash
# Installs everything qwen-edit needs on a fresh machine, idempotently, into the repo:
#   .venv/  Python env (export tool, reference pipeline, ONNX Runtime's shared library)
#   .deps/  build-time headers and a sourced env file (.deps/env)
# Usage: scripts/setup.sh [runtime|check|all]   (runtime = only what `serve`/`edit` need; check = runtime
#        plus the Python linter for `make check`; all = everything `make test` needs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-all}
PY=${PYTHON:-python3}
log() { printf '[setup] %s\n' "$*" >&2; }

mkdir -p .deps

# --- Python environment -------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
VPY=$ROOT/.venv/bin/python
stamp_ok() { [ -f "$1" ] && cmp -s "$1" "$2"; }
pinned() { sed -n "s/^$1==//p" export/requirements.txt; }
if [ "$MODE" = runtime ] || [ "$MODE" = check ]; then
  if ! "$VPY" -c "import onnxruntime" 2>/dev/null; then
    log "installing onnxruntime==$(pinned onnxruntime) (runtime only)"
    "$VPY" -m pip install -q --disable-pip-version-check --no-cache-dir "onnxruntime==$(pinned onnxruntime)"
  fi
  if [ "$MODE" = check ] && [ "$("$VPY" -m ruff --version 2>/dev/null)" != "ruff $(pinned ruff)" ]; then
    log "installing ruff==$(pinned ruff)"
    "$VPY" -m pip install -q --disable-pip-version-check --no-cache-dir "ruff==$(pinned ruff)"
  fi
else
  if ! stamp_ok .venv/.requirements.stamp export/requirements.txt; then
    log "installing export/requirements.txt (torch is large: a few minutes)"
    # The set takes ~5 GB installed plus its downloads while pip runs: say so before pip fails on it.
    free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
    if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
      log "warning: $((free_kb / 1024)) MiB free here; installing the Python set needs ~8 GB and the test build ~10 GB more"
    fi
    # --no-deps: the file is the complete set (triton left out); --no-cache-dir: no second copy of every
    # wheel on disk.
    "$VPY" -m pip install -q --disable-pip-version-check --no-cache-dir --no-deps -r export/requirements.txt
    # Every dependency of what is installed must be installed too, but for triton.
    missing_deps=$("$VPY" -m pip check --disable-pip-version-check 2>&1 | grep -v -E ' requires triton' | grep -v '^No broken' || true)
    if [ -n "$missing_deps" ]; then
      log "export/requirements.txt is not a complete set:"; printf '%s\n' "$missing_deps" >&2; exit 1
    fi
    cp export/requirements.txt .venv/.requirements.stamp
  fi
fi

# --- environment file sourced by the Makefile and CI ---------------------------------
ORT_LIB=$("$VPY" - <<'PY'
import glob, os, onnxruntime
d = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
libs = sorted(glob.glob(os.path.join(d, "libonnxruntime.so.*")))
print(libs[-1] if libs else "")
PY
)
[ -n "$ORT_LIB" ] || { log "libonnxruntime not found in the onnxruntime wheel"; exit 1; }
{
  echo "export QWEN_EDIT_ORT_LIB='$ORT_LIB'"
} > .deps/env
# --- libjpeg-turbo 3 build tools (the turbojpeg crate builds it from source with cmake; nasm
#     enables its SIMD; without nasm it still builds, slower). apt when root, else pip cmake.
missing=""
command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
command -v nasm >/dev/null 2>&1 || missing="$missing nasm"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing$missing (apt) for the libjpeg-turbo build"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
if ! command -v cmake >/dev/null 2>&1; then
  [ -x .venv/bin/cmake ] || { log "installing cmake (pip, into .venv)"; "$VPY" -m pip install -q --disable-pip-version-check --no-cache-dir 'cmake>=3.18,<4'; }
  echo "export PATH='$ROOT/.venv/bin':\"\$PATH\"  # cmake for the libjpeg-turbo build" >> .deps/env
fi
command -v nasm >/dev/null 2>&1 || log "warning: nasm not found: libjpeg-turbo is built without SIMD (slower JPEG)"
# TensorRT + CUDA headers (compile the shim) and test libraries; appends its exports to .deps/env.
PYTHON=$VPY scripts/fetch-gpu-headers.sh
log "ready (mode: $MODE); environment in .deps/env"
