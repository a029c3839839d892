"""Golden vectors for the pure-math pieces of the edit algorithm (src/pipeline/{schedule,rope,latents,torch_cpu}.rs).

Everything comes from the reference's own code: diffusers' `FlowMatchEulerDiscreteScheduler` driven by the
edit pipelines' step 5 (`np.linspace` sigmas, `calculate_shift`, `retrieve_timesteps`, `timestep / 1000`) and
its `step`; `QwenEmbedRope` of `transformer_qwenimage.py`; the edit pipelines' `calculate_dimensions`,
`_pack_latents` / `_unpack_latents` and latent (de)normalisation; `torch.randn` with a seeded CPU generator.

torch's CPU kernels depend on the CPU capability it dispatches to: the randn Box-Muller block and the `pow`
inside the RoPE frequencies differ in the last bit between AVX2 and the `default` capability. The main
goldens come from this process, which must dispatch to AVX2 (it refuses otherwise; on an AVX-512 host set
ATEN_CPU_CAPABILITY=avx2); a child process run with ATEN_CPU_CAPABILITY=default produces the `scalar`
kernel goldens (by reading torch's sources, also what its AVX-512 build computes for these two kernels).

Run from the repo root: `.venv/bin/python -m export.goldens.math`. Deterministic; writes
tests/golden/math/{schedule,rope,dimensions,pack,randn,euler,normalize}.json, randn_medium.npy and euler_*.npy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "math"

# Scheduler configs: the real Qwen-Image(-Edit) scheduler_config.json and Qwen-Image-Lightning's.
REAL = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
LIGHTNING = dict(REAL, base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None)
# Branch coverage: linear time shift; static shift (no dynamic shifting) with a terminal stretch.
LINEAR = dict(REAL, time_shift_type="linear", base_shift=1.2, max_shift=3.5)
STATIC = dict(REAL, use_dynamic_shifting=False, shift=3.0, shift_terminal=0.1)

# Real Qwen-Image VAE latents_mean / latents_std (vae/config.json).
LATENTS_MEAN = [
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
]
LATENTS_STD = [
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.916,
]


def sha_f32(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a), dtype="<f4").tobytes()).hexdigest()


def f32_list(a) -> list:
    """float32 values as JSON numbers (repr of the widened double round-trips to the same float32); NaN as null."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(a, dtype=np.float32).reshape(-1)]


