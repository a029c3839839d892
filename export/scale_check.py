"""`python -m export scale-check`: the wide run of `make scale-check` (docs/real-scale.md). Runs `qwen-edit edit` on an
fp32 bundle of the scale model with ONNX Runtime (each case in its own process, timed, peak RSS from the kernel),
then diffusers' pipeline on the same checkpoint with the same seeds (export/reference.py's run_case: same noise,
same deviations), and compares the images.

The graphs do not depend on the working areas (every size is a dynamic dim): only the manifest's areas, profiles and
text budget do. The run bundle therefore shares the exported graphs (hard links) and carries the manifest the exporter
writes for `--vae-area SIDE*SIDE` (the same functions compute it), so a CPU can run the real widths at a smaller side.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bundle, reference
from . import manifest as manifest_contract
from .variants import detect_variant


@dataclass
class RunCase:
    name: str
    images: list[str]
    prompt: str
    seed: int
    steps: int = 2
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0


CASES = [
    RunCase("one_image", ["a.png"], "make the sky orange", 7),
    RunCase("one_image_cfg", ["a.png"], "make the sky orange", 7, negative_prompt="blurry", true_cfg_scale=4.0),
    RunCase("two_images", ["a.png", "b.png"], "put the hat from picture 2 on picture 1", 11),
]
IMAGES = {"a.png": ((640, 480), 21), "b.png": ((480, 560), 22)}


def _log(msg: str) -> None:
    import sys

    print(f"[scale-check] {msg}", file=sys.stderr, flush=True)


def run_bundle(src: Path, dst: Path, side: int) -> Path:
    """`dst`: the graphs of `src` (hard links) with the manifest of an export at `--vae-area side*side`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "manifest.json" and not (dst / f.name).exists():
            os.link(f, dst / f.name)
    m = json.loads((src / "manifest.json").read_text())
    variant = detect_variant_of_manifest(m)
    areas = bundle.Areas(side * side, m["vision"]["condition_area"])
    m["vae"]["image_area"] = areas.vae
    m["profiles"]["resolutions"] = bundle.profile_resolutions(areas.vae)
    m["prompt"]["max_text_tokens"] = m["profiles"]["max_text_tokens"] = bundle.max_text_tokens(variant, areas)
    m["name"] = dst.name
    manifest_contract.write(dst / "manifest.json", m)
    return dst


def detect_variant_of_manifest(m: dict):
    from .variants import VARIANTS

    if m["variant"] == "edit":
        return VARIANTS["edit"]
    return VARIANTS["edit-2511" if m["transformer"]["zero_cond_t"] else "edit-2509"]


