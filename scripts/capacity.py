#!/usr/bin/env python3
"""Capacity arithmetic for Qwen-Image-Edit on GPUs: weight memory, FLOPs and bytes of one transformer
forward, and a roofline projection of its time. Computed from the model config and published GPU specs:
a PROJECTION, never a measurement (no machine of this project has a GPU).

Built to be extended (more components, resolutions, GPUs):
- `transformer_layers(cfg)`: every linear layer of diffusers' QwenImageTransformer2DModel from its config
  (checked against diffusers by export/tests/test_capacity.py), with the token stream it runs on;
- `precision_of(layer, recipe)`: the FP8 placement of `python -m export bundle --precision fp8`;
- `transformer_step(cfg, shape, recipe)`: FLOPs and bytes of one forward, per kind of work;
- `GPUS`: published specs with their sources; `roofline(work, gpu)`: per-op max(FLOPs / peak, bytes / bandwidth).

    python3 scripts/capacity.py                # the FP8-vs-bf16 table of docs/fp8.md (H100 SXM)
    python3 scripts/capacity.py --gpu all      # every GPU of the table
    python3 scripts/capacity.py --out FILE     # also write the table (scripts/bench.sh does)

Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Qwen/Qwen-Image-Edit-2509 (and 2511) transformer/config.json; diffusers' defaults are the same values.
QWEN_IMAGE_EDIT_2509 = {
    "num_layers": 60,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "joint_attention_dim": 3584,
    "in_channels": 64,
    "out_channels": 16,
    "patch_size": 2,
}
TIMESTEP_CHANNELS = 256  # QwenTimestepProjEmbeddings: Timesteps(num_channels=256) -> TimestepEmbedding
MLP_RATIO = 4  # FeedForward(dim, dim_out, activation_fn="gelu-approximate"): inner dim 4 x dim
VAE_SCALE = 8

# The FP8 recipe of export/fp8.py (FP8_LAYERS): these linear layers of every block compute in FP8.
FP8_BLOCK_LAYERS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp8_tflops: float | None  # dense; None: no FP8 tensor cores (compute capability < 8.9)
    bandwidth_tbs: float  # memory bandwidth, TB/s
    memory_gb: float
    source: str


# Dense (not 2:4-sparse) peaks: NVIDIA's datasheets print the sparse figure, twice these.
GPUS = {
    "h100-sxm": Gpu(
        "H100 SXM 80GB",
        989.4,
        1978.9,
        3.35,
        80,
        "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): BF16 1,979 and FP8 3,958 "
        "TFLOPS with sparsity (dense: half), 3.35 TB/s HBM3, 80 GB",
    ),
    "h200-sxm": Gpu(
        "H200 SXM 141GB",
        989.4,
        1978.9,
        4.8,
        141,
        "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200): H100 compute, 4.8 TB/s HBM3e, "
        "141 GB",
    ),
    "l40s": Gpu(
        "L40S 48GB",
        362.05,
        733.0,
        0.864,
        48,
        "NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): BF16 733 and FP8 1,466 TFLOPS with sparsity, "
        "864 GB/s GDDR6, 48 GB",
    ),
    "a100-sxm": Gpu(
        "A100 SXM 80GB",
        312.0,
        None,
        2.039,
        80,
        "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100): BF16 312 TFLOPS dense, "
        "2,039 GB/s HBM2e, 80 GB; no FP8 (Ampere, compute capability 8.0)",
    ),
}


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    name: str  # module name in QwenImageTransformer2DModel
    in_features: int
    out_features: int
    stream: str  # rows it runs on: "img" (image tokens), "txt" (text tokens), "temb" (one row per sample)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + self.out_features  # every linear has a bias


def transformer_layers(cfg: dict) -> list[Linear]:
    """Every nn.Linear of QwenImageTransformer2DModel(**cfg), in module order."""
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out = cfg["patch_size"] ** 2 * cfg["out_channels"]
    layers = [
        Linear("time_text_embed.timestep_embedder.linear_1", TIMESTEP_CHANNELS, inner, "temb"),
        Linear("time_text_embed.timestep_embedder.linear_2", inner, inner, "temb"),
        Linear("img_in", cfg["in_channels"], inner, "img"),
        Linear("txt_in", cfg["joint_attention_dim"], inner, "txt"),
    ]
    for b in range(cfg["num_layers"]):
        p = f"transformer_blocks.{b}."
        layers += [
            Linear(p + "img_mod.1", inner, 6 * inner, "temb"),
            *(Linear(p + f"attn.{n}", inner, inner, "img") for n in ("to_q", "to_k", "to_v")),
            *(Linear(p + f"attn.{n}", inner, inner, "txt") for n in ("add_k_proj", "add_v_proj", "add_q_proj")),
            Linear(p + "attn.to_out.0", inner, inner, "img"),
            Linear(p + "attn.to_add_out", inner, inner, "txt"),
            Linear(p + "img_mlp.net.0.proj", inner, MLP_RATIO * inner, "img"),
            Linear(p + "img_mlp.net.2", MLP_RATIO * inner, inner, "img"),
            Linear(p + "txt_mod.1", inner, 6 * inner, "temb"),
            Linear(p + "txt_mlp.net.0.proj", inner, MLP_RATIO * inner, "txt"),
            Linear(p + "txt_mlp.net.2", MLP_RATIO * inner, inner, "txt"),
        ]
    layers += [Linear("norm_out.linear", inner, 2 * inner, "temb"), Linear("proj_out", inner, out, "img")]
    return layers


@dataclass(frozen=True)
class Recipe:
    name: str
    fp8: bool  # the FP8 layers of FP8_BLOCK_LAYERS compute in FP8
    keep: tuple[str, ...] = ()  # per-block names kept in bf16 anyway (`--fp8-keep`)


BF16 = Recipe("bf16", fp8=False)
FP8 = Recipe("fp8", fp8=True)
FP8_KEEP_IMG_MLP = Recipe("fp8, img_mlp kept", fp8=True, keep=("img_mlp",))


def precision_of(layer: Linear, recipe: Recipe) -> str:
    """`fp8` or `bf16` for one layer under `recipe` (export/fp8.py's placement)."""
    if not recipe.fp8 or not layer.name.startswith("transformer_blocks."):
        return "bf16"
    kind = layer.name.split(".", 2)[2]
    if kind in FP8_BLOCK_LAYERS and not any(kind == k or kind.startswith(k + ".") for k in recipe.keep):
        return "fp8"
    return "bf16"


def weight_bytes(layers: list[Linear], recipe: Recipe) -> float:
    """Weights as the engine stores them: FP8 layers 1 byte per weight plus a bf16 scale and an FP8 zero
    point per output channel; everything else (and every bias) bf16."""
    total = 0.0
    for ly in layers:
        if precision_of(ly, recipe) == "fp8":
            total += ly.in_features * ly.out_features + ly.out_features * (2 + 1) + ly.out_features * 2
        else:
            total += ly.params * 2
    return total


@dataclass(frozen=True)
class Shape:
    """One transformer forward: output size, condition images (Edit Plus may have several), text tokens, batch."""

    width: int
    height: int
    condition_images: int = 1
    txt_tokens: int = 256  # prompt + VL image tokens after the dropped system prompt, padded to a 64 bucket
    batch: int = 1  # 2 when true CFG runs (cond and uncond in one batch)

    @property
    def img_tokens(self) -> int:
        per_image = (self.height // (VAE_SCALE * 2)) * (self.width // (VAE_SCALE * 2))
        return per_image * (1 + self.condition_images)


@dataclass
class Work:
    """FLOPs and bytes of one forward, per kind of op (`gemm_fp8`, `gemm_bf16`, `attention`, `elementwise`)."""

    flops: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)
    ops: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, flops, bytes) per op

    def add(self, kind: str, flops: float, nbytes: float) -> None:
        self.flops[kind] = self.flops.get(kind, 0.0) + flops
        self.bytes[kind] = self.bytes.get(kind, 0.0) + nbytes
        self.ops.append((kind, flops, nbytes))