def write_json(name: str, obj) -> None:
    (OUT / name).write_text(json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ schedule


def schedule_case(config: dict, steps: int, image_seq_len: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    # Verbatim step 5 of QwenImageEditPipeline / QwenImageEditPlusPipeline.__call__.
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    # What the transformer receives: t.expand(batch).to(float32) / 1000.
    model_t = torch.stack([t.expand(1).to(torch.float32) / 1000 for t in timesteps]).reshape(-1)
    return {
        "steps": steps,
        "image_seq_len": image_seq_len,
        "mu": mu,
        "sigmas": f32_list(scheduler.sigmas),
        "timesteps": f32_list(timesteps),
        "model_timesteps": f32_list(model_t),
    }


def schedule_goldens() -> None:
    cases = []
    configs = {"real": REAL, "lightning": LIGHTNING, "linear": LINEAR, "static": STATIC}
    for name, steps, n in [
        # N = 1 with shift_terminal: the reference's stretch divides 0 by 0 and yields a NaN sigma.
        ("real", 1, 4096),
        ("real", 2, 256),
        ("real", 3, 1024),
        ("real", 4, 4096),
        ("real", 8, 64),
        ("real", 8, 4096),
        ("real", 8, 16384),
        ("real", 20, 3600),
        ("real", 28, 6889),
        ("real", 50, 4096),
        ("real", 50, 8192),
        ("lightning", 1, 4096),
        ("lightning", 4, 4096),
        ("lightning", 8, 256),
        ("lightning", 8, 4096),
        ("linear", 8, 4096),
        ("linear", 30, 256),
        ("static", 1, 4096),
        ("static", 8, 4096),
    ]:
        case = schedule_case(configs[name], steps, n)
        case["config"] = name
        cases.append(case)
    write_json("schedule.json", {"configs": configs, "cases": cases})


def euler_goldens() -> None:
    """Three `scheduler.step` calls on seeded random data through a real 4-step schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift, retrieve_timesteps

    steps, seq = 3, 1024
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(REAL)
    mu = calculate_shift(seq, 256, 8192, 0.5, 0.9)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    gen = torch.Generator("cpu").manual_seed(1234)
    x = torch.randn((1, 4, 64), generator=gen) * 3
    velocities = torch.randn((steps, 1, 4, 64), generator=gen)
    scheduler.set_begin_index(0)
    outs = []
    cur = x
    for i, t in enumerate(timesteps):
        cur = scheduler.step(velocities[i], t, cur, return_dict=False)[0]
        outs.append(cur)
    np.save(OUT / "euler_x0.npy", x.numpy().astype("<f4"))
    np.save(OUT / "euler_velocity.npy", velocities.numpy().astype("<f4"))
    np.save(OUT / "euler_out.npy", torch.stack(outs).numpy().astype("<f4"))
    write_json("euler.json", {"steps": steps, "image_seq_len": seq, "sigmas": f32_list(scheduler.sigmas)})


# ------------------------------------------------------------------------------------------------ rope


def rope_goldens() -> dict:
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    cases = []
    for k, (images, txt) in enumerate(
        [
            ([(1, 64, 64), (1, 64, 64)], 300),  # v1, 1024x1024
            ([(1, 37, 53), (1, 37, 53)], 17),  # v1, odd sizes
            ([(1, 48, 80), (1, 40, 40), (1, 57, 35)], 512),  # Plus, target + two conditions
            ([(1, 3, 5)], 1),
            ([(1, 1, 1), (1, 2, 3)], 4),
            ([(2, 4, 6), (1, 5, 4)], 9),  # frame > 1 (never used by the edit pipelines, but defined)
            ([(1, 64, 64)], 4096 - 32),  # the longest text the 4096-entry table holds after a 64x64 image
        ]
    ):
        img, txt_f = rope([list(images)], device=torch.device("cpu"), max_txt_seq_len=txt)
        img_cos, img_sin = img.real.numpy(), img.imag.numpy()
        txt_cos, txt_sin = txt_f.real.numpy(), txt_f.imag.numpy()
        assert txt_cos.shape[0] == txt, "torch truncated the text table"
        n = img_cos.shape[0]
        # Full rows for two cases (readable values, max-error reports); checksums of every table for all.
        img_rows = sorted({0, n // 2, n - 1}) if k in (1, 2) else []
        txt_rows = sorted({0, txt - 1}) if k in (1, 2) else []
        cases.append(
            {
                "images": [list(s) for s in images],
                "txt_seq": txt,
                "img_seq": n,
                "sha256": {
                    "img_cos": sha_f32(img_cos),
                    "img_sin": sha_f32(img_sin),
                    "txt_cos": sha_f32(txt_cos),
                    "txt_sin": sha_f32(txt_sin),
                },
                "img_rows": {str(r): {"cos": f32_list(img_cos[r]), "sin": f32_list(img_sin[r])} for r in img_rows},
                "txt_rows": {str(r): {"cos": f32_list(txt_cos[r]), "sin": f32_list(txt_sin[r])} for r in txt_rows},
            }
        )
    inv_freq = [f32_list(1.0 / torch.pow(10000, torch.arange(0, d, 2).to(torch.float32).div(d))) for d in (16, 56, 56)]
    return {"cases": cases, "inv_freq": inv_freq}


# ------------------------------------------------------------------------------------------------ sizes, packing


def dimension_goldens() -> None:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as v1
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    rng = np.random.default_rng(7)
    sizes = [
        (1024, 1024),
        (1000, 1000),
        (1920, 1080),
        (1080, 1920),
        (4000, 3000),
        (3000, 4000),
        (512, 512),
        (1, 1),
        (1, 4000),
        (4000, 1),
        (33, 1000),
        (999, 1001),
        (1365, 768),
        (7, 3),
        (2048, 64),
        (64, 2048),
        (800, 600),
        (1536, 640),
        (123, 4567),
        (10000, 7),
    ]
    sizes += [(int(w), int(h)) for w, h in rng.integers(1, 6000, size=(25, 2))]
    areas = [1024 * 1024, 384 * 384, 512 * 512, 256 * 256, 64 * 64, 32 * 32, 1]
    calc = []
    for w, h in sizes:
        for area in areas:
            cw, ch, _ = v1.calculate_dimensions(area, w / h)
            cw2, ch2 = plus.calculate_dimensions(area, w / h)
            assert (cw, ch) == (cw2, ch2)
            calc.append([w, h, area, cw, ch])
    # Half-way cases of Python's round (banker's rounding): width/32 exactly k + 0.5.
    halves = []
    for k in range(1, 24):
        width = 32 * (k + 0.5)
        area_ratio = (width * width, 1.0)  # ratio 1: width = sqrt(area) exactly
        cw, ch, _ = v1.calculate_dimensions(area_ratio[0], area_ratio[1])
        halves.append([area_ratio[0], area_ratio[1], cw, ch])

    # The size logic of __call__ (v1: first image; Plus: last image for the output, every image for VAE/VL).
    v1_cases = []
    for w, h in sizes[:16] + [(1, 5000)]:
        for req in [(None, None), (1000, 700), (None, 520), (17, None)]:
            cw, ch, _ = v1.calculate_dimensions(1024 * 1024, w / h)
            height = req[1] or ch
            width = req[0] or cw
            m = 16
            width, height = width // m * m, height // m * m
            v1_cases.append(
                {
                    "image": [w, h],
                    "request": list(req),
                    "output": [width, height],
                    "vae": [cw, ch],
                    "vl": [cw, ch],
                    "degenerate": 0 in (width, height, cw, ch),
                    "img_shapes": [[1, height // 8 // 2, width // 8 // 2], [1, ch // 8 // 2, cw // 8 // 2]],
                }
            )
    plus_cases = []
    for k in range(16):
        idx = rng.integers(0, len(sizes), size=1 + k % 3)
        images = [sizes[i] for i in idx]
        req = [(None, None), (900, None)][k % 2]
        cw, ch = plus.calculate_dimensions(1024 * 1024, images[-1][0] / images[-1][1])
        height = req[1] or ch
        width = req[0] or cw
        width, height = width // 16 * 16, height // 16 * 16
        cond = [plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, w / h) for w, h in images]
        vae = [plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, w / h) for w, h in images]
        # A zero side (extreme aspect ratio) makes the reference's PIL resize fail: the Rust side refuses it.
        degenerate = 0 in [width, height] + [v for s in cond + vae for v in s]
        plus_cases.append(
            {
                "images": [list(s) for s in images],
                "request": list(req),
                "output": [width, height],
                "vae": [list(s) for s in vae],
                "condition": [list(s) for s in cond],
                "degenerate": degenerate,
                "img_shapes": [[1, height // 8 // 2, width // 8 // 2]]
                + [[1, vh // 8 // 2, vw // 8 // 2] for vw, vh in vae],
            }
        )
    write_json(
        "dimensions.json", {"calculate_dimensions": calc, "half_way": halves, "v1": v1_cases, "plus": plus_cases}
    )


def pack_goldens() -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline as P

    cases = []
    for b, c, h, w in [(1, 16, 4, 6), (2, 16, 2, 2), (1, 4, 6, 2)]:
        x = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, 1, c, h, w)  # randn_tensor's layout
        packed = P._pack_latents(x, b, c, h, w)
        # _unpack_latents takes pixel sizes: latent size * 8.
        unpacked = P._unpack_latents(packed, h * 8, w * 8, 8)
        assert torch.equal(unpacked.reshape(b, c, h, w), x.reshape(b, c, h, w))
        cases.append(
            {
                "shape": [b, c, h, w],
                "packed_shape": list(packed.shape),
                "packed": [int(v) for v in packed.reshape(-1).tolist()],
                "unpacked_shape": list(unpacked.shape),
            }
        )
    write_json("pack.json", {"cases": cases})


def normalize_goldens() -> None:
    """Encode-side `(z - mean) / std` and the decode side's `latents / (1 / std) + mean`, float32."""
    gen = torch.Generator("cpu").manual_seed(99)
    z = torch.randn((1, 16, 1, 2, 2), generator=gen) * 4
    mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1).to(z.device, z.dtype)
    normalized = (z - mean) / std
    inv_std = 1.0 / torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1).to(z.device, z.dtype)
    denormalized = z / inv_std + mean
    write_json(
        "normalize.json",
        {
            "mean": LATENTS_MEAN,
            "std": LATENTS_STD,
            "shape": [1, 16, 2, 2],
            "z": f32_list(z),
            "normalized": f32_list(normalized),
            "denormalized": f32_list(denormalized),
        },
    )