def _edit(exe: Path, bundle_dir: Path, case: RunCase, images: Path, out: Path) -> dict:
    """One `qwen-edit edit` in its own process: wall time, peak RSS (getrusage of the child), stage times."""
    cmd = [
        str(exe),
        "edit",
        "--backend",
        "ort",
        "--bundle",
        str(bundle_dir),
        "--image",
        ",".join(str(images / i) for i in case.images),
        "--prompt",
        case.prompt,
        "--seed",
        str(case.seed),
        "--steps",
        str(case.steps),
        "--true-cfg-scale",
        str(case.true_cfg_scale),
        "--out",
        str(out),
    ]
    if case.negative_prompt:
        cmd += ["--negative-prompt", case.negative_prompt]
    t0 = time.time()
    with open(out.with_suffix(".log"), "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS in KiB)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        stderr = log.read()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"qwen-edit edit failed ({proc.returncode}): {stderr.strip()}")
    row = {"seconds": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}
    m = re.search(r"loaded .* in ([0-9.]+) s", stderr)
    row["load_s"] = float(m.group(1)) if m else None
    m = re.search(r"text encoder ([0-9.]+) s, vae encode ([0-9.]+) s, denoise ([0-9.]+) s, decode ([0-9.]+) s", stderr)
    if m:
        names = ("text_encoder_s", "vae_encode_s", "denoise_s", "decode_s")
        row.update(zip(names, map(float, m.groups()), strict=True))
    return row


def compare(ours: Path, ref: np.ndarray) -> dict:
    from PIL import Image

    a = np.asarray(Image.open(ours).convert("RGB")).astype(np.int16)
    b = ref.astype(np.int16)
    if a.shape != b.shape:
        return {"shape": [list(a.shape), list(b.shape)], "max_abs": None}
    d = np.abs(a - b)
    mse = float((d.astype(np.float64) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    return {
        "size": [a.shape[1], a.shape[0]],
        "max_abs": int(d.max()),
        "mean_abs": round(float(d.mean()), 4),
        "within_1": round(float((d <= 1).mean()), 5),
        "psnr_db": round(psnr, 1),
    }


def latent_motion(tensors: dict, steps: int) -> dict:
    """How much the transformer moves the latents (diffusers' run): the first velocity and the final latent's change,
    each relative to the starting noise (L2). Near 0 would mean the image is the decoded noise and the parity says
    little about the transformer and the text encoder."""
    noise = tensors["noise"]

    def rel(x) -> float:
        return round(float((x.norm() / noise.norm()).item()), 4)

    return {
        "velocity_step0": rel(tensors["step0.cond.sample"][:, : noise.shape[1]]),  # target tokens only
        "final_latent_change": rel(tensors[f"latents.{steps - 1}"] - noise),
    }


def check(checkpoint: Path, fp32_bundle: Path, out: Path, exe: Path, side: int, names: list[str] | None = None) -> dict:
    """Runs `names` in that order (default: every case of CASES), writing out/scale_check.json after each step."""
    import torch

    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names or [] if n not in by_name]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known: {list(by_name)}")
    cases = CASES if names is None else [by_name[n] for n in names]

    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    for name, (size, seed) in IMAGES.items():
        reference.make_image(images / name, size, seed)
    run_dir = run_bundle(fp32_bundle, out / f"bundle-{side}", side)
    results = {"side": side, "cases": {}}
    report = out / "scale_check.json"
    for case in cases:  # every Rust run first: the diffusers pipeline is not in memory meanwhile
        _log(f"qwen-edit edit: {case.name}")
        results["cases"][case.name] = {"qwen_edit": _edit(exe, run_dir, case, images, out / f"{case.name}.png")}
        _log(json.dumps(results["cases"][case.name]["qwen_edit"]))
        report.write_text(json.dumps(results, indent=2) + "\n")
    variant = detect_variant(checkpoint)
    areas = bundle.Areas(side * side, json.loads((run_dir / "manifest.json").read_text())["vision"]["condition_area"])
    t0 = time.time()
    pipe = bundle.load_pipeline(checkpoint, variant, torch.float32)
    results["diffusers_load_s"] = round(time.time() - t0, 1)
    for case in cases:
        _log(f"diffusers: {case.name}")
        rc = reference.Case(
            name=case.name,
            images=case.images,
            prompts=[case.prompt],
            seeds=[case.seed],
            steps=case.steps,
            negative_prompt=case.negative_prompt,
            true_cfg_scale=case.true_cfg_scale,
        )
        t0 = time.time()
        tensors, _ = reference.run_case(pipe, variant, rc, images, areas)
        row = results["cases"][case.name]
        row["diffusers_s"] = round(time.time() - t0, 1)
        row["parity"] = compare(out / f"{case.name}.png", tensors["image"][0].numpy())
        row["latent_motion"] = latent_motion(tensors, case.steps)
        row["diffusers_peak_rss_gb_so_far"] = round(bundle.peak_rss_gb(), 2)
        _log(json.dumps(row))
        report.write_text(json.dumps(results, indent=2) + "\n")
    results["peak_rss_gb_diffusers"] = round(bundle.peak_rss_gb(), 2)
    report.write_text(json.dumps(results, indent=2) + "\n")
    return results
