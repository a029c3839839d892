"""Diffusers checkpoint -> qwen-edit model bundle (ONNX graphs, tokenizer.json, manifest.json).

The same code path serves a real Hugging Face snapshot and the tiny random checkpoint; only the
working areas differ (the tiny bundle declares small ones so a CPU edit takes well under a second).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import graphs, host, lora, tiny
from . import manifest as manifest_contract
from . import onnx_export as ox
from .variants import DROP_TOKENS, UsageError, Variant, detect_variant

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# rel-L2 tolerance of ONNX (onnxruntime CPU) against torch, per export dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2}
COMPONENTS = ("text_encoder", "transformer", "vae_encoder", "vae_decoder")
# Output aspect ratios the suggested TensorRT profiles cover.
PROFILE_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
REAL_VAE_AREA = 1024 * 1024
REAL_CONDITION_AREA = 384 * 384
# Longest user text (tokens) a bundle accepts; the manifest's `max_text_tokens` (longest row the
# transformer sees after the drop) adds the image tokens of the working areas and the template.
MAX_USER_TOKENS = 1024
VL_TOKEN_PIXELS = 28 * 28  # pixels per merged vision token
MAX_PLUS_IMAGES = 4


def max_text_tokens(variant: Variant, areas: Areas) -> int:
    if variant.plus:
        image_tokens = MAX_PLUS_IMAGES * math.ceil(areas.condition / VL_TOKEN_PIXELS)
    else:
        image_tokens = math.ceil(areas.vae / VL_TOKEN_PIXELS)
    return (MAX_USER_TOKENS + image_tokens + 64 + 255) // 256 * 256


@dataclass
class Areas:
    vae: int
    condition: int | None  # Plus only


def log(msg: str) -> None:
    import sys

    print(f"[export] {msg}", file=sys.stderr, flush=True)


# Pipeline module -> the graphs exported from it.
MODULES = {"text_encoder": ("text_encoder",), "transformer": ("transformer",), "vae": ("vae_encoder", "vae_decoder")}


def load_pipeline(checkpoint: Path, variant: Variant, dtype: torch.dtype, modules: bool = True):
    """The checkpoint's pipeline; with `modules=False` only its light parts (tokenizer, processor, scheduler):
    `load_module` then loads each network when it is needed."""
    if not checkpoint.is_dir():
        raise UsageError(f"checkpoint directory not found: {checkpoint}")
    detected = detect_variant(checkpoint)
    if detected.kind != variant.kind or detected.zero_cond_t != variant.zero_cond_t:
        raise UsageError(f"{checkpoint} is a {detected.name} checkpoint, not {variant.name}")
    cls = variant.pipeline_class()
    skip = {} if modules else {m: None for m in MODULES}
    try:
        pipe = cls.from_pretrained(str(checkpoint), dtype=dtype, **skip)
        pipe.set_progress_bar_config(disable=True)
    except Exception as e:
        raise UsageError(f"cannot load {checkpoint} as {cls.__name__}: {e}") from e
    for m in MODULES if modules else ():
        getattr(pipe, m).eval().requires_grad_(False)
    return pipe


class _Released:
    """What stays of a released module: its config (the manifest reads it)."""

    def __init__(self, module):
        self.config = module.config


def load_module(pipe, checkpoint: Path, name: str, dtype: torch.dtype) -> None:
    """Loads one network of the checkpoint into `pipe` (see `load_pipeline(modules=False)`)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    try:
        if name == "text_encoder":
            m = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(checkpoint / "text_encoder"), dtype=dtype)
        elif name == "transformer":
            m = QwenImageTransformer2DModel.from_pretrained(str(checkpoint), subfolder="transformer", torch_dtype=dtype)
        else:
            m = AutoencoderKLQwenImage.from_pretrained(str(checkpoint), subfolder="vae", torch_dtype=dtype)
    except Exception as e:
        raise UsageError(f"cannot load {checkpoint / name}: {e}") from e
    object.__setattr__(pipe, name, m.eval().requires_grad_(False))


def release_module(pipe, name: str) -> None:
    """Frees one network of `pipe`, keeping its config."""
    import gc

    object.__setattr__(pipe, name, _Released(getattr(pipe, name)))
    gc.collect()


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (GB; Linux: since the last `reset_peak_rss`)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def reset_peak_rss() -> None:
    """Starts a new peak (Linux: `5` to /proc/self/clear_refs resets VmHWM); elsewhere the peak stays cumulative."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """diffusers' calculate_dimensions (multiples of 32, Python rounding)."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