# Memory passes over a [rows, inner] bf16 tensor per block and stream outside GEMMs and attention: the two
# LayerNorms and modulations, RoPE on q and k, per-head RMSNorm on q and k, the two gated residual adds
# (each pass a read or a write). An unfused upper bound: TensorRT fuses many into GEMM epilogues.
ELEMENTWISE_PASSES = 24
GELU_PASSES = 2  # read and write of the MLP hidden [rows, 4 * inner]


def transformer_step(cfg: dict, shape: Shape, recipe: Recipe) -> Work:
    """FLOPs and bytes of one transformer forward at `shape` under `recipe`. GEMMs: 2 x rows x in x out
    FLOPs; bytes = weights + input (1 byte per value into an FP8 GEMM, else 2) + bf16 output. Attention:
    one fused (flash) kernel per block, bf16, 4 x batch x S^2 x inner FLOPs, reading q, k, v and writing
    the output once."""
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    rows = {"img": shape.batch * shape.img_tokens, "txt": shape.batch * shape.txt_tokens, "temb": shape.batch}
    w = Work()
    for ly in transformer_layers(cfg):
        r = rows[ly.stream]
        fp8 = precision_of(ly, recipe) == "fp8"
        weights = weight_bytes([ly], recipe)
        act = r * ly.in_features * (1 if fp8 else 2) + r * ly.out_features * 2
        w.add("gemm_fp8" if fp8 else "gemm_bf16", 2.0 * r * ly.in_features * ly.out_features, weights + act)
    seq = shape.img_tokens + shape.txt_tokens
    for _ in range(cfg["num_layers"]):
        w.add("attention", 4.0 * shape.batch * seq * seq * inner, 4.0 * shape.batch * seq * inner * 2)
        for stream in ("img", "txt"):
            passes = ELEMENTWISE_PASSES * rows[stream] * inner + GELU_PASSES * rows[stream] * MLP_RATIO * inner
            w.add("elementwise", 0.0, 2.0 * passes)
    return w


