#!/usr/bin/env bash
# Prints the TensorRT include directory whose headers match the TensorRT library this host loads, so the
# shim is compiled against the version it runs with (the shim refuses a libnvinfer of another major, or
# older than its headers). scripts/setup.sh fetches TensorRT 11.4 headers; a host with TensorRT 10 needs
# its own (libnvinfer-dev), or the production image (Dockerfile.tensorrt), which has both.
#   scripts/trt-headers.sh            -> the directory on stdout, exit 0; else the reason on stderr, exit 1
# The library: QWEN_EDIT_TRT_LIB, else the newest libnvinfer.so.<major>.<minor>.<patch> in QE_TRT_LIB_DIRS
# (default: the dynamic linker's cache, /usr/lib/x86_64-linux-gnu, /usr/local/tensorrt/lib, $TENSORRT_ROOT/lib).
# The headers: TENSORRT_INCLUDE_DIR first, then QE_TRT_HEADER_DIRS (default: /usr/include/x86_64-linux-gnu,
# /usr/include, /usr/local/tensorrt/include, $TENSORRT_ROOT/include, .deps/tensorrt/include): the first of
# the library's major whose version is not newer than the library.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[trt-headers] %s\n' "$*" >&2; }

# "major minor patch" of a libnvinfer file name (libnvinfer.so.10.13.2), resolving symlinks.
lib_version() {
  local f
  f=$(basename "$(readlink -f "$1")")
  [[ $f =~ ^libnvinfer\.so\.([0-9]+)\.([0-9]+)\.([0-9]+) ]] || return 1
  echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]} ${BASH_REMATCH[3]}"
}

# "major minor patch" of an include directory's NvInferVersion.h (NV_TENSORRT_* or TRT_*_ENTERPRISE/RTX macros).
header_version() {
  local h=$1/NvInferVersion.h v=() part
  [ -f "$h" ] || return 1
  for part in MAJOR MINOR PATCH; do
    local n
    n=$(sed -nE "s/^#define[[:space:]]+(NV_TENSORRT_${part}|TRT_${part}_[A-Z]+)[[:space:]]+([0-9]+).*/\2/p" "$h" | head -n1)
    [ -n "$n" ] || return 1
    v+=("$n")
  done
  echo "${v[*]}"
}

find_library() {
  if [ -n "${QWEN_EDIT_TRT_LIB:-}" ]; then echo "$QWEN_EDIT_TRT_LIB"; return; fi
  local dirs=${QE_TRT_LIB_DIRS:-}
  local cands=()
  if [ -z "$dirs" ]; then
    dirs="/usr/lib/x86_64-linux-gnu /usr/local/tensorrt/lib ${TENSORRT_ROOT:+$TENSORRT_ROOT/lib}"
    while read -r p; do cands+=("$p"); done < <(ldconfig -p 2>/dev/null | sed -nE 's/.*libnvinfer\.so\.[0-9]+ .*=> (.*)$/\1/p')
  fi
  for d in $dirs; do
    for f in "$d"/libnvinfer.so.*.*.*; do [ -e "$f" ] && cands+=("$f"); done
  done
  local best="" best_key=-1 v key
  for f in "${cands[@]}"; do
    v=$(lib_version "$f") || continue
    set -- $v
    key=$(( $1 * 1000000 + $2 * 1000 + $3 ))
    if [ "$key" -gt "$best_key" ]; then best=$f; best_key=$key; fi
  done
  [ -n "$best" ] && echo "$best"
}

lib=$(find_library || true)
[ -n "$lib" ] || { log "no TensorRT library (libnvinfer.so.<major>.<minor>.<patch>) found: install TensorRT or set QWEN_EDIT_TRT_LIB"; exit 1; }
read -r lmaj lmin lpat < <(lib_version "$lib") || { log "cannot tell the version of $lib"; exit 1; }

dirs=${QE_TRT_HEADER_DIRS:-"/usr/include/x86_64-linux-gnu /usr/include /usr/local/tensorrt/include ${TENSORRT_ROOT:+$TENSORRT_ROOT/include} .deps/tensorrt/include"}
seen=()
for d in ${TENSORRT_INCLUDE_DIR:-} $dirs; do
  v=$(header_version "$d") || continue
  read -r hmaj hmin hpat <<<"$v"
  seen+=("$d ($hmaj.$hmin.$hpat)")
  if [ "$hmaj" = "$lmaj" ] && [ $(( hmin * 1000 + hpat )) -le $(( lmin * 1000 + lpat )) ]; then
    log "TensorRT $lmaj.$lmin.$lpat ($lib): headers $hmaj.$hmin.$hpat in $d"
    echo "$d"
    exit 0
  fi
done
log "TensorRT $lmaj.$lmin.$lpat ($lib) has no matching headers (major $lmaj, not newer than the library); found: ${seen[*]:-none}."
log "Install its development headers (e.g. libnvinfer-dev $lmaj.$lmin.$lpat), set TENSORRT_INCLUDE_DIR, or run the smoke test in Dockerfile.tensorrt's image."
exit 1