# ----------------------------------------------------------------------------------------------
# Example and verification inputs
# ----------------------------------------------------------------------------------------------


def _random_images(sizes, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for (w, h) in sizes]


def _texts(variant: Variant, prompts, images_per_prompt):
    out = []
    for p, n in zip(prompts, images_per_prompt, strict=True):
        prefix = "".join(variant.image_template.format(i + 1) for i in range(n)) if variant.plus else ""
        out.append(variant.template.format(prefix + p))
    return out


def text_encoder_case(pipe, variant, sizes, prompts, seed):
    """Processor output and graph inputs for prompts with one image each (v1) or images split
    evenly between prompts (Plus)."""
    per = len(sizes) // len(prompts)
    texts = _texts(variant, prompts, [per] * len(prompts))
    mi = pipe.processor(text=texts, images=_random_images(sizes, seed), padding=True, return_tensors="pt")
    return mi, host.text_encoder_inputs(pipe.text_encoder, mi)


def _float(t, dtype):
    return t.to(dtype) if t.is_floating_point() else t


def text_encoder_example(pipe, variant, dtype):
    _, gi = text_encoder_case(pipe, variant, [(130, 90), (70, 140)], ["make it blue", "add a red balloon"], 0)
    return [_float(gi[k], dtype) for k in graphs.TextEncoderGraph.INPUTS]


def text_encoder_cases(pipe, variant, dtype):
    cases = [
        ([(200, 120)], ["a"]),
        ([(64, 64), (90, 300), (150, 150)], ["x y z", "make the dog green", "hello world, more words here"]),
    ]
    if variant.plus:
        cases.append(([(96, 96), (160, 64)], ["put the hat from picture 2 on the person in picture 1"]))
    for sizes, prompts in cases:
        mi, gi = text_encoder_case(pipe, variant, sizes, prompts, 1)
        with torch.no_grad():
            o = pipe.text_encoder(
                input_ids=mi["input_ids"],
                attention_mask=mi["attention_mask"],
                pixel_values=mi["pixel_values"].to(dtype),
                image_grid_thw=mi["image_grid_thw"],
                mm_token_type_ids=mi["mm_token_type_ids"],
                output_hidden_states=True,
            )
        feeds = {k: _float(v, dtype) for k, v in gi.items()}
        label = f"batch {len(prompts)}, {len(sizes)} images, seq {mi['input_ids'].shape[1]}"
        yield label, feeds, o.hidden_states[-1], mi["attention_mask"].bool()


