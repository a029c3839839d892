"""Times one edit at 256x256 with 4 steps on the tiny model: diffusers' QwenImageEditPipeline (torch,
CPU) against `qwen-edit` (ONNX Runtime, CPU; criterion bench `pipeline`, `edit/256x256_4steps`),
in the same run, and prints a Markdown table with the machine it ran on.

    source .deps/env && .venv/bin/python benches/edit_vs_diffusers.py
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benches"))
from report import machine  # noqa: E402 (after the sys.path lines that make it importable)

RUNS = 15


def time_diffusers() -> list[float]:
    import torch
    from PIL import Image

    from export.__main__ import _quiet
    from export.reference import patched_areas
    from export.tiny import TINY_VAE_AREA
    from export.variants import VARIANTS

    _quiet()
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline.from_pretrained(str(ROOT / "engines/tiny-checkpoints/edit"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = (
        Image.open(ROOT / "engines/tiny/reference/images/square.png").convert("RGB").resize((256, 256), Image.LANCZOS)
    )
    times = []
    with patched_areas(VARIANTS["edit"], TINY_VAE_AREA, None), torch.no_grad():
        for i in range(RUNS + 2):
            t = time.perf_counter()
            pipe(
                image=image,
                prompt="make the sky blue, variant 1",
                num_inference_steps=4,
                width=256,
                height=256,
                generator=torch.Generator().manual_seed(1),
                output_type="pil",
            )
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - t)
    return times


def time_qwen_edit() -> float:
    env = dict(os.environ)
    cmd = ["cargo", "bench", "--bench", "pipeline", "--", "edit/256x256_4steps", "--noplot"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    est = json.loads((ROOT / "target/criterion/edit/256x256_4steps/new/estimates.json").read_text())
    return est["median"]["point_estimate"] / 1e9


def main() -> int:
    import diffusers
    import onnxruntime
    import torch

    rust = time_qwen_edit()
    py = statistics.median(time_diffusers())
    table = (
        "\n".join(
            [
                "Edit at 256x256, 4 steps, tiny model, CPU, same machine, same run "
                f"(diffusers: median of {RUNS} runs after 2 warm-ups; qwen-edit: criterion median).\n",
                "| implementation | median per edit (ms) | speed-up |",
                "| --- | ---: | ---: |",
                f"| diffusers {diffusers.__version__} QwenImageEditPipeline (torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads) | {py * 1e3:.1f} | 1.0x |",
                f"| qwen-edit (ONNX Runtime {onnxruntime.__version__}, CPU) | {rust * 1e3:.1f} | {py / rust:.1f}x |",
            ]
        )
        + "\n"
    )
    print(f"{datetime.date.today().isoformat()}, {machine()}\n")
    print(table)
    out = ROOT / "target/bench-tables"
    out.mkdir(parents=True, exist_ok=True)
    (out / "edit_vs_diffusers.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
