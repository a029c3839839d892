"""Goldens of torch's uint8 antialiased bicubic resize (torchvision `resize`, the Qwen2-VL image
processor's torchvision backend) for tests/torch_resize.rs: source PNGs and sha256 of each output.

    .venv/bin/python -m export.goldens.torch_resize
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

OUT = Path(__file__).resolve().parents[2] / "tests/golden/torch_resize"
SOURCES = {
    "a": (37, 23),
    "b": (64, 64),
    "c": (100, 61),
    "d": (7, 300),
    "e": (160, 96),
    "f": (128, 128),
    "g": (203, 157),
}
TARGETS = [
    (1, 1),
    (1, 9),
    (9, 1),
    (5, 3),
    (28, 28),
    (56, 28),
    (84, 168),
    (140, 140),
    (168, 84),
    (33, 200),
    (250, 17),
    (300, 300),
    (64, 64),
    (100, 61),
    (19, 47),
]


def source(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    img = np.concatenate([255 * x + 0 * y, 255 * y + 0 * x, 128 + 127 * np.sin(9 * x + 5 * y)], axis=2)
    img += rng.normal(0, 25, (h, w, 3))
    img[h // 3 : h // 2, :, :] = 255  # hard edges
    img[:, w // 4 : w // 4 + max(1, w // 10), 1] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def main() -> None:
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"), "goldens are made on x86 AVX2"
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (name, (w, h)) in enumerate(sorted(SOURCES.items())):
        arr = source(w, h, i)
        Image.fromarray(arr).save(OUT / f"{name}.png")
        t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        for tw, th in TARGETS:
            try:
                out = tvF.resize(t, [th, tw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
            except RuntimeError:
                # torch 2.15's AVX kernel asserts on some degenerate shapes (a 1-pixel side):
                # nothing to compare with (smart_resize never asks for less than 28 pixels).
                continue
            direct = torch.nn.functional.interpolate(
                t[None], size=(th, tw), mode="bicubic", antialias=True, align_corners=False
            )[0]
            assert torch.equal(out, direct), "torchvision and interpolate differ"
            hwc = out.permute(1, 2, 0).contiguous().numpy()
            cases.append(
                {"source": name, "width": tw, "height": th, "sha256": hashlib.sha256(hwc.tobytes()).hexdigest()}
            )
    (OUT / "cases.json").write_text(json.dumps({"torch": torch.__version__, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