def _transformer_inputs(pipe, shapes, batch, txt_len, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    img_seq = sum(f * h * w for f, h, w in shapes)
    x = torch.randn(batch, img_seq, cfg.in_channels, generator=g).to(dtype)
    e = torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=g).to(dtype)
    mask = torch.ones(batch, txt_len, dtype=torch.int64)
    if batch > 1:
        mask[-1, max(1, txt_len * 2 // 3) :] = 0
    t = torch.rand(batch, generator=g).to(dtype)
    ic, is_, tc, ts = host.rope_tables(shapes, txt_len, tuple(cfg.axes_dims_rope))
    args = [x, e, mask, t, ic, is_, tc, ts]
    if cfg.zero_cond_t:
        args.append(host.modulate_index(shapes, batch))
    return args, dict(
        hidden_states=x,
        encoder_hidden_states=e,
        encoder_hidden_states_mask=mask,
        timestep=t,
        img_shapes=[list(shapes)] * batch,
    )


def transformer_example(pipe, dtype):
    args, _ = _transformer_inputs(pipe, [(1, 6, 4), (1, 4, 4)], 2, 7, dtype, 0)
    return args


def transformer_cases(pipe, dtype, names):
    for shapes, batch, txt in [([(1, 8, 8), (1, 8, 8)], 1, 12), ([(1, 2, 10), (1, 4, 6), (1, 6, 4)], 3, 30)]:
        args, kw = _transformer_inputs(pipe, shapes, batch, txt, dtype, 1)
        with torch.no_grad():
            ref = pipe.transformer(**kw, return_dict=False)[0]
        yield f"batch {batch}, images {shapes}, text {txt}", dict(zip(names, args, strict=True)), ref, None


def vae_cases(pipe, dtype):
    vae = pipe.vae
    for b, h, w in [(1, 128, 128), (3, 80, 136)]:
        img = (torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1).to(dtype)
        with torch.no_grad():
            ref = vae.encode(img.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        yield "vae_encoder", f"batch {b}, {w}x{h}", {"image": img}, ref
    for b, h, w in [(1, 16, 16), (3, 10, 17)]:
        z = torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(w)).to(dtype)
        with torch.no_grad():
            ref = vae.decode(z.unsqueeze(2), return_dict=False)[0][:, :, 0]
        yield "vae_decoder", f"batch {b}, latent {w}x{h}", {"latent": z}, ref


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


DIM_RENAMES = {"4*units": "patches", "8*lh": "height", "8*lw": "width"}
OUTPUT_DIMS = {"vae_encoder": {"latent": {2: "lh", 3: "lw"}}}


def _rename_dims(path: Path, component: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    outs = OUTPUT_DIMS.get(component, {})
    for vi in list(model.graph.input) + list(model.graph.output):
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param in DIM_RENAMES:
                d.dim_param = DIM_RENAMES[d.dim_param]
            if axis in outs.get(vi.name, {}):
                d.ClearField("dim_value")
                d.dim_param = outs[vi.name][axis]
    has_external = any(
        t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )
    if has_external:
        # Rewrite only the graph proto; external data files stay as they are.
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    else:
        onnx.save_model(model, str(path))


def export_components(pipe, variant: Variant, dtype, out: Path, only=None) -> tuple[dict, list]:
    """Exports and verifies every component; returns ({component: path}, verification rows)."""
    tol = TOLERANCE.get(dtype)
    paths, rows = {}, []
    wanted = COMPONENTS if only is None else only

    def check(path, name, cases):
        if tol is None:
            log(
                f"{name}: {DTYPE_NAMES[dtype]} graphs are not verified on CPU (onnxruntime has no CPU kernels "
                "for them); `qwen-edit build` compares the TensorRT engine with ORT on the GPU host"
            )
            return
        rows.extend(ox.verify(path, name, cases, tol))

    if "text_encoder" in wanted:
        log("exporting text_encoder")
        spec = ox.text_encoder_spec(pipe.text_encoder, text_encoder_example(pipe, variant, dtype))
        paths["text_encoder"] = ox.export(spec, out)
        check(paths["text_encoder"], "text_encoder", text_encoder_cases(pipe, variant, dtype))
    if "transformer" in wanted:
        log("exporting transformer")
        spec = ox.transformer_spec(pipe.transformer, transformer_example(pipe, dtype))
        paths["transformer"] = ox.export(spec, out)
        check(paths["transformer"], "transformer", transformer_cases(pipe, dtype, spec.input_names))
    # Only where they are checked: torch cannot run some bfloat16 kernels on every CPU (bfloat16 attention needs
    # AVX-512 when torch is pinned to its AVX2 kernels, as the tiny set is).
    wants_vae = tol is not None and {"vae_encoder", "vae_decoder"} & set(wanted)
    vae_cases_all = list(vae_cases(pipe, dtype)) if wants_vae else []
    if "vae_encoder" in wanted:
        log("exporting vae_encoder")
        spec = ox.vae_encoder_spec(pipe.vae, [(torch.rand(2, 3, 48, 64) * 2 - 1).to(dtype)])
        paths["vae_encoder"] = ox.export(spec, out)
        check(
            paths["vae_encoder"],
            "vae_encoder",
            [(lbl, f, r, None) for n, lbl, f, r in vae_cases_all if n == "vae_encoder"],
        )
    if "vae_decoder" in wanted:
        log("exporting vae_decoder")
        spec = ox.vae_decoder_spec(pipe.vae, [torch.randn(2, 16, 6, 8).to(dtype)])
        paths["vae_decoder"] = ox.export(spec, out)
        check(
            paths["vae_decoder"],
            "vae_decoder",
            [(lbl, f, r, None) for n, lbl, f, r in vae_cases_all if n == "vae_decoder"],
        )
    for name, path in paths.items():
        _rename_dims(path, name)
    return paths, rows


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _scheduler_subset(cfg) -> dict:
    keys = [
        "base_image_seq_len",
        "max_image_seq_len",
        "base_shift",
        "max_shift",
        "shift_terminal",
        "time_shift_type",
        "use_dynamic_shifting",
        "num_train_timesteps",
        "shift",
    ]
    return {k: cfg[k] for k in keys}


def profile_resolutions(area: int) -> list[list[int]]:
    out = []
    for r in PROFILE_RATIOS:
        w, h = calculate_dimensions(area, r)
        w, h = w // 16 * 16, h // 16 * 16
        if [w, h] not in out:
            out.append([w, h])
    return out


def build_manifest(
    pipe,
    variant: Variant,
    dtype,
    paths: dict,
    areas: Areas,
    name: str,
    source: dict,
    lightning: dict | None,
    quantization: dict | None = None,
) -> dict:
    te_cfg = pipe.text_encoder.config
    vcfg = te_cfg.vision_config
    ip = pipe.processor.image_processor
    vae_cfg = pipe.vae.config
    tcfg = pipe.transformer.config
    components = {}
    for comp in COMPONENTS:
        p = paths[comp]
        inputs, outputs = ox.io_contract(p)
        data = p.with_name(p.name + ".data")
        components[comp] = {
            "file": p.name,
            "sha256": _file_sha256(p),
            "external_data": [data.name] if data.exists() else [],
            "inputs": inputs,
            "outputs": outputs,
        }
    manifest = {
        "format": "qwen-edit-bundle",
        "format_version": 1,
        "name": name,
        "variant": variant.kind,
        "dtype": DTYPE_NAMES[dtype],
        "source": source,
        "lightning": lightning,
        "components": components,
        "tokenizer": "tokenizer.json",
        "prompt": {
            "template": variant.template,
            "image_template": variant.image_template,
            "drop_tokens": DROP_TOKENS,
            "max_text_tokens": max_text_tokens(variant, areas),
        },
        "vision": {
            "patch_size": ip.patch_size,
            "temporal_patch_size": ip.temporal_patch_size,
            "merge_size": ip.merge_size,
            "min_pixels": ip.size["shortest_edge"],
            "max_pixels": ip.size["longest_edge"],
            "resample": "bicubic",
            "rescale_factor": ip.rescale_factor,
            "image_mean": list(ip.image_mean),
            "image_std": list(ip.image_std),
            "window_size": vcfg.window_size,
            "image_token_id": te_cfg.image_token_id,
            "video_token_id": te_cfg.video_token_id,
            "vision_start_token_id": te_cfg.vision_start_token_id,
            "condition_area": areas.condition if variant.plus else None,
            # transformers' Qwen2VLImageProcessor: torchvision backend (uint8 antialiased bicubic,
            # fused rescale/normalise); Qwen2VLProcessor cannot be built without torchvision.
            "processor_backend": "torchvision",
        },
        "vae": {
            "scale_factor": 2 ** len(vae_cfg.temperal_downsample),
            "z_dim": vae_cfg.z_dim,
            "latents_mean": list(vae_cfg.latents_mean),
            "latents_std": list(vae_cfg.latents_std),
            "image_area": areas.vae,
            "resample": "lanczos",
        },
        "transformer": {
            "patch_size": tcfg.patch_size,
            "in_channels": tcfg.in_channels,
            "out_channels": tcfg.out_channels,
            "axes_dims_rope": list(tcfg.axes_dims_rope),
            "rope_theta": 10000,
            "rope_positions": 4096,
            "zero_cond_t": bool(tcfg.zero_cond_t),
            "joint_attention_dim": tcfg.joint_attention_dim,
        },
        "scheduler": {
            "base": _scheduler_subset(pipe.scheduler.config),
            "lightning": _scheduler_subset(tiny.LIGHTNING_SCHEDULER_CONFIG),
        },
        "defaults": {"num_inference_steps": 50, "true_cfg_scale": 4.0, "lightning_steps": 8},
        "profiles": {
            "batch_sizes": [1, 2, 4],
            "resolutions": profile_resolutions(areas.vae),
            "max_text_tokens": max_text_tokens(variant, areas),
        },
    }
    if quantization is not None:
        # Only quantized bundles carry the key (absent = nothing quantized), so other manifests stay as they were.
        manifest["quantization"] = quantization
    return manifest


def quantize(pipe, variant: Variant, dtype, paths: dict, areas: Areas, precision: str, fp8_settings) -> tuple:
    """`--precision fp8`: the transformer graph rewritten with FP8 Q/DQ; returns (manifest
    `quantization` or None, report or None, verification rows)."""
    if precision == "dtype":
        return None, None, []
    if precision != "fp8":
        raise UsageError(f"unknown precision {precision!r}; choose dtype or fp8")
    from . import fp8

    ex = fp8.Exporter(
        size_of=calculate_dimensions,
        random_inputs=lambda shapes, batch, txt: _transformer_inputs(pipe, shapes, batch, txt, dtype, 1),
        tolerance=TOLERANCE.get(dtype),
        log=log,
    )
    r = fp8.quantize_transformer(
        pipe, variant, areas, paths["transformer"], dtype, fp8_settings or fp8.CalibrationSettings(), ex
    )
    return {"transformer": r.manifest}, r.report, r.rows


def export_bundle(
    checkpoint: Path,
    out: Path,
    variant: Variant | None = None,
    dtype: str = "float32",
    lightning_lora: Path | None = None,
    lora_scale: float = 1.0,
    areas: Areas | None = None,
    name: str | None = None,
    source: dict | None = None,
    precision: str = "dtype",
    fp8_settings=None,
) -> dict:
    """Writes a complete bundle to `out`; returns the export report (verification rows, timings).
    `precision`: `dtype` (every graph in `dtype`) or `fp8` (the transformer's linear layers in FP8
    over `dtype`, export/fp8.py)."""
    checkpoint = Path(checkpoint)
    out = Path(out)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    if precision not in ("dtype", "fp8"):
        raise UsageError(f"unknown precision {precision!r}; choose dtype or fp8")
    tdtype = DTYPES[dtype]
    if variant is None:
        variant = detect_variant(checkpoint)
    areas = areas or Areas(REAL_VAE_AREA, REAL_CONDITION_AREA if variant.plus else None)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    # FP8 calibration runs the whole pipeline; otherwise one network is in memory at a time (load, export,
    # verify, free), so the peak follows the largest component, not the sum.
    whole = precision == "fp8"
    log(f"loading {checkpoint} ({variant.name}, {DTYPE_NAMES[tdtype]}{'' if whole else ', one module at a time'})")
    pipe = load_pipeline(checkpoint, variant, tdtype, modules=whole)
    lightning, paths, rows, timings = None, {}, [], {}
    quantization = fp8_report = None
    overall = 0.0
    for module, graphs_of in MODULES.items():
        overall = max(overall, peak_rss_gb())
        reset_peak_rss()
        t1 = time.time()
        if not whole:
            load_module(pipe, checkpoint, module, tdtype)
        if module == "transformer" and lightning_lora is not None:
            log(f"fusing LoRA {lightning_lora}")
            lightning = lora.fuse(pipe.transformer, Path(lightning_lora), lora_scale)
        p, r = export_components(pipe, variant, tdtype, out, only=graphs_of)
        paths.update(p)
        rows += r
        if module == "transformer":
            quantization, fp8_report, fp8_rows = quantize(pipe, variant, tdtype, paths, areas, precision, fp8_settings)
            rows += fp8_rows
        if not whole:
            release_module(pipe, module)
        timings[module] = {"seconds": round(time.time() - t1, 1), "peak_rss_gb": round(peak_rss_gb(), 2)}
        log(f"{module}: {timings[module]['seconds']} s, peak RSS {timings[module]['peak_rss_gb']} GB")
    pipe.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    manifest = build_manifest(
        pipe,
        variant,
        tdtype,
        paths,
        areas,
        name or out.name,
        source or {"checkpoint": checkpoint.name, "tiny": False, "seed": None},
        lightning,
        quantization,
    )
    manifest_contract.write(out / "manifest.json", manifest)
    report = {
        "bundle": out.name,
        "variant": variant.name,
        "dtype": DTYPE_NAMES[tdtype],
        "seconds": round(time.time() - t0, 1),
        "peak_rss_gb": round(max(overall, peak_rss_gb()), 2),
        "modules": timings,
        "files": {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()},
        "verification": rows,
    }
    if fp8_report is not None:
        report["fp8"] = fp8_report
    log(f"wrote {out} in {report['seconds']} s")
    return report


def copy_checkpoint(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