# ------------------------------------------------------------------------------------------------ randn

RANDN_SEEDS = [0, 42, 2**32 + 42, 2**63 + 7, -1, 987654321]
RANDN_SHAPES = [(1,), (5,), (15,), (16,), (17,), (33,), (1, 1, 16, 1, 3)]


def randn_cases() -> dict:
    """torch.randn for every (seed, shape): full values for small shapes, checksums for latent-sized ones."""
    small, big = [], []
    for seed in RANDN_SEEDS:
        for shape in RANDN_SHAPES:
            g = torch.Generator("cpu").manual_seed(seed)
            v = torch.randn(shape, generator=g, dtype=torch.float32)
            small.append({"seed": str(seed), "shape": list(shape), "values": f32_list(v)})
    for seed, shape in [(0, (1, 1, 16, 128, 128)), (42, (1, 1, 16, 104, 152)), (2**40 + 3, (1, 1, 16, 37, 53))]:
        g = torch.Generator("cpu").manual_seed(seed)
        v = torch.randn(shape, generator=g, dtype=torch.float32).numpy()
        flat = v.reshape(-1)
        big.append(
            {
                "seed": str(seed),
                "shape": list(shape),
                "sha256": sha_f32(v),
                "head": f32_list(flat[:20]),
                "tail": f32_list(flat[-20:]),
                "sum": float(flat.astype(np.float64).sum()),
            }
        )
    g = torch.Generator("cpu").manual_seed(2024)
    medium = torch.randn((1, 1, 16, 16, 16), generator=g, dtype=torch.float32).numpy()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "small": small,
        "big": big,
        "medium": {"seed": "2024", "shape": [1, 1, 16, 16, 16], "values": medium, "sha256": sha_f32(medium)},
    }


