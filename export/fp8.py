"""FP8 (float8e4m3fn) post-training quantization of the transformer graph, for TensorRT's FP8 engines.

Four steps, each a function here:
1. `placement`: which nn.Linear layers of QwenImageTransformer2DModel compute in FP8 (the projections
   and MLPs inside the blocks) and which stay in the graph's own precision, with the reason (the
   embedders, the timestep embedding, the AdaLN modulations, norm_out and proj_out, as the published
   FP8 recipes for diffusion transformers keep them; norms, RoPE, softmax and the attention matmuls
   are never quantized).
2. `calibrate`: static per-tensor activation scales from the pipeline's own denoising runs (photo-like
   images, edit prompts, every step, both true-CFG branches) at the bundle's working area, max
   calibration as every FP8 recipe uses; `evaluate` measures each layer's FP8 error on a held-out run.
3. `quantize_graph`: a post-export ONNX rewrite in standard ops at opset >= 21: one
   QuantizeLinear -> DequantizeLinear pair (per-tensor scale, zero point 0, nothing between them) on
   each quantized activation, weights stored as FLOAT8E4M3FN initializers followed by a per-channel
   DequantizeLinear, the bias Add and everything else untouched. This is the form TensorRT builds as
   FP8 GEMMs in a strongly typed network, and ONNX Runtime's CPU provider runs exactly.
4. `verify`: ONNX Runtime runs the FP8 graph on recorded real transformer inputs and random ones;
   it must equal a torch model with the same fake quantization, and its distance to the unquantized
   model is reported.

Activation scales are powers of two (the calibrated max / 448, rounded up): in e4m3 that costs no
precision within the normal range (it only moves the clip point between 224 and 448 times the scale),
makes x / scale exact on every backend, and keeps a scale stable under last-bit differences of the
calibration run (the tiny set is regenerated and compared on other machines).
"""

from __future__ import annotations

import math
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

FP8_MAX = 448.0
OPSET = 21  # FP8 Q/DQ: 19+; 21 keeps ORT's optimizer from moving a Reshape (no fp8 kernel) between Q and DQ
FORMAT = "float8e4m3fn"

# Linear layers of every transformer block computed in FP8 (name after `transformer_blocks.<i>.`).
FP8_LAYERS = {
    "attn.to_q": "image-stream attention projection",
    "attn.to_k": "image-stream attention projection",
    "attn.to_v": "image-stream attention projection",
    "attn.add_q_proj": "text-stream attention projection",
    "attn.add_k_proj": "text-stream attention projection",
    "attn.add_v_proj": "text-stream attention projection",
    "attn.to_out.0": "image-stream attention output projection",
    "attn.to_add_out": "text-stream attention output projection",
    "img_mlp.net.0.proj": "image-stream MLP (up)",
    "img_mlp.net.2": "image-stream MLP (down)",
    "txt_mlp.net.0.proj": "text-stream MLP (up)",
    "txt_mlp.net.2": "text-stream MLP (down)",
}
# Linear layers kept in the graph's precision, by name prefix, and why (NVIDIA's TensorRT demo/Diffusion
# and Model Optimizer filters keep the embedders, time embedding, norm_out and proj_out; FP8 recipes
# for Flux-like models also keep the AdaLN modulations).
KEPT_LAYERS = [
    ("img_in", "first projection (packed latents into the model width): few FLOPs, its error reaches every block"),
    ("txt_in", "first projection of the text stream (joint dim into the model width)"),
    ("time_text_embed.", "timestep embedding: GEMMs on [batch, 256], compute-trivial; it conditions every block"),
    (
        "transformer_blocks.*.img_mod.",
        "AdaLN modulation (shift/scale/gate) of the image stream: GEMV on the "
        "timestep embedding, compute-trivial; an error scales a whole stream",
    ),
    ("transformer_blocks.*.txt_mod.", "AdaLN modulation of the text stream (as img_mod)"),
    ("norm_out.", "final AdaLN modulation"),
    ("proj_out", "last projection: the velocity itself"),
]
# Never quantized, whatever the options: not linear layers.
KEPT_OPS = [
    "LayerNorm / RMSNorm (img/txt norms, txt_norm, per-head norm_q/norm_k)",
    "RoPE rotation",
    "attention: Q.K^T, softmax and P.V (no FP8 attention, as TensorRT's and Model Optimizer's defaults)",
    "GELU, SiLU, modulation (shift/scale/gate) and residual additions",
]
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------


