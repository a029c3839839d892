"""FP8 against float32 on ONNX Runtime CPU: the tiny FP8 bundle (engines/tiny-fp8) and its fp32 twin
(engines/tiny) edit every reference case of engines/tiny with the same seeds through `qwen-edit edit`;
the table gives PSNR and the largest error per output image (8-bit), with the fp32 bundle's own distance
to diffusers' reference image for scale. A second table measures how the FP8 graph amplifies rounding
noise upstream of its quantizers (what separates a TensorRT engine from ONNX Runtime): the ground of the
FP8 tolerance of `qwen-edit build`.

    source .deps/env && .venv/bin/python benches/fp8_quality.py [--binary target/release/qwen-edit]

Writes target/bench-tables/fp8_quality.md and fp8_tolerance.md (benches/report.py puts them in docs/fp8.md).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benches"))
from report import machine  # noqa: E402 (after the sys.path lines that make it importable)

FP32, FP8 = ROOT / "engines/tiny", ROOT / "engines/tiny-fp8"
TABLES = ROOT / "target/bench-tables"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def edit(binary: Path, bundle: Path, case: dict, out_dir: Path) -> list[np.ndarray]:
    """The case's jobs as one `qwen-edit edit` batch; returns each job's image (HWC uint8)."""
    from PIL import Image

    images = FP32 / "reference/images"
    cmd = [str(binary), "edit", "--bundle", str(bundle), "--backend", "ort", "--steps", str(case["steps"])]
    for img, prompt, seed in zip(case["images"], case["prompts"], case["seeds"], strict=True):
        cmd += ["--image", str(images / img), "--prompt", prompt, "--seed", str(seed)]
    if case["negative_prompt"] is not None:
        cmd += ["--negative-prompt", case["negative_prompt"]]
    cmd += ["--true-cfg-scale", str(case["true_cfg_scale"])]
    if case["lightning"]:
        cmd.append("--lightning")
    for key in ("width", "height"):
        if case[key] is not None:
            cmd += [f"--{key}", str(case[key])]
    out = out_dir / f"{bundle.name}_{case['name']}.png"
    cmd += ["--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    n = len(case["prompts"])
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}.png") for i in range(n)]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def quality_table(binary: Path) -> str:
    from safetensors.numpy import load_file

    rows = [
        "| case | job | size | steps | true CFG | PSNR FP8 vs fp32 (dB) | largest error (of 255) | mean error "
        "| fp32 vs diffusers: largest error |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    worst = math.inf
    with tempfile.TemporaryDirectory() as tmp:
        for meta in sorted((FP32 / "reference").glob("*.json")):
            case = json.loads(meta.read_text())
            ref = load_file(str(meta.with_suffix(".safetensors")))["image"]
            a, b = edit(binary, FP32, case, Path(tmp)), edit(binary, FP8, case, Path(tmp))
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                p = psnr(x, y)
                worst = min(worst, p)
                d = np.abs(x.astype(int) - y.astype(int))
                parity = int(np.abs(x.astype(int) - ref[i].astype(int)).max())
                cfg = f"{case['true_cfg_scale']:g}" if case["true_cfg"] else "no"
                label = case["name"] + (" (Lightning)" if case["lightning"] else "")
                rows.append(
                    f"| {label} | {i} | {x.shape[1]}x{x.shape[0]} | {case['steps']} | {cfg} | {p:.1f} | {d.max()} "
                    f"| {d.mean():.2f} | {parity} |"
                )
    return "\n".join(rows) + f"\n\nWorst PSNR: {worst:.1f} dB."


def _feeds(names_shapes, rng):
    feeds = {}
    for name, dtype, shape in names_shapes:
        if dtype == "int64":
            feeds[name] = np.ones(shape, np.int64)
        elif name == "timestep":
            feeds[name] = rng.random(shape).astype(np.float32)
        elif name.endswith(("_cos", "_sin")):
            a = rng.random(shape) * 2 * np.pi
            feeds[name] = (np.cos(a) if name.endswith("_cos") else np.sin(a)).astype(np.float32)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def tolerance_table(trials: int = 8) -> str:
    """Both transformers on `qwen-edit build`'s kind of random inputs (N(0,1) states, random RoPE angles,
    masks 1), once as given and once with every float input perturbed by a relative error of 2^-11 (TF32's
    rounding) or 2^-8 (bf16's): how far the output moves, element-wise, against the build's tolerances."""
    from export import onnx_export as ox

    sizes = {"batch": 2, "img_seq": 128, "txt_seq": 32}
    rows = [
        "| graph | input perturbation | max abs change | max rel change (where the output exceeds 0.1) "
        "| elements beyond fp32's atol=rtol=1e-2 | beyond fp8's atol=rtol=1e-1 |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for bundle in (FP32, FP8):
        ins, _ = ox.io_contract(bundle / "transformer.onnx")
        spec = [(i["name"], i["dtype"], [sizes.get(d, d) for d in i["shape"]]) for i in ins]
        for label, eps in (("TF32 (2^-11)", 2.0**-11), ("bf16 (2^-8)", 2.0**-8)):
            max_abs = max_rel = 0.0
            beyond_fp32 = beyond_fp8 = total = 0
            for t in range(trials):
                rng = np.random.default_rng(t)
                feeds = _feeds(spec, rng)
                noisy = {
                    k: (v * (1 + eps * rng.uniform(-1, 1, v.shape))).astype(np.float32) if v.dtype == np.float32 else v
                    for k, v in feeds.items()
                }
                a = ox.run_ort(bundle / "transformer.onnx", feeds)[0].astype(np.float64)
                b = ox.run_ort(bundle / "transformer.onnx", noisy)[0].astype(np.float64)
                d = np.abs(a - b)
                max_abs = max(max_abs, float(d.max()))
                big = np.abs(a) > 0.1
                max_rel = max(max_rel, float((d[big] / np.abs(a[big])).max()))
                beyond_fp32 += int((d > 1e-2 + 1e-2 * np.abs(a)).sum())
                beyond_fp8 += int((d > 1e-1 + 1e-1 * np.abs(a)).sum())
                total += d.size
            rows.append(
                f"| {bundle.name} | {label} | {max_abs:.2e} | {max_rel:.2e} | {beyond_fp32} of {total} "
                f"| {beyond_fp8} of {total} |"
            )
    return "\n".join(rows) + f"\n\nInputs: batch 2, 128 image and 32 text tokens, {trials} draws per row."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", type=Path, help="qwen-edit binary (default: build target/release/qwen-edit)")
    args = ap.parse_args()
    binary = args.binary
    if binary is None:
        subprocess.run(["cargo", "build", "--release", "--bin", "qwen-edit"], cwd=ROOT, check=True)
        binary = ROOT / "target/release/qwen-edit"
    from export.__main__ import _quiet

    _quiet()
    quality = (
        "`qwen-edit edit --backend ort` with engines/tiny-fp8 against engines/tiny, every reference case of "
        "engines/tiny, same seeds; images compared per 8-bit channel value.\n\n" + quality_table(binary)
    )
    tolerance = tolerance_table()
    print(f"{machine()}\n\n{quality}\n\n{tolerance}")
    TABLES.mkdir(parents=True, exist_ok=True)
    (TABLES / "fp8_quality.md").write_text(quality + "\n")
    (TABLES / "fp8_tolerance.md").write_text(tolerance + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