def scalar_goldens() -> dict:
    """The child process's randn cases and RoPE inverse frequencies (torch's `default` CPU capability)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    child = subprocess.run(
        [sys.executable, "-m", "export.goldens.math", "--scalar-child"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(child.stdout)


def randn_goldens(scalar: dict) -> None:
    main = randn_cases()
    np.save(OUT / "randn_medium.npy", main["medium"].pop("values").astype("<f4"))
    write_json("randn.json", {"avx2": main, "scalar": scalar})


def scalar_child() -> None:
    """Run under ATEN_CPU_CAPABILITY=default: randn and the RoPE inverse frequencies of the scalar kernels."""
    torch.set_num_threads(1)
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        raise SystemExit("the scalar child must run with ATEN_CPU_CAPABILITY=default")
    cases = randn_cases()
    del cases["medium"]["values"]
    # Checksums only: the scalar kernel is the secondary flavour.
    for case in cases["small"]:
        case["sha256"] = sha_f32(case.pop("values"))
    cases["rope_inv_freq"] = [
        f32_list(1.0 / torch.pow(10000, torch.arange(0, d, 2).to(torch.float32).div(d))) for d in (16, 56, 56)
    ]
    json.dump(cases, sys.stdout)


def main() -> None:
    if "--scalar-child" in sys.argv:
        scalar_child()
        return
    torch.set_num_threads(1)
    cap = torch.backends.cpu.get_cpu_capability()
    if cap != "AVX2":
        raise SystemExit(
            f"the main goldens are the AVX2 kernels' but torch dispatches to {cap}: "
            "run on an AVX2 host or set ATEN_CPU_CAPABILITY=avx2"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    schedule_goldens()
    euler_goldens()
    scalar = scalar_goldens()
    rope = rope_goldens()
    rope["inv_freq_scalar"] = scalar.pop("rope_inv_freq")
    write_json("rope.json", rope)
    dimension_goldens()
    pack_goldens()
    normalize_goldens()
    randn_goldens(scalar)


if __name__ == "__main__":
    main()