@dataclass
class Layer:
    name: str  # module name in QwenImageTransformer2DModel, e.g. transformer_blocks.0.attn.to_q
    in_features: int
    out_features: int
    fp8: bool
    reason: str


def _matches(name: str, pattern: str) -> bool:
    """A keep pattern names a module or a prefix of module names, either in full
    (`transformer_blocks.59.img_mlp`) or within every block (`img_mlp`, `attn.to_out.0`)."""
    m = _BLOCK.match(name)
    for candidate in (name, m.group(2) if m else None):
        if candidate is not None and (candidate == pattern or candidate.startswith(pattern + ".")):
            return True
    return False


def placement(transformer: torch.nn.Module, keep: tuple[str, ...] = ()) -> list[Layer]:
    """Every nn.Linear of the transformer, in module order, with its FP8 decision and reason. `keep`:
    more layers to keep in high precision (module names or per-block names, e.g. `img_mlp`)."""
    layers = []
    for name, mod in transformer.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        m = _BLOCK.match(name)
        kind = m.group(2) if m else None
        if kind in FP8_LAYERS and not any(_matches(name, p) for p in keep):
            fp8, reason = True, FP8_LAYERS[kind]
        elif kind in FP8_LAYERS:
            fp8, reason = False, "kept by --fp8-keep"
        else:
            fp8, reason = False, _kept_reason(name)
        layers.append(Layer(name, mod.in_features, mod.out_features, fp8, reason))
    return layers


def _kept_reason(name: str) -> str:
    for prefix, reason in KEPT_LAYERS:
        rx = re.escape(prefix).replace(r"\*", r"\d+")
        if re.match(rx, name):
            return reason
    return "not a layer of the FP8 recipe"


# ----------------------------------------------------------------------------------------------
# Rounding, scales
# ----------------------------------------------------------------------------------------------


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """float8e4m3fn of x (round to nearest even, saturating at +-448 as QuantizeLinear and TensorRT do)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def activation_scale(amax: float) -> float:
    """Per-tensor activation scale: amax / 448 rounded up to a power of two (module docs)."""
    if not (amax > 0 and math.isfinite(amax)):
        return 1.0
    return float(2.0 ** math.ceil(math.log2(amax / FP8_MAX)))


def weight_scales(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-output-channel scales of a [out, in] weight: row amax / 448 in the graph's float type
    (strictly positive: TensorRT refuses zero scales)."""
    amax = w.float().abs().amax(dim=1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return s.to(dtype).float()


def quantize_weight(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight [out, in], per-channel scale [out] as float32 holding values of `dtype`)."""
    s = weight_scales(w, dtype)
    return to_fp8(w.float() / s[:, None]), s


def dequantized_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight the FP8 graph computes with: DequantizeLinear(W8, s) in the graph's type."""
    w8, s = quantize_weight(w, dtype)
    return (w8.float() * s[:, None]).to(dtype)


def fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """QuantizeLinear -> DequantizeLinear of an activation with a per-tensor scale."""
    return (to_fp8(x.float() / scale).float() * scale).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Calibration and per-layer errors (torch, on the pipeline's own denoising runs)
# ----------------------------------------------------------------------------------------------

PROMPTS = [
    "make the sky a warm sunset orange",
    "turn the red shapes into glass",
    "add falling snow and a winter mood",
    "convert the picture into a pencil sketch",
    "replace the background with a beach at noon",
    "make it look like an old faded photograph",
    "add a small wooden boat in the middle",
    "change the season to autumn with golden light",
]
NEGATIVE_PROMPT = "blurry, low quality, distorted"
CALIBRATION_RATIOS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3)]
TRUE_CFG_SCALE = 4.0


@dataclass
class CalibrationCase:
    images: list[tuple[tuple[int, int], int]]  # ((width, height), picture seed) of each input image
    prompt: str
    seed: int
    steps: int


@dataclass
class CalibrationSettings:
    cases: int = 4
    steps: int = 4
    keep: tuple[str, ...] = ()