def activation_bytes(cfg: dict, shape: Shape) -> float:
    """Estimated peak activation memory of one forward (bf16, fused attention): inside a block, the image
    and text hidden states, q, k, v, the attention output and the MLP hidden are live at once."""
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    seq = shape.img_tokens + shape.txt_tokens
    return 2.0 * shape.batch * (seq * inner * (2 + 3 + 1) + shape.img_tokens * MLP_RATIO * inner)


def roofline(work: Work, gpu: Gpu) -> dict[str, float]:
    """Seconds per kind of op: each op takes max(FLOPs / peak, bytes / bandwidth) (FP8 GEMMs at the FP8 peak)."""
    out: dict[str, float] = {}
    for kind, flops, nbytes in work.ops:
        peak = gpu.fp8_tflops if kind == "gemm_fp8" else gpu.bf16_tflops
        if peak is None:
            raise ValueError(f"{gpu.name} has no FP8 tensor cores")
        t = max(flops / (peak * 1e12), nbytes / (gpu.bandwidth_tbs * 1e12))
        out[kind] = out.get(kind, 0.0) + t
    return out


# ----------------------------------------------------------------------------------------------
# The table of docs/fp8.md
# ----------------------------------------------------------------------------------------------


def fp8_table(gpu: Gpu, cfg: dict = QWEN_IMAGE_EDIT_2509, side: int = 1024) -> str:
    """FP8 next to bf16 for the transformer at side x side (one condition image), batch 1 and 2 (true CFG)."""
    layers = transformer_layers(cfg)
    params = sum(ly.params for ly in layers)
    recipes = [BF16, FP8, FP8_KEEP_IMG_MLP] if gpu.fp8_tflops else [BF16]
    lines = [
        f"**Projection, not a measurement** ({gpu.name}; {gpu.source}). Transformer of Qwen-Image-Edit-2509 "
        f"({cfg['num_layers']} blocks, {cfg['num_attention_heads']} heads of {cfg['attention_head_dim']}, joint dim "
        f"{cfg['joint_attention_dim']}: {params / 1e9:.2f} B parameters), one {side}x{side} edit with one input image: "
        f"{Shape(side, side).img_tokens} image tokens (target + condition) and {Shape(side, side).txt_tokens} text "
        "tokens. Step time = sum over ops of max(FLOPs / dense peak, bytes / bandwidth): the roofline floor, which "
        "real kernels do not reach; elementwise work is an unfused upper bound.",
        "",
        "| transformer | FP8 share of weights | weights GB | activations GB (batch 2) | ms/step batch 1 "
        "| ms/step batch 2 (true CFG) | GEMM / attention / elementwise ms (batch 2) | 40-step CFG edit s "
        "| 8-step Lightning edit s | vs bf16 (batch 2) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    base = None
    for recipe in recipes:
        fp8_params = sum(ly.in_features * ly.out_features for ly in layers if precision_of(ly, recipe) == "fp8")
        t1 = roofline(transformer_step(cfg, Shape(side, side, batch=1), recipe), gpu)
        t2 = roofline(transformer_step(cfg, Shape(side, side, batch=2), recipe), gpu)
        s1, s2 = sum(t1.values()), sum(t2.values())
        base = base or s2
        gemm = t2.get("gemm_fp8", 0.0) + t2.get("gemm_bf16", 0.0)
        lines.append(
            f"| {recipe.name} | {fp8_params / params:.0%} | {weight_bytes(layers, recipe) / 1e9:.1f} "
            f"| {activation_bytes(cfg, Shape(side, side, batch=2)) / 1e9:.1f} | {s1 * 1e3:.0f} | {s2 * 1e3:.0f} "
            f"| {gemm * 1e3:.0f} / {t2['attention'] * 1e3:.0f} / {t2['elementwise'] * 1e3:.0f} | {40 * s2:.1f} "
            f"| {8 * s1:.2f} | {base / s2:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h100-sxm", help=f"one of {', '.join(GPUS)}, or all")
    ap.add_argument("--side", type=int, default=1024, help="output width = height in pixels (default 1024)")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    names = list(GPUS) if args.gpu == "all" else [args.gpu]
    if any(n not in GPUS for n in names):
        print(f"unknown GPU {args.gpu!r}; choose one of {', '.join(GPUS)} or all", file=sys.stderr)
        return 2
    if args.side <= 0 or args.side % 16:
        print("--side must be a positive multiple of 16", file=sys.stderr)
        return 2
    text = "\n\n".join(fp8_table(GPUS[n], side=args.side) for n in names)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
