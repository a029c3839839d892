"""Baseline for benches/server_overhead.rs: the same per-request CPU steps as the Python server did
them (json, base64, Pillow, transformers' Qwen2-VL image processor with the torchvision backend as
diffusers' pipeline loads it, diffusers' VaeImageProcessor).

Run from the repo root: `.venv/bin/python benches/server_overhead_baseline.py` (single-threaded
torch, like one request). Prints a markdown table of median milliseconds per stage and writes them to
target/bench-tables/server_overhead_baseline.json for benches/report.py.
"""

import base64
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

torch.set_num_threads(1)
PROMPT = "Change the sky to a sunset, keep everything else"


def picture():
    """The same kind of photo-like 1024x1024 test picture as the Rust bench (smooth shapes + noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1024, 0:1024].astype(np.float32) / 1024.0
    r = 128 + 100 * np.sin(x * 9) * np.cos(y * 5)
    g = 120 + 90 * np.sin((x + y) * 7)
    b = 110 + 80 * np.cos(y * 11)
    noise = rng.integers(-12, 12, size=(1024, 1024, 1))
    arr = np.clip(np.stack([r, g, b], -1) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def timeit(fn, repeat=20):
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def main():
    img = picture()
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    b64 = base64.b64encode(jpeg).decode()
    body = json.dumps({"input": {"prompt": PROMPT, "image_base64": b64, "num_inference_steps": 8, "seed": 42}}).encode()
    vl = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)  # Qwen-Image-Edit preprocessor_config
    vae = VaeImageProcessor(vae_scale_factor=16)
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
    png_buf = io.BytesIO()
    decoded.save(png_buf, "PNG")
    png = png_buf.getvalue()

    def png_encode():
        out = io.BytesIO()
        decoded.save(out, "PNG")
        return out.getvalue()

    def response():
        return json.dumps(
            {
                "image": base64.b64encode(png).decode(),
                "prompt": PROMPT,
                "num_inference_steps": 8,
                "lightning_enabled": True,
                "seed": 42,
                "width": 1024,
                "height": 1024,
            }
        ).encode()

    def whole():
        params = json.loads(body)["input"]
        im = Image.open(io.BytesIO(base64.b64decode(params["image_base64"]))).convert("RGB")
        vl(images=[im], return_tensors="pt")
        vae.preprocess(im, 1024, 1024).to(torch.float16)
        out = io.BytesIO()
        im.save(out, "PNG")
        return json.dumps({"image": base64.b64encode(out.getvalue()).decode(), "prompt": params["prompt"]})

    rows = [
        ("parse_request_json", lambda: json.loads(body)),
        ("base64_decode", lambda: base64.b64decode(b64)),
        ("jpeg_decode", lambda: Image.open(io.BytesIO(jpeg)).convert("RGB")),
        ("vl_preprocess_resize_normalize_patchify", lambda: vl(images=[decoded], return_tensors="pt")),
        ("vae_normalize_f16", lambda: vae.preprocess(decoded, 1024, 1024).to(torch.float16)),
        ("resize_lanczos_to_384_edit_plus", lambda: decoded.resize((384, 384), Image.LANCZOS)),
        ("png_encode", png_encode),
        ("base64_encode", lambda: base64.b64encode(png)),
        ("response_json", response),
        ("total_without_model", whole),
    ]
    print(f"JPEG {len(jpeg)} bytes, body {len(body)} bytes, PNG {len(png)} bytes")
    print("| stage | Python ms (median) |")
    print("| --- | ---: |")
    medians = {}
    for name, fn in rows:
        medians[name] = timeit(fn)
        print(f"| {name} | {medians[name]:.2f} |")
    out = Path(__file__).resolve().parents[1] / "target/bench-tables"
    out.mkdir(parents=True, exist_ok=True)
    (out / "server_overhead_baseline.json").write_text(json.dumps(medians, indent=1))


if __name__ == "__main__":
    main()