def calibration_cases(variant, area: int, settings: CalibrationSettings, size_of, held_out: bool = False):
    """Deterministic calibration runs at the bundle's working area, cycling through the profile aspect
    ratios: photo-like pictures (export.reference.make_image), edit prompts, true CFG. `size_of(area,
    ratio)`: the pipeline's output size, (width, height). `held_out`: one more run with other pictures,
    prompt and seed, for the per-layer error report."""
    first, count = (settings.cases, 1) if held_out else (0, settings.cases)
    out = []
    for i in range(first, first + count):
        rw, rh = CALIBRATION_RATIOS[i % len(CALIBRATION_RATIOS)]
        size = size_of(area, rw / rh)
        n_images = 1 + (i % 2) if variant.plus else 1
        images = [(size, 100 + 7 * i + j) for j in range(n_images)]
        out.append(CalibrationCase(images, PROMPTS[i % len(PROMPTS)], 1000 + i, settings.steps))
    return out


def _run_cases(pipe, variant, areas, cases) -> int:
    """Runs the pipeline on each case (true CFG: both branches); returns the transformer calls made."""
    from PIL import Image

    from .reference import make_image, patched_areas

    calls = 0
    forward = pipe.transformer.forward

    def counting(*a, **kw):
        nonlocal calls
        calls += 1
        return forward(*a, **kw)

    pipe.transformer.forward = counting
    try:
        with tempfile.TemporaryDirectory() as tmp, patched_areas(variant, areas.vae, areas.condition), torch.no_grad():
            for c in cases:
                pil = []
                for k, ((w, h), seed) in enumerate(c.images):
                    path = Path(tmp) / f"calib_{c.seed}_{k}.png"
                    make_image(path, (w, h), seed)
                    pil.append(Image.open(path).convert("RGB"))
                pipe(
                    image=pil if variant.plus else pil[0],
                    prompt=c.prompt,
                    negative_prompt=NEGATIVE_PROMPT,
                    true_cfg_scale=TRUE_CFG_SCALE,
                    num_inference_steps=c.steps,
                    generator=torch.Generator().manual_seed(c.seed),
                    output_type="np",
                )
    finally:
        pipe.transformer.forward = forward
    return calls


def _linears(transformer) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def calibrate(pipe, variant, areas, layers: list[Layer], cases) -> tuple[dict[str, float], int]:
    """Max |input| of every linear layer over every transformer call of the calibration runs."""
    amax: dict[str, float] = defaultdict(float)
    mods = _linears(pipe.transformer)
    handles = []
    for layer in layers:

        def hook(_mod, args, name=layer.name):
            amax[name] = max(amax[name], float(args[0].detach().abs().max()))

        handles.append(mods[layer.name].register_forward_pre_hook(hook))
    try:
        calls = _run_cases(pipe, variant, areas, cases)
    finally:
        for h in handles:
            h.remove()
    return dict(amax), calls


@dataclass
class LayerError:
    err2: float = 0.0
    ref2: float = 0.0
    max_abs: float = 0.0
    clipped: int = 0
    elements: int = 0
    held_out_amax: float = 0.0


def evaluate(pipe, variant, areas, layers: list[Layer], amax: dict[str, float], case, dtype) -> dict[str, LayerError]:
    """Per-layer FP8 error on a held-out run: at every call of every linear layer (quantized or kept),
    its output from FP8 input and weight (the calibrated scale) against its actual output, on the
    unquantized trajectory. Kept layers show what quantizing them would cost."""
    stats = {layer.name: LayerError() for layer in layers}
    mods = _linears(pipe.transformer)
    handles = []
    for layer in layers:
        scale = activation_scale(amax.get(layer.name, 0.0))

        def hook(mod, args, out, name=layer.name, scale=scale):
            x = args[0].detach()
            wq = dequantized_weight(mod.weight.detach(), dtype)
            yq = F.linear(fake_quant(x, scale), wq, mod.bias).float()
            y = out.detach().float()
            s = stats[name]
            d = yq - y
            s.err2 += float((d.double() ** 2).sum())
            s.ref2 += float((y.double() ** 2).sum())
            s.max_abs = max(s.max_abs, float(d.abs().max()))
            s.clipped += int((x.float().abs() > FP8_MAX * scale).sum())
            s.elements += x.numel()
            s.held_out_amax = max(s.held_out_amax, float(x.abs().max()))

        handles.append(mods[layer.name].register_forward_hook(hook))
    try:
        _run_cases(pipe, variant, areas, [case])
    finally:
        for h in handles:
            h.remove()
    return stats


