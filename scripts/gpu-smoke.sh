#!/usr/bin/env bash
# First run on a real GPU host (TensorRT + NVIDIA driver installed): builds the tiny bundle's engines,
# serves them with the TensorRT backend and the same bundle with ONNX Runtime, sends the same /run to
# both over loopback and compares the images. Exits non-zero on any failure.
#   scripts/gpu-smoke.sh [bundle]        (default engines/tiny; run scripts/setup.sh first)
# Tunables: SMOKE_MAX_MEAN_DIFF (mean |diff| in 8-bit levels, default 2.0), SMOKE_PORT (default 18080),
# SMOKE_ALLOW_HOST_LOOP=1 (accept a TensorRT server whose denoising loop steps on the host).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SRC_BUNDLE=${1:-engines/tiny}
PORT=${SMOKE_PORT:-18080}
MAX_MEAN=${SMOKE_MAX_MEAN_DIFF:-2.0}
PY=$ROOT/.venv/bin/python
log() { printf '[gpu-smoke] %s\n' "$*" >&2; }

# shellcheck disable=SC1091
[ -f .deps/env ] && source .deps/env
command -v nvidia-smi >/dev/null && nvidia-smi -L >&2 || log "nvidia-smi not found (continuing: the binary says what is missing)"

log "building qwen-edit (release) with the TensorRT shim required"
QWEN_EDIT_REQUIRE_TRT_SHIM=1 cargo build --release --bin qwen-edit
BIN=$ROOT/target/release/qwen-edit

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
cp -R "$SRC_BUNDLE" "$WORK/bundle"

log "qwen-edit build (engines + ORT comparison)"
set +e
"$BIN" build --bundle "$WORK/bundle" --report "$WORK/build.json"
code=$?
set -e
cat "$WORK/build.json" >&2
[ "$code" = 0 ] || { log "build failed with exit code $code (see docs/tensorrt.md)"; exit "$code"; }

log "second build must be a no-op (content key unchanged)"
"$BIN" build --bundle "$WORK/bundle" --report "$WORK/build2.json"
"$PY" - "$WORK/build2.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bad = [c["component"] for c in r["components"] if c["status"] != "up_to_date"]
assert not bad, f"rebuilt although unchanged: {bad}"
PY

for plan in "$WORK"/bundle/*.plan; do "$BIN" inspect "$plan"; done

serve() { # backend port
  QWEN_EDIT_BACKEND=$1 API_HOST=127.0.0.1 API_PORT=$2 QWEN_EDIT_BUNDLE="$WORK/bundle" "$BIN" serve >"$WORK/serve-$1.log" 2>&1 &
  PIDS+=($!)
}
wait_ready() { # port
  for _ in $(seq 1 240); do
    if curl -fsS "http://127.0.0.1:$1/health" 2>/dev/null | grep -q '"ready"'; then return 0; fi
    sleep 0.5
  done
  return 1
}
serve tensorrt "$PORT"
serve ort "$((PORT + 1))"
wait_ready "$PORT" || { cat "$WORK/serve-tensorrt.log" >&2; log "TensorRT server not ready"; exit 1; }
wait_ready "$((PORT + 1))" || { cat "$WORK/serve-ort.log" >&2; log "ORT server not ready"; exit 1; }
curl -fsS "http://127.0.0.1:$PORT/health" | tee "$WORK/health.json" >&2
grep -q tensorrt "$WORK/health.json" || { log "/health does not report the TensorRT backend"; exit 1; }
if ! grep -Eq '"denoise_loop": ?"device"' "$WORK/health.json"; then
  grep -i "step kernel" "$WORK/serve-tensorrt.log" >&2 || true
  [ "${SMOKE_ALLOW_HOST_LOOP:-0}" = 1 ] || { log "the denoising loop is not on the device (NVRTC missing? SMOKE_ALLOW_HOST_LOOP=1 to accept)"; exit 1; }
fi

"$PY" - "$PORT" "$MAX_MEAN" <<'PY'
import base64, io, json, sys, urllib.request
import numpy as np
from PIL import Image

port, max_mean = int(sys.argv[1]), float(sys.argv[2])
img = Image.fromarray((np.indices((96, 128)).sum(0) % 256).astype(np.uint8)).convert("RGB")
buf = io.BytesIO(); img.save(buf, format="PNG")
body = {"input": {"prompt": "make it blue", "image_base64": base64.b64encode(buf.getvalue()).decode(),
                  "num_inference_steps": 4, "seed": 7}}

def run(p):
    req = urllib.request.Request(f"http://127.0.0.1:{p}/run", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["image"]))).convert("RGB"), dtype=np.float64)

gpu, cpu = run(port), run(port + 1)
assert gpu.shape == cpu.shape, (gpu.shape, cpu.shape)
d = np.abs(gpu - cpu)
print(f"[gpu-smoke] TensorRT vs ONNX Runtime: mean |diff| {d.mean():.3f}, max {d.max():.0f} (8-bit levels)", file=sys.stderr)
assert d.mean() <= max_mean, f"mean difference {d.mean():.3f} > {max_mean}"
PY
log "OK"
