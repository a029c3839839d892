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
import math
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
    "rtx-4090": Gpu(
        "RTX 4090 24GB",
        165.2,
        330.3,
        1.008,
        24,
        "NVIDIA Ada GPU Architecture whitepaper (Appendix, GeForce RTX 4090): 165.2 BF16 and 330.3 FP8 dense "
        "tensor TFLOPS with FP32 accumulate, 1,008 GB/s GDDR6X, 24 GB",
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


# ----------------------------------------------------------------------------------------------
# The whole model (issue 13): text encoder and VAE traced on torch's meta device, the transformer as above
# ----------------------------------------------------------------------------------------------

# Qwen2.5-VL-7B-Instruct config.json (the edit checkpoints' text_encoder/): text and vision widths.
QWEN25_VL_7B_TEXT = {"hidden": 3584, "intermediate": 18944, "layers": 28, "heads": 28, "kv_heads": 4, "vocab": 152064}
QWEN25_VL_7B_VISION = {"depth": 32, "hidden": 1280, "intermediate": 3420, "heads": 16, "window": 112}
RESOLUTIONS = (512, 768, 1024, 1328)
CONDITION_AREA = 384 * 384  # Edit Plus: the VL image's pixel area (the VAE image is the output's)
PROMPT_TOKENS = 64 + 40  # the dropped system prompt + a typical instruction and template tokens
GEMM_OPS = ("mm", "bmm", "addmm", "convolution", "linear", "baddbmm")
ATTENTION_OPS = ("_scaled_dot_product", "_flash_attention", "_efficient_attention")
VIEW_OPS = (
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "detach",
    "alias",
    "split",
    "split_with_sizes",
    "unbind",
    "chunk",
    "as_strided",
    "unflatten",
    "flatten",
    "reshape",
    "narrow",
    "_reshape_alias",
    "lift_fresh",
    "empty",
    "zeros",
    "ones",
    "arange",
    "full",
    "empty_strided",
    "scalar_tensor",
    "randn",
    "rand",
)


def trace(fn) -> Work:
    """FLOPs (torch's flop counter formulas) and bytes (every tensor an op reads plus what it writes: an unfused
    upper bound) of `fn()` run on meta tensors; ops grouped as gemm_bf16 / attention / elementwise."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    registry = FlopCounterMode(display=False).flop_registry
    work = Work()

    def nbytes(x) -> float:
        if isinstance(x, torch.Tensor):
            return float(x.numel() * x.element_size())
        if isinstance(x, (list, tuple)):
            return sum(nbytes(y) for y in x)
        return 0.0

    class Tally(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func._overloadpacket.__name__
            if name in VIEW_OPS or name.endswith("_like"):
                return out
            flops = (
                registry[func._overloadpacket](*args, **kwargs, out_val=out) if func._overloadpacket in registry else 0
            )
            moved = nbytes(list(args)) + nbytes(list(kwargs.values())) + nbytes(out)
            kind = (
                "attention"
                if any(a in name for a in ATTENTION_OPS)
                else "gemm_bf16"
                if name in GEMM_OPS
                else "elementwise"
            )
            work.add(kind, float(flops), moved)
            return out

    with Tally(), torch.no_grad():
        fn()
    return work


def vl_patches(area: int) -> int:
    """Vision patches of one image of `area` pixels (square): smart_resize to a multiple of 28, patches of 14."""
    side = max(28, round(math.sqrt(area) / 28) * 28)
    return (side // 14) ** 2


def text_encoder_work(batch: int = 1, images: int = 1, depth: int | None = None, layers: int | None = None) -> Work:
    """One text_encoder graph forward (export/graphs.py TextEncoderGraph, the exported graph) at the real widths:
    `images` condition images at CONDITION_AREA and PROMPT_TOKENS of text per prompt, bf16."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from export import graphs, scale

    vis = dict(scale.REAL_VISION, depth=depth or scale.REAL_VISION["depth"])
    vis["fullatt_block_indexes"] = scale.vision_fullatt(vis["depth"])
    text = dict(scale.REAL_TEXT, num_hidden_layers=layers or scale.REAL_TEXT["num_hidden_layers"])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vis, tie_word_embeddings=False)
    p = vl_patches(CONDITION_AREA) * images
    seq = PROMPT_TOKENS + p // 4
    with torch.device("meta"):
        g = graphs.TextEncoderGraph(Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)).eval()
        i64 = dict(dtype=torch.int64)
        feeds = (
            torch.zeros(batch, seq, **i64),
            torch.ones(batch, seq, **i64),
            torch.zeros(3, batch, seq, **i64),
            torch.zeros(p, 1176, dtype=torch.bfloat16),
            torch.zeros(p, 2, **i64),
            torch.zeros(p // 4, **i64),
            torch.zeros(p, **i64),
            torch.zeros(p, **i64),
            torch.zeros(batch, seq, **i64),
        )
    return trace(lambda: g(*feeds))


def vae_work(side: int, part: str, batch: int = 1) -> Work:
    """One vae_encoder (image side x side) or vae_decoder (to side x side) forward of diffusers'
    AutoencoderKLQwenImage at the real config (scale.REAL_VAE), bf16."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from export import scale

    with torch.device("meta"):
        vae = AutoencoderKLQwenImage(**scale.REAL_VAE).to(torch.bfloat16)
        if part == "encoder":
            x = torch.zeros(batch, 3, 1, side, side, dtype=torch.bfloat16)
            return trace(lambda: vae.encode(x).latent_dist.mode())
        z = torch.zeros(batch, 16, 1, side // VAE_SCALE, side // VAE_SCALE, dtype=torch.bfloat16)
        return trace(lambda: vae.decode(z).sample)


def seconds(work: Work, gpu: Gpu) -> float:
    return sum(roofline(work, gpu).values())


def text_encoder_params(layers: int | None = None, depth: int | None = None) -> int:
    """Parameters of the text_encoder graph: Qwen2.5-VL's vision tower and language model (no lm_head)."""
    t, v = QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION
    layers = t["layers"] if layers is None else layers
    depth = v["depth"] if depth is None else depth
    kv = t["kv_heads"] * (t["hidden"] // t["heads"])
    lm_layer = t["hidden"] * (2 * t["hidden"] + 2 * kv) + 2 * kv + t["hidden"] + 3 * t["hidden"] * t["intermediate"]
    lm = t["vocab"] * t["hidden"] + layers * (lm_layer + 2 * t["hidden"]) + t["hidden"]
    h, i = v["hidden"], v["intermediate"]
    vblock = h * 4 * h + 4 * h + 3 * h * i + 2 * i
    merger = h + (4 * h) ** 2 + 4 * h * t["hidden"] + 4 * h + t["hidden"]  # ln_q, two linears
    vision = 1176 * v["hidden"] + depth * (vblock + v["hidden"] * 3) + merger
    return lm + vision


def weights_gb() -> dict[str, dict[str, float]]:
    """Weight memory per component and precision (GB): parameters of the exported graphs (text encoder without
    lm_head: the graph ends at the final norm) x bytes per weight; FP8 = the transformer recipe of export/fp8.py."""
    text_encoder = text_encoder_params()
    layers = transformer_layers(QWEN_IMAGE_EDIT_2509)
    transformer = sum(ly.params for ly in layers)
    vae = 126_892_531  # AutoencoderKLQwenImage() parameters (checked by export/tests/test_capacity.py)
    out = {}
    for name, n in (("text_encoder", text_encoder), ("transformer", transformer), ("vae", vae)):
        out[name] = {"fp32": n * 4 / 1e9, "bf16": n * 2 / 1e9, "fp8": n * 2 / 1e9}
    out["transformer"]["fp8"] = weight_bytes(layers, FP8) / 1e9
    out["_params"] = {"text_encoder": text_encoder, "transformer": transformer, "vae": vae}
    return out


@dataclass
class Plan:
    """Per resolution: the Work of each stage at batch 1, 2 and 4 (the transformer at 2x the batch with CFG)."""

    side: int
    stages: dict[str, dict[int, Work]]


def plan(sides=RESOLUTIONS, batches=(1, 2, 4), images: int = 1) -> list[Plan]:
    te = {b: text_encoder_work(batch=b, images=images) for b in batches}
    out = []
    for side in sides:
        stages = {
            "text_encoder": te,
            "vae_encoder": {b: vae_work(side, "encoder", b) for b in batches},
            "transformer": {
                b: transformer_step(QWEN_IMAGE_EDIT_2509, Shape(side, side, condition_images=images, batch=b), BF16)
                for b in batches
            },
            "vae_decoder": {b: vae_work(side, "decoder", b) for b in batches},
        }
        out.append(Plan(side, stages))
    return out


def edit_seconds(p: Plan, gpu: Gpu, steps: int, cfg: bool, batch: int = 1) -> float:
    """Roofline floor of one edit of `batch` requests: text encoder (twice with CFG: prompt and negative prompt),
    VAE encode, `steps` transformer forwards (cond + uncond as one batch with CFG), VAE decode."""
    k = 2 if cfg else 1
    te = seconds(p.stages["text_encoder"][batch], gpu) * k
    return (
        te
        + seconds(p.stages["vae_encoder"][batch], gpu)
        + steps * seconds(_transformer(p, batch * k), gpu)
        + seconds(p.stages["vae_decoder"][batch], gpu)
    )


def _transformer(p: Plan, batch: int) -> Work:
    if batch in p.stages["transformer"]:
        return p.stages["transformer"][batch]
    return transformer_step(QWEN_IMAGE_EDIT_2509, Shape(p.side, p.side, batch=batch), BF16)


def plan_tables(plans: list[Plan], gpus=None) -> str:
    gpus = gpus or list(GPUS.values())
    w = weights_gb()
    params = w.pop("_params")
    lines = [
        "**Projection, not a measurement**: computed by `python3 scripts/capacity.py --plan` from the real configs "
        "(transformer 60 blocks of 24 x 128 heads, Qwen2.5-VL-7B text encoder, QwenImage VAE) and the GPUs' published "
        "dense peaks and bandwidths (sources in scripts/capacity.py). Edit Plus with one condition image "
        f"({CONDITION_AREA} px VL image), {PROMPT_TOKENS} prompt tokens. Transformer FLOPs/bytes analytic (its layer "
        "list is checked against diffusers); text encoder and VAE traced op by op on torch's meta device through the "
        "exported graph wrappers, bytes unfused (an upper bound). Roofline: each op max(FLOPs / peak, bytes / "
        "bandwidth): a floor real kernels do not reach.",
        "",
        "Weights (GB) per precision: "
        + "; ".join(
            f"{n} ({params[n] / 1e9:.2f} B params): fp32 {v['fp32']:.1f}, bf16 {v['bf16']:.1f}, fp8 {v['fp8']:.1f}"
            for n, v in w.items()
        )
        + " (fp8 = the transformer's FP8 recipe, the rest bf16).",
        "",
        "| side | stage | GFLOP (batch 1) | GB moved (batch 1) | arithmetic intensity (FLOP/B) |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for p in plans:
        for stage, by_batch in p.stages.items():
            wk = by_batch[1]
            f, b = sum(wk.flops.values()), sum(wk.bytes.values())
            lines.append(f"| {p.side} | {stage} | {f / 1e9:,.0f} | {b / 1e9:.1f} | {f / max(b, 1):.0f} |")
    lines += ["", _gpu_table(plans, gpus, w), "", _batch_table(plans, gpus)]
    return "\n".join(lines)


def _gpu_table(plans: list[Plan], gpus, w) -> str:
    bf16 = sum(v["bf16"] for v in w.values())
    fp8 = sum(v["fp8"] for v in w.values())
    lines = [
        f"All weights together: {bf16:.1f} GB in bf16, {fp8:.1f} GB with the FP8 transformer.",
        "",
        "| GPU | memory GB | all bf16 fit | FP8 transformer + rest fit | side | transformer ms/step (CFG, batch 2) "
        "| 8-step Lightning edit s (no CFG) | 40-step CFG edit s |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for gpu in gpus:
        for p in plans:
            act = activation_bytes(QWEN_IMAGE_EDIT_2509, Shape(p.side, p.side, batch=2)) / 1e9
            fits = "yes" if bf16 + act < gpu.memory_gb * 0.95 else "no"
            fits8 = "yes" if fp8 + act < gpu.memory_gb * 0.95 else "no"
            step = seconds(p.stages["transformer"][2], gpu)
            lines.append(
                f"| {gpu.name} | {gpu.memory_gb:.0f} | {fits} | {fits8} | {p.side} | {step * 1e3:.0f} "
                f"| {edit_seconds(p, gpu, 8, False):.2f} | {edit_seconds(p, gpu, 40, True):.1f} |"
            )
    return "\n".join(lines)


def _batch_table(plans: list[Plan], gpus) -> str:
    lines = [
        "Throughput gain of a batch per stage (requests per second at batch n / at batch 1, roofline): near 1.0x "
        "means the stage is compute-bound at batch 1 (a batch only queues more work); above 1 it is memory-bound "
        "(weights read once per batch).",
        "",
        "| GPU | side | "
        + " | ".join(f"{s} b2 / b4" for s in ("text_encoder", "vae_encoder", "transformer", "vae_decoder"))
        + " |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for gpu in gpus:
        for p in plans:
            cells = []
            for by_batch in p.stages.values():
                t1 = seconds(by_batch[1], gpu)
                cells.append(" / ".join(f"{n * t1 / seconds(by_batch[n], gpu):.2f}x" for n in (2, 4)))
            lines.append(f"| {gpu.name} | {p.side} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h100-sxm", help=f"one of {', '.join(GPUS)}, or all")
    ap.add_argument("--side", type=int, default=1024, help="output width = height in pixels (default 1024)")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--plan", action="store_true", help="the capacity plan of docs/real-scale.md (needs the .venv)")
    args = ap.parse_args(argv)
    if args.plan:
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        text = plan_tables(plan())
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return 0
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
