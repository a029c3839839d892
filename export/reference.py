"""Reference vectors: runs diffusers' QwenImageEdit(Plus)Pipeline on a tiny checkpoint and stores
inputs and intermediates (token ids, VL hidden states, image latents, sigmas, per-step latents,
decoded and final images) per case as `<case>.safetensors` + `<case>.json`.

Two deliberate deviations from running diffusers 0.42.1 as is, both recorded in the case JSON:
- 3-D mRoPE: diffusers 0.42.1 does not pass the processor's `mm_token_type_ids` to Qwen2.5-VL, which
  then silently falls back to 1-D positions (diffusers issue #14194); the model was trained with 3-D
  positions, so we pass them (the fix of diffusers PR #14189).
- Working areas: the pipelines' 1024*1024 (VAE) and 384*384 (Plus VL) areas are patched to the
  bundle's `vae.image_area` / `vision.condition_area`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file

from . import tiny
from .variants import Variant


@dataclass
class Case:
    name: str
    images: list[str]  # file names under reference/images; v1 batch: one image per prompt
    prompts: list[str]
    seeds: list[int]
    steps: int
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    lightning: bool = False
    width: int | None = None
    height: int | None = None
    notes: list[str] = field(default_factory=list)


def make_image(path: Path, size: tuple[int, int], seed: int, fmt: str = "PNG") -> None:
    """A deterministic, photo-like test picture: gradient sky, shapes, soft noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    base = np.concatenate([90 + 120 * y + 20 * x, 140 + 60 * x + 0 * y, 220 - 100 * y + 0 * x], axis=2)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(max(3, min(w, h) // 12), max(4, min(w, h) // 4)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            d.rectangle([cx - r, cy - r // 2, cx + r, cy + r // 2], fill=color)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


REFERENCE_IMAGES = {
    "square.png": ((160, 160), 1, "PNG"),
    "square_b.png": ((160, 160), 2, "PNG"),
    "wide.png": ((200, 120), 3, "PNG"),
    "tall.jpg": ((120, 180), 4, "JPEG"),
}


@contextlib.contextmanager
def patched_areas(variant: Variant, vae_area: int, condition_area: int | None):
    """Sets the pipelines' working areas to the bundle's (the real models use 1024*1024 / 384*384)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as v1
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    saved = (v1.calculate_dimensions, plus.calculate_dimensions, plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE)

    def patch(orig):
        # Both pipelines size their output with a literal `calculate_dimensions(1024 * 1024, ...)`.
        return lambda target_area, ratio: orig(vae_area if target_area == 1024 * 1024 else target_area, ratio)

    v1.calculate_dimensions = patch(saved[0])
    plus.calculate_dimensions = patch(saved[1])
    plus.VAE_IMAGE_SIZE = vae_area
    if condition_area is not None:
        plus.CONDITION_IMAGE_SIZE = condition_area
    try:
        yield
    finally:
        v1.calculate_dimensions, plus.calculate_dimensions, plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE = saved


class Recorder:
    """Hooks on a pipeline instance that record the intermediates of one call."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.processor_out: list[dict] = []
        self.text_hidden: list[torch.Tensor] = []
        self.prompt_embeds: list[tuple] = []
        self.vae_in: list[torch.Tensor] = []
        self.vae_latents: list[torch.Tensor] = []
        self.prepared = None
        self.transformer_calls: list[dict] = []
        self.step_latents: list[torch.Tensor] = []
        self.decode_in = None
        self.decode_out = None
        self._install()

    def _install(self):
        pipe, rec = self.pipe, self
        proc = pipe.processor
        proc_cls = type(proc)

        class RecordingProcessor(proc_cls):
            def __call__(self, *a, **kw):
                out = super().__call__(*a, **kw)
                rec.processor_out.append({k: v.clone() for k, v in out.items()})
                return out

        proc.__class__ = RecordingProcessor
        self.vl_images: list[torch.Tensor] = []
        ip = proc.image_processor
        ip_resize = ip.resize

        def resize(*a, **kw):
            out = ip_resize(*a, **kw)
            rec.vl_images.extend(x.clone() for x in (out if out.ndim == 4 else out[None]))
            return out

        ip.resize = resize

        te = pipe.text_encoder
        te_forward = te.forward

        def te_fwd(*a, **kw):
            if kw.get("mm_token_type_ids") is None and rec.processor_out:
                # The 3-D mRoPE fix (diffusers PR #14189): pass the processor's mm_token_type_ids.
                kw["mm_token_type_ids"] = rec.processor_out[-1]["mm_token_type_ids"]
            out = te_forward(*a, **kw)
            rec.text_hidden.append(out.hidden_states[-1].detach().clone())
            return out

        te.forward = te_fwd

        enc_prompt = pipe.encode_prompt

        def encode_prompt(*a, **kw):
            embeds, mask = enc_prompt(*a, **kw)
            rec.prompt_embeds.append((embeds.detach().clone(), None if mask is None else mask.clone()))
            return embeds, mask

        pipe.encode_prompt = encode_prompt

        enc_vae = pipe._encode_vae_image

        def encode_vae(image, generator):
            rec.vae_in.append(image.detach().clone())
            lat = enc_vae(image, generator)
            rec.vae_latents.append(lat.detach().clone())
            return lat

        pipe._encode_vae_image = encode_vae

        prep = pipe.prepare_latents

        def prepare_latents(*a, **kw):
            latents, image_latents = prep(*a, **kw)
            rec.prepared = (latents.detach().clone(), image_latents.detach().clone())
            return latents, image_latents

        pipe.prepare_latents = prepare_latents

        tr = pipe.transformer
        tr_forward = tr.forward

        def tr_fwd(*a, **kw):
            out = tr_forward(*a, **kw)
            if not rec.step_latents:  # step 0: cond (and uncond with true CFG)
                mask = kw.get("encoder_hidden_states_mask")
                rec.transformer_calls.append(
                    {
                        "hidden_states": kw["hidden_states"].detach().clone(),
                        "encoder_hidden_states": kw["encoder_hidden_states"].detach().clone(),
                        "encoder_hidden_states_mask": None if mask is None else mask.clone(),
                        "timestep": kw["timestep"].detach().clone(),
                        "img_shapes": kw["img_shapes"],
                        "sample": out[0].detach().clone(),
                    }
                )
            return out

        tr.forward = tr_fwd

        vae_decode = pipe.vae.decode

        def decode(z, *a, **kw):
            out = vae_decode(z, *a, **kw)
            rec.decode_in = z.detach().clone()
            rec.decode_out = (out[0] if isinstance(out, tuple) else out.sample).detach().clone()
            return out

        pipe.vae.decode = decode

    def on_step_end(self, pipe, i, t, kw):
        self.step_latents.append(kw["latents"].detach().clone())
        return kw


def run_case(pipe, variant: Variant, case: Case, images_dir: Path, areas, full: bool = False) -> tuple[dict, dict]:
    """Runs one case; returns (tensors, metadata). `full` also stores the bulky float tensors
    (VL pixel_values, decoded float image) that the other cases leave out to keep the files small."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    rec = Recorder(pipe)
    base_scheduler = pipe.scheduler
    if case.lightning:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny.LIGHTNING_SCHEDULER_CONFIG)
    pil = [Image.open(images_dir / f).convert("RGB") for f in case.images]
    generators = [torch.Generator().manual_seed(s) for s in case.seeds]
    kwargs = dict(
        prompt=case.prompts if len(case.prompts) > 1 else case.prompts[0],
        negative_prompt=case.negative_prompt,
        true_cfg_scale=case.true_cfg_scale,
        num_inference_steps=case.steps,
        generator=generators,
        width=case.width,
        height=case.height,
        output_type="pil",
        callback_on_step_end=rec.on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    with patched_areas(variant, areas.vae, areas.condition), torch.no_grad():
        if not variant.plus and len(pil) > 1:
            # diffusers' v1 pipeline resizes a single PIL image to the working size before the VL
            # processor sees it, but passes a list through unresized (VaeImageProcessor.resize ignores
            # lists): a batch would then encode other VL images than the same jobs one by one. Resizing
            # the list first (the exact resize a single call does) keeps each job as it is alone.
            import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as v1

            w, h, _ = v1.calculate_dimensions(1024 * 1024, pil[0].width / pil[0].height)
            pil = [pipe.image_processor.resize(im, h, w) for im in pil]
        image_arg = pil if (variant.plus or len(pil) > 1) else pil[0]
        result = pipe(image=image_arg, **kwargs).images
    pipe.scheduler.sigmas  # noqa: B018 (recorded below)
    sched = pipe.scheduler
    tensors: dict[str, torch.Tensor] = {}
    for i, po in enumerate(rec.processor_out):
        tag = "cond" if i == 0 else "neg"
        tensors[f"{tag}.input_ids"] = po["input_ids"]
        tensors[f"{tag}.attention_mask"] = po["attention_mask"]
        tensors[f"{tag}.mm_token_type_ids"] = po["mm_token_type_ids"]
        tensors[f"{tag}.image_grid_thw"] = po["image_grid_thw"]
        if full and tag == "cond":
            tensors[f"{tag}.pixel_values"] = po["pixel_values"].float()
        embeds, mask = rec.prompt_embeds[i]
        tensors[f"{tag}.prompt_embeds"] = embeds.float()
        if mask is not None:
            tensors[f"{tag}.prompt_embeds_mask"] = mask
    # The processor resizes each image once per prompt encoding; the first encoding's images suffice.
    n_images = int(rec.processor_out[0]["image_grid_thw"].shape[0])
    for i, im in enumerate(rec.vl_images[:n_images]):
        tensors[f"vl_image.{i}"] = im.permute(1, 2, 0).contiguous()  # HWC uint8 after smart_resize
    for i, x in enumerate(rec.vae_in):
        # VAE input in [-1, 1] -> the 8-bit Lanczos-resized image it came from (exact: x = 2*(v/255) - 1)
        u8 = torch.round((x[:, :, 0].float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
        tensors[f"vae_image.{i}"] = u8.permute(0, 2, 3, 1).contiguous()
    latents, image_latents = rec.prepared
    tensors["noise"] = latents.float()
    tensors["image_latents"] = image_latents.float()
    tensors["sigmas"] = sched.sigmas.float()
    tensors["timesteps"] = sched.timesteps.float()
    for i, call in enumerate(rec.transformer_calls):
        tag = "cond" if i == 0 else "neg"
        for k in ("hidden_states", "encoder_hidden_states", "timestep", "sample"):
            tensors[f"step0.{tag}.{k}"] = call[k].float()
        if call["encoder_hidden_states_mask"] is not None:
            tensors[f"step0.{tag}.encoder_hidden_states_mask"] = call["encoder_hidden_states_mask"]
    for i, lat in enumerate(rec.step_latents):
        tensors[f"latents.{i}"] = lat.float()
    tensors["decode_in"] = rec.decode_in[:, :, 0].float()
    if full:
        tensors["decoded"] = rec.decode_out[:, :, 0].float()
    tensors["image"] = torch.from_numpy(np.stack([np.asarray(im) for im in result]))
    pipe.scheduler = base_scheduler

    call0 = rec.transformer_calls[0]
    meta = asdict(case)
    meta.update(
        {
            "variant": variant.name,
            "pipeline": type(pipe).__name__.replace("RecordingProcessor", ""),
            "output_size": [result[0].width, result[0].height],
            "img_shapes": [list(map(list, s)) for s in call0["img_shapes"][0:1]][0],
            "true_cfg": bool(case.true_cfg_scale > 1 and case.negative_prompt is not None),
            "areas": {"vae": areas.vae, "condition": areas.condition},
            "deviations": [
                "3-D mRoPE positions passed to Qwen2.5-VL (diffusers PR #14189)",
                "working areas patched to the bundle's",
            ]
            + (
                ["v1 batch: images pre-resized to the working size (as a single call does)"]
                if not variant.plus and len(case.images) > 1
                else []
            ),
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()
            },
        }
    )
    return tensors, meta


def write_case(out_dir: Path, name: str, tensors: dict, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{name}.safetensors"))
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