def _db(ref2: float, err2: float) -> float | None:
    if err2 <= 0:
        return None
    return 10 * math.log10(max(ref2, 1e-300) / err2)


def layer_report(transformer, layers, amax, stats, in_graph: dict[str, str], dtype) -> list[dict]:
    """One row per linear layer: decision, reason, calibrated scale and the held-out FP8 error."""
    mods = _linears(transformer)
    rows = []
    for layer in layers:
        w = mods[layer.name].weight.detach()
        wq = dequantized_weight(w, dtype).float()
        werr = float(torch.linalg.vector_norm(wq - w.float()) / torch.linalg.vector_norm(w.float()).clamp_min(1e-30))
        s = stats.get(layer.name, LayerError())
        rel = math.sqrt(s.err2 / s.ref2) if s.ref2 > 0 else None
        rows.append(
            {
                **asdict(layer),
                "onnx_node": in_graph.get(layer.name),
                "calibrated_amax": amax.get(layer.name),
                "activation_scale": activation_scale(amax.get(layer.name, 0.0)),
                "held_out_amax": s.held_out_amax,
                "clipped_fraction": s.clipped / s.elements if s.elements else None,
                "weight_rel_l2": werr,
                "output_rel_l2": rel,
                "output_sqnr_db": _db(s.ref2, s.err2),
                "output_max_abs": s.max_abs,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# The ONNX rewrite
# ----------------------------------------------------------------------------------------------

_ONNX_FLOAT = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _initializer_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()


def _torch_tensor(name: str, t: torch.Tensor, onnx_type: int) -> onnx.TensorProto:
    """An initializer holding `t`'s bytes as `onnx_type` (FLOAT8E4M3FN, BFLOAT16, ... raw little-endian)."""
    return helper.make_tensor(name, onnx_type, list(t.shape), _tensor_bytes(t), raw=True)


def ensure_opset(model: onnx.ModelProto, opset: int = OPSET) -> onnx.ModelProto:
    """The model at opset >= `opset` (onnx's version converter, run on a copy without the weight bytes,
    so a multi-GB graph converts in a small protobuf)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return model
    data = {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) > 64:
            data[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, opset)
    finally:
        for t in model.graph.initializer:
            if t.name in data:
                t.raw_data = data[t.name]
    for t in converted.graph.initializer:
        if t.name in data:
            t.raw_data = data[t.name]
    converted.ir_version = max(model.ir_version, 9)  # float8 types: IR 9+
    return converted


@dataclass
class Target:
    node: onnx.NodeProto
    layer: str
    weight_axis: int  # the output-channel axis of the weight initializer as the node reads it
    transposed: bool  # the initializer holds W^T ([in, out])


def find_targets(model: onnx.ModelProto, transformer, layers: list[Layer], dtype) -> list[Target]:
    """The MatMul/Gemm nodes computing the FP8 layers, found by weight value (the exporter names
    3-D linears' weights anonymously and transposed): MatMul(x, W^T) or Gemm(x, W, transB)."""
    mods = _linears(transformer)
    wanted: dict[tuple, tuple[str, bool]] = {}
    for layer in (ly for ly in layers if ly.fp8):
        w = mods[layer.name].weight.detach().to(dtype)
        for transposed, t in ((True, w.T), (False, w)):
            key = (tuple(t.shape), hash(_tensor_bytes(t)))
            if key in wanted and wanted[key][0] != layer.name:
                raise ValueError(
                    f"{layer.name} and {wanted[key][0]} have identical weights: cannot place Q/DQ by value"
                )
            wanted[key] = (layer.name, transposed)
    inits = {t.name: t for t in model.graph.initializer}
    targets = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if len(t.dims) != 2:
            continue
        hit = wanted.get((tuple(t.dims), hash(_initializer_bytes(t))))
        if hit is None:
            continue
        name, transposed = hit
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0) if node.op_type == "Gemm" else 0
        if trans_a:
            continue
        # As the node reads it, W^T is [in, out] (output channels on axis 1); W with transB is [out, in].
        if transposed == bool(trans_b):
            continue  # the node does not compute x @ W^T with this initializer
        targets.append(Target(node, name, 1 if transposed else 0, transposed))
    return targets


def quantize_graph(model: onnx.ModelProto, transformer, layers: list[Layer], amax: dict[str, float], dtype):
    """Rewrites `model` (opset >= 21 afterwards) with FP8 Q/DQ on the FP8 layers; returns (model,
    {layer name: node name} of the layers quantized)."""
    model = ensure_opset(model)
    g = model.graph
    ftype = _ONNX_FLOAT[dtype]
    mods = _linears(transformer)
    targets = find_targets(model, transformer, layers, dtype)
    by_input: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        by_input[t.node.input[0]].append(t)

    new_inits: list[onnx.TensorProto] = [
        helper.make_tensor("fp8_zero_point", TensorProto.FLOAT8E4M3FN, [], np.zeros(1, np.uint8).tobytes(), raw=True)
    ]
    before: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # id(target node) -> nodes to emit before it
    for act, group in by_input.items():
        first = group[0]
        base = f"{first.layer}.input_fp8"
        scale = max(activation_scale(amax.get(t.layer, 0.0)) for t in group)
        new_inits.append(_torch_tensor(f"{base}.scale", torch.tensor(scale, dtype=dtype), ftype))
        q = helper.make_node(
            "QuantizeLinear", [act, f"{base}.scale", "fp8_zero_point"], [f"{base}.q"], name=f"{base}/QuantizeLinear"
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{base}.q", f"{base}.scale", "fp8_zero_point"],
            [f"{base}.dq"],
            name=f"{base}/DequantizeLinear",
        )
        before[id(first.node)] += [q, dq]
        for t in group:
            t.node.input[0] = f"{base}.dq"
    for t in targets:
        w = mods[t.layer].weight.detach().to(dtype)
        w8, s = quantize_weight(w, dtype)
        stored = w8.T.contiguous() if t.transposed else w8
        base = f"{t.layer}.weight_fp8"
        new_inits += [
            _torch_tensor(base, stored, TensorProto.FLOAT8E4M3FN),
            _torch_tensor(f"{base}.scale", s.to(dtype), ftype),
            helper.make_tensor(
                f"{base}.zero_point",
                TensorProto.FLOAT8E4M3FN,
                [s.numel()],
                np.zeros(s.numel(), np.uint8).tobytes(),
                raw=True,
            ),
        ]
        dq = helper.make_node(
            "DequantizeLinear",
            [base, f"{base}.scale", f"{base}.zero_point"],
            [f"{base}.dq"],
            name=f"{base}/DequantizeLinear",
            axis=t.weight_axis,
        )
        before[id(t.node)].append(dq)
        t.node.input[1] = f"{base}.dq"

    nodes = []
    for node in g.node:
        nodes += before.get(id(node), [])
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    onnx.checker.check_model(model)
    return model, {t.layer: t.node.name for t in targets}


# ----------------------------------------------------------------------------------------------
# The whole step, for the exporter
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    manifest: dict  # the manifest's `quantization.transformer` record
    report: dict  # layers, calibration, verification
    rows: list[dict] = field(default_factory=list)  # verification rows (as the export's others)


def _recorded_inputs(pipe, variant, areas, case, steps_to_keep=(0, -1)) -> list[dict]:
    """Transformer inputs of the first and last step of one run (both CFG branches), as graph feeds."""
    from . import host

    calls: list[dict] = []
    forward = pipe.transformer.forward

    def record(*a, **kw):
        calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kw.items()})
        return forward(*a, **kw)

    pipe.transformer.forward = record
    try:
        _run_cases(pipe, variant, areas, [case])
    finally:
        pipe.transformer.forward = forward
    per_step = 2  # true CFG: cond and uncond
    picked = []
    for s in steps_to_keep:
        picked += calls[s * per_step : s * per_step + per_step] if s >= 0 else calls[s * per_step :][:per_step]
    feeds = []
    for kw in picked:
        shapes = [tuple(s) for s in kw["img_shapes"][0]]
        x, e = kw["hidden_states"], kw["encoder_hidden_states"]
        mask = kw.get("encoder_hidden_states_mask")
        if mask is None:
            mask = torch.ones(e.shape[:2], dtype=torch.int64)
        ic, is_, tc, ts = host.rope_tables(shapes, e.shape[1], tuple(pipe.transformer.config.axes_dims_rope))
        f = {
            "hidden_states": x,
            "encoder_hidden_states": e,
            "encoder_hidden_states_mask": mask.to(torch.int64),
            "timestep": kw["timestep"].to(x.dtype),
            "img_cos": ic,
            "img_sin": is_,
            "txt_cos": tc,
            "txt_sin": ts,
        }
        if pipe.transformer.config.zero_cond_t:
            f["modulate_index"] = host.modulate_index(shapes, x.shape[0])
        feeds.append((f, kw))
    return feeds


