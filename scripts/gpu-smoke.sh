#!/usr/bin/env bash
# First run on a real GPU host (TensorRT + NVIDIA driver installed), and the check of every new GPU host or
# image: for each bundle (default: engines/tiny and the 16-bit engines/tiny-bf16) it builds the engines
# (one optimization profile per batch-size group), checks that a second build is a no-op, serves the bundle
# with TensorRT and with ONNX Runtime, and sends both what production sends (scripts/gpu_smoke.py): a true-CFG
# request, four concurrent requests (one batch), a request in another text-length bucket (a new capture) and
# one more of it (a replay). It fails when the images differ, or when /metrics shows uncaptured runs or
# host-loop steps, and prints a short report (per-stage ms, captures, replays, device memory) to paste into
# an issue. Exits non-zero on any failure.
#   scripts/gpu-smoke.sh [bundle ...]        (run scripts/setup.sh first)
# The shim is compiled against the TensorRT headers that match the host's library (scripts/trt-headers.sh).
# Tunables: SMOKE_MAX_MEAN_DIFF (mean |diff| in 8-bit levels, default 2.0), SMOKE_PORT (default 18080).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PORT=${SMOKE_PORT:-18080}
MAX_MEAN=${SMOKE_MAX_MEAN_DIFF:-2.0}
PY=$ROOT/.venv/bin/python
BUNDLES=("$@")
[ ${#BUNDLES[@]} -gt 0 ] || BUNDLES=(engines/tiny engines/tiny-bf16)
log() { printf '[gpu-smoke] %s\n' "$*" >&2; }

# shellcheck disable=SC1091
[ -f .deps/env ] && source .deps/env
command -v nvidia-smi >/dev/null && nvidia-smi -L >&2 || log "nvidia-smi not found (continuing: the binary says what is missing)"

TENSORRT_INCLUDE_DIR=$(scripts/trt-headers.sh) || { log "no TensorRT headers match this host's TensorRT (see above)"; exit 3; }
export TENSORRT_INCLUDE_DIR
log "building qwen-edit (release) with the TensorRT shim required, headers $TENSORRT_INCLUDE_DIR"
QWEN_EDIT_REQUIRE_TRT_SHIM=1 cargo build --release --bin qwen-edit
BIN=$ROOT/target/release/qwen-edit

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

serve() { # backend port bundle log
  QWEN_EDIT_BACKEND=$1 API_HOST=127.0.0.1 API_PORT=$2 QWEN_EDIT_BUNDLE="$3" BATCH_SIZE=4 BATCH_TIMEOUT_MS=1000 BATCH_POLICY=fixed ORT_BF16_AS_F32=1 \
    RUST_LOG=info,qwen_edit::pipeline=debug "$BIN" serve >"$4" 2>&1 &
  PIDS+=($!)
}
wait_ready() { # port log
  for _ in $(seq 1 240); do
    if curl -fsS "http://127.0.0.1:$1/health" 2>/dev/null | grep -q '"ready"'; then return 0; fi
    sleep 0.5
  done
  cat "$2" >&2
  return 1
}
stop_servers() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); }

REPORT=$WORK/report.md
status=0
for SRC in "${BUNDLES[@]}"; do
  name=$(basename "$SRC")
  B=$WORK/$name
  cp -R "$SRC" "$B"
  log "$name: qwen-edit build (engines + ORT comparison)"
  set +e
  "$BIN" build --bundle "$B" --report "$WORK/$name-build.json"
  code=$?
  set -e
  cat "$WORK/$name-build.json" >&2
  [ "$code" = 0 ] || { log "$name: build failed with exit code $code (see docs/tensorrt.md)"; exit "$code"; }
  "$BIN" build --bundle "$B" --report "$WORK/$name-build2.json"
  "$PY" - "$WORK/$name-build2.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bad = [c["component"] for c in r["components"] if c["status"] != "up_to_date"]
assert not bad, f"rebuilt although unchanged: {bad}"
PY
  for plan in "$B"/*.plan; do "$BIN" inspect "$plan" >&2; done

  serve tensorrt "$PORT" "$B" "$WORK/$name-trt.log"
  serve ort "$((PORT + 1))" "$B" "$WORK/$name-ort.log"
  wait_ready "$PORT" "$WORK/$name-trt.log" || { log "$name: TensorRT server not ready"; exit 1; }
  wait_ready "$((PORT + 1))" "$WORK/$name-ort.log" || { log "$name: ORT server not ready"; exit 1; }
  set +e
  "$PY" scripts/gpu_smoke.py --port "$PORT" --reference-port "$((PORT + 1))" --bundle "$name" \
    --max-mean "$MAX_MEAN" --log "$WORK/$name-trt.log" | tee -a "$REPORT"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  set -e
  stop_servers
done
echo >&2
log "report (paste into the issue):"
cat "$REPORT"
[ "$status" = 0 ] && log "OK" || log "FAILED"
exit "$status"
