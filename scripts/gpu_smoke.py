"""Client half of scripts/gpu-smoke.sh: sends what production sends to a TensorRT server and to an ONNX
Runtime server of the same bundle, compares the images, checks the TensorRT server's /metrics and prints a
short report fit to paste into an issue.

Requests: one with true CFG; four at once (a batch of four); one whose prompt falls in another text-length
bucket (a new graph shape: a capture), then a second of that bucket (a replay). It fails when the images
differ beyond --max-mean, when /metrics shows uncaptured runs or host-loop steps, or when no graph was
captured or replayed. `--cpu` checks the same against two ONNX Runtime servers (no GPU: the image, batch and
report checks only), which is how this script itself is tested on machines without a GPU.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import re
import subprocess
import sys
import urllib.request

import numpy as np
from PIL import Image

COUNTERS = (
    "graph_captures",
    "graph_replays",
    "uncaptured_runs",
    "graph_evictions",
    "capture_failures",
    "device_loop_steps",
    "host_loop_steps",
)


def picture(w: int, h: int, salt: int) -> str:
    y, x = np.indices((h, w))
    rgb = np.stack([(x * 255 // w), (y * 255 // h) ^ (salt * 40 % 256), (x + y + salt * 60) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
        return r.read().decode()


def run(port: int, body: dict) -> tuple[np.ndarray, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/run",
        data=json.dumps({"input": body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["image"]))).convert("RGB"), dtype=np.float64)
    return img, out.get("timings", {})


def counters(port: int) -> dict[str, float]:
    text = get(port, "/metrics")
    out = {}
    for name in COUNTERS:
        m = re.search(rf"^qwen_edit_{name}_total (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def requests() -> list[tuple[str, list[dict]]]:
    """(label, bodies sent at once) in order."""
    image = picture(128, 96, 1)
    base = {"image_base64": image, "num_inference_steps": 4}
    four = [
        dict(base, image_base64=picture(128, 96, k), prompt=p, seed=10 + k)
        for k, p in enumerate(["make it blue", "add a hat", "turn it to night", "paint it red"])
    ]
    long_prompt = "replace the sky with a dramatic sunset over mountains, keep every building, " * 3
    return [
        (
            "true CFG",
            [dict(base, prompt="add a red balloon", negative_prompt="blurry, low quality", true_cfg_scale=4.0, seed=7)],
        ),
        ("batch of 4", four),
        ("new text bucket", [dict(base, prompt=long_prompt, seed=3)]),
        ("same bucket again", [dict(base, prompt=long_prompt, seed=4)]),
    ]


def log_size(log_path: str | None) -> int:
    """Bytes in the server's log now (0 without one): where the smoke requests' own lines start."""
    try:
        return os.path.getsize(log_path) if log_path else 0
    except OSError:
        return 0


def stage_ms(log_path: str | None, start: int = 0) -> tuple[int, dict[str, float]]:
    """(batches, mean per-stage milliseconds) from the server's `batch stages` debug lines (text or JSON log)
    written after byte `start`: the smoke requests' batches, not the memory probe's batches at start-up."""
    if not log_path:
        return 0, {}
    sums: dict[str, list[float]] = {}
    batches = 0
    unit = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
    with open(log_path, "rb") as f:
        f.seek(start)
        for raw in f:
            line = raw.decode(errors="replace")
            if "batch stages" not in line:
                continue
            batches += 1
            for k, v, u in re.findall(r"\b(text|vae_encode|denoise|decode): ([0-9.]+)(ns|µs|us|ms|s)\b", line):
                sums.setdefault(k, []).append(float(v) * unit[u])
    return batches, {k: sum(v) / len(v) for k, v in sums.items()}


def device_memory() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a (nvidia-smi not available)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="the server under test (TensorRT)")
    ap.add_argument("--reference-port", type=int, required=True, help="the ONNX Runtime server of the same bundle")
    ap.add_argument("--bundle", default="?", help="bundle name for the report")
    ap.add_argument("--max-mean", type=float, default=2.0, help="mean |diff| in 8-bit levels")
    ap.add_argument("--log", help="the server's log, for the per-stage times")
    ap.add_argument("--cpu", action="store_true", help="both servers are ONNX Runtime: skip the GPU checks")
    a = ap.parse_args(argv)

    log_start = log_size(a.log)  # the lines before are the start-up's (the memory probe's batches among them)
    health = json.loads(get(a.port, "/health"))
    failures = []
    if not a.cpu and health.get("backend") != "tensorrt":
        failures.append(f"/health backend is {health.get('backend')!r}, not tensorrt")
    if not a.cpu and health.get("denoise_loop") != "device":
        failures.append(f"/health denoise_loop is {health.get('denoise_loop')!r}, not device")
    before = counters(a.port)
    rows = []
    for label, bodies in requests():
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(lambda b: run(a.port, b), bodies))
        want = [run(a.reference_port, b)[0] for b in bodies]
        for (img, timings), ref in zip(got, want, strict=True):
            d = np.abs(img - ref) if img.shape == ref.shape else None
            mean = float(d.mean()) if d is not None else float("inf")
            rows.append((label, timings.get("batch_size", "?"), timings.get("compute_ms", float("nan")), mean))
            if mean > a.max_mean:
                failures.append(f"{label}: mean |diff| {mean:.3f} > {a.max_mean} (shapes {img.shape} vs {ref.shape})")
        if label == "batch of 4" and max(t.get("batch_size", 0) for _, t in got) < 2:
            failures.append("the four concurrent requests did not batch (BATCH_SIZE / BATCH_TIMEOUT_MS?)")
    after = counters(a.port)
    delta = {k: after[k] - before[k] for k in COUNTERS}
    if not a.cpu:
        for bad in ("uncaptured_runs", "host_loop_steps", "capture_failures"):
            if delta[bad] > 0:
                failures.append(f"/metrics: {bad} grew by {delta[bad]:.0f} (expected 0)")
        for good in ("graph_captures", "graph_replays", "device_loop_steps"):
            if delta[good] <= 0:
                failures.append(f"/metrics: no {good}")

    batches, stages = stage_ms(a.log, log_start)
    print(f"### gpu-smoke: {a.bundle} ({'CPU dry run' if a.cpu else 'TensorRT'} vs ONNX Runtime)")
    print(
        f"- device: {device_memory() if not a.cpu else 'none (--cpu)'}; backend {health.get('backend')}, "
        f"denoise loop {health.get('denoise_loop')}"
    )
    print("- requests (label, batch, compute ms, mean |diff| vs ORT in 8-bit levels):")
    for label, batch, ms, mean in rows:
        print(f"  - {label}: batch {batch}, {ms:.1f} ms, {mean:.3f}")
    if stages:
        print(f"- mean per-stage ms of the {batches} batches: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print("- counters over the run: " + ", ".join(f"{k} {v:.0f}" for k, v in delta.items()))
    print(f"- result: {'FAIL' if failures else 'OK'}")
    for f in failures:
        print(f"  - {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