class _FakeQuant:
    """Context: the transformer's FP8 layers compute as the FP8 graph does (fake-quantized input and weight)."""

    def __init__(self, transformer, layers, amax, dtype):
        self.mods = _linears(transformer)
        self.layers = [ly for ly in layers if ly.fp8]
        self.amax, self.dtype = amax, dtype

    def __enter__(self):
        self.saved = {}
        for layer in self.layers:
            mod = self.mods[layer.name]
            wq = dequantized_weight(mod.weight.detach(), self.dtype)
            scale = activation_scale(self.amax.get(layer.name, 0.0))
            self.saved[layer.name] = mod.forward
            mod.forward = lambda x, mod=mod, wq=wq, scale=scale: F.linear(fake_quant(x, scale), wq, mod.bias)
        return self

    def __exit__(self, *exc):
        for name, fwd in self.saved.items():
            self.mods[name].forward = fwd


# The ORT FP8 graph against torch with the same fake quantization. Both round the same values to FP8, but
# an element within float32 noise (accumulation order, another LayerNorm kernel) of a rounding boundary
# may round the other way (one FP8 step is 6-12% of that element) and the difference travels on through
# the blocks, so the two are not equal to 1e-5 as the float graphs are. A graph that quantizes as
# intended is much closer to the fake-quantized model than to the unquantized one; a wrong scale, axis,
# layout or layer is not. Pass: rel L2 to the fake-quantized model <= max(FLOOR, RATIO x rel L2 to the
# unquantized model).
FAKE_QUANT_FLOOR = 1e-3
FAKE_QUANT_RATIO = 0.5
# Random verification inputs (as the float export's): image shapes, batch, text length.
RANDOM_CASES = [([(1, 8, 8), (1, 8, 8)], 1, 12), ([(1, 2, 10), (1, 4, 6), (1, 6, 4)], 3, 30)]


def verify(path: Path, pipe, layers, amax, dtype, cases, floor: float = FAKE_QUANT_FLOOR) -> list[dict]:
    """The FP8 graph (ONNX Runtime) against torch with the same fake quantization (see FAKE_QUANT_RATIO)
    and against the unquantized torch model (reported: the FP8 error). `cases`: (label, graph feeds,
    the transformer's keyword arguments for the same call)."""
    from .onnx_export import VerificationError, rel_l2, run_ort

    rows = []
    for label, feeds, kwargs in cases:
        out = run_ort(path, {k: v.numpy() for k, v in feeds.items()})[0]
        call = {k: v for k, v in kwargs.items() if k != "return_dict"}
        with torch.no_grad():
            ref = pipe.transformer(**call, return_dict=False)[0].float().numpy()
            with _FakeQuant(pipe.transformer, layers, amax, dtype):
                fq = pipe.transformer(**call, return_dict=False)[0].float().numpy()
        vs_fq, vs_ref = rel_l2(out, fq), rel_l2(out, ref)
        rows.append(
            {
                "graph": "transformer (fp8)",
                "case": label,
                "rel_l2_vs_fake_quant": vs_fq,
                "max_abs_vs_fake_quant": float(np.abs(out - fq).max()),
                "rel_l2_vs_unquantized": vs_ref,
                "max_abs_vs_unquantized": float(np.abs(out - ref).max()),
                "ref_mean_abs": float(np.abs(ref).mean()),
            }
        )
        bound = max(floor, FAKE_QUANT_RATIO * vs_ref)
        if not math.isfinite(vs_fq) or vs_fq > bound:
            raise VerificationError(
                f"transformer (fp8) [{label}]: the ONNX graph is not the FP8 model: rel L2 {vs_fq:.3g} to torch "
                f"with the same FP8 quantization, {vs_ref:.3g} to the unquantized model (bound {bound:.3g})"
            )
    return rows


@dataclass
class Exporter:
    """What the bundle exporter (export/bundle.py, which calls this module) lends the FP8 step."""

    size_of: Callable[[int, float], tuple[int, int]]  # (pixel area, aspect ratio) -> output (width, height)
    random_inputs: Callable  # (image shapes, batch, text length) -> (graph inputs in order, transformer kwargs)
    tolerance: float | None  # the float export's tolerance for the dtype; None: not run on CPU (bfloat16)
    log: Callable[[str], None]


def quantize_transformer(
    pipe, variant, areas, path: Path, dtype, settings: CalibrationSettings, ex: Exporter
) -> Result:
    """Calibrates, rewrites `path` (the exported transformer graph) in place with FP8 Q/DQ, verifies it
    and returns the manifest record and the report."""
    from .onnx_export import EXTERNAL_DATA_THRESHOLD

    log = ex.log

    layers = placement(pipe.transformer, settings.keep)
    cases = calibration_cases(variant, areas.vae, settings, ex.size_of)
    log(f"fp8: calibrating {sum(ly.fp8 for ly in layers)} of {len(layers)} linear layers on {len(cases)} runs")
    amax, calls = calibrate(pipe, variant, areas, layers, cases)
    held_out = calibration_cases(variant, areas.vae, settings, ex.size_of, held_out=True)[0]
    log("fp8: per-layer errors on a held-out run")
    stats = evaluate(pipe, variant, areas, layers, amax, held_out, dtype)
    recorded = _recorded_inputs(pipe, variant, areas, held_out)

    model = onnx.load(str(path))
    model, in_graph = quantize_graph(model, pipe.transformer, layers, amax, dtype)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    missing = [ly.name for ly in layers if ly.fp8 and ly.name not in in_graph]
    log(
        f"fp8: {len(in_graph)} layers quantized in the graph ({len(missing)} FP8 layers absent: pruned by the exporter)"
    )

    rows: list[dict] = []
    if ex.tolerance is not None:
        names = [i.name for i in model.graph.input]
        checks = [
            (f"recorded: {'first' if i < 2 else 'last'} step, {'cond' if i % 2 == 0 else 'uncond'}", f, kw)
            for i, (f, kw) in enumerate(recorded)
        ]
        for shapes, batch, txt in RANDOM_CASES:
            args, kw = ex.random_inputs(shapes, batch, txt)
            checks.append(
                (f"random: batch {batch}, images {shapes}, text {txt}", dict(zip(names, args, strict=True)), kw)
            )
        rows = verify(path, pipe, layers, amax, dtype, checks, max(FAKE_QUANT_FLOOR, ex.tolerance))
    else:
        log(
            "fp8: bfloat16 FP8 graphs are not verified on CPU (ONNX Runtime has no bfloat16 Q/DQ kernels); "
            "`qwen-edit build` compares the TensorRT engine with ORT on the GPU host"
        )

    manifest = {
        "format": FORMAT,
        "weights": "per-channel",
        "activations": "per-tensor",
        "layers": len(in_graph),
        "kept": [p.rstrip(".") for p, _ in KEPT_LAYERS] + list(settings.keep),
        "calibration": {"method": "max", "runs": len(cases), "steps": settings.steps, "calls": calls},
    }
    report = {
        "format": FORMAT,
        "opset": OPSET,
        "quantized": len(in_graph),
        "absent_from_graph": missing,
        "kept_ops": KEPT_OPS,
        "calibration": {
            **manifest["calibration"],
            "true_cfg_scale": TRUE_CFG_SCALE,
            "cases": [asdict(c) for c in cases],
            "held_out": asdict(held_out),
        },
        "layers": layer_report(pipe.transformer, layers, amax, stats, in_graph, dtype),
        "verification": rows,
    }
    return Result(manifest, report, rows)
