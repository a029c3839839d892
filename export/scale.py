"""`python -m export scale-model`: a randomly initialised diffusers checkpoint of Qwen-Image-Edit-2509/2511 at the
real widths (every hidden size, head count, vocabulary and VAE channel of the published models) but few layers.

It meets the shapes, sizes and dtypes of the real model (multi-GB graphs, external data, 4,096-token images,
152,064-row embeddings) without its weights. Where each value comes from:
- transformer: Qwen/Qwen-Image-Edit-2509 and -2511 transformer/config.json (60 layers, 24 heads of 128,
  joint_attention_dim 3584, in 64 / out 16, patch 2, axes_dims_rope (16, 56, 56); 2511 adds zero_cond_t);
  these are also diffusers' QwenImageTransformer2DModel defaults.
- VAE: Qwen-Image vae/config.json = diffusers' AutoencoderKLQwenImage defaults (base_dim 96, z_dim 16,
  dim_mult [1, 2, 4, 4], 2 res blocks, temporal downsample [False, True, True], the 16 latent means/stds).
- text encoder: Qwen/Qwen2.5-VL-7B-Instruct config.json (as shipped in the edit checkpoints' text_encoder/):
  text hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab 152064, rope theta 1e6,
  mrope_section [16, 24, 24], rms eps 1e-6, untied lm_head; vision depth 32, hidden 1280, intermediate 3420,
  16 heads, out_hidden 3584, patch 14, merge 2, temporal patch 2, window 112, fullatt_block_indexes
  [7, 15, 23, 31]. transformers' own class defaults differ (72B text widths, vision hidden 3584), so every
  width is set here explicitly.
- processor: Qwen2.5-VL's preprocessor_config.json (min_pixels 3136, max_pixels 12845056, CLIP mean/std).
- tokenizer: the tiny set's (a small byte-level BPE with Qwen2.5's special tokens; its ids are below the real
  vocabulary, which the embedding table keeps at 152,064 rows). The real tokenizer.json is not available here.

The layer counts are options; the vision tower keeps the real full-attention indexes that fall below its depth
(else its last block), so window and full attention both occur whenever depth >= 2. The checkpoint is written in
bfloat16, as the published one is; components are built, converted and freed one at a time.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from . import tiny
from .variants import UsageError, Variant

REAL_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
)
REAL_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    use_sliding_window=False,
    sliding_window=32768,
)
REAL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    window_size=112,
    out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
)
REAL_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)


def vision_fullatt(depth: int) -> list[int]:
    """The real full-attention block indexes below `depth`, else the last block (block 0 stays windowed)."""
    real = [i for i in REAL_VISION["fullatt_block_indexes"] if i < depth]
    return real or [depth - 1]


def _log(msg: str) -> None:
    import sys

    print(f"[scale-model] {msg}", file=sys.stderr, flush=True)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _text_encoder(tok, layers: int, vision_layers: int, g):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.token_to_id(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = dict(REAL_TEXT, num_hidden_layers=layers, max_window_layers=layers)
    text.update(bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    vision = dict(REAL_VISION, depth=vision_layers, fullatt_block_indexes=vision_fullatt(vision_layers))
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    m = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    tiny._init_(m, g)
    return m


def make_checkpoint(
    out: Path, variant: Variant, layers: int = 2, text_layers: int = 2, vision_layers: int = 2, seed: int = 0
) -> dict:
    """Writes the checkpoint to `out` (bfloat16 safetensors); returns a summary (parameters per component)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if not variant.plus:
        raise UsageError("scale-model makes the Edit Plus variants: --variant edit-2509 or edit-2511")
    if min(layers, text_layers) < 1 or vision_layers < 2:
        raise UsageError("--layers and --text-layers must be at least 1, --vision-layers at least 2")
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    tok, hf_tok = tiny.make_tokenizers()  # the tiny set's tokenizer (see the module doc)
    image_processor = Qwen2VLImageProcessor(min_pixels=tiny.REAL_MIN_PIXELS, max_pixels=tiny.REAL_MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor()
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=hf_tok, video_processor=video_processor)

    summary = {"variant": variant.name, "layers": layers, "text_layers": text_layers, "vision_layers": vision_layers}
    _log(f"text encoder: {text_layers} language layers, {vision_layers} vision blocks")
    text_encoder = _text_encoder(tok, text_layers, vision_layers, g).to(torch.bfloat16)
    gc.collect()
    summary["text_encoder_params"] = _params(text_encoder)
    _log(f"transformer: {layers} blocks")
    transformer = QwenImageTransformer2DModel(
        **dict(REAL_TRANSFORMER, num_layers=layers), zero_cond_t=variant.zero_cond_t
    ).eval()
    tiny._init_(transformer, g)
    transformer = transformer.to(torch.bfloat16)
    gc.collect()
    summary["transformer_params"] = _params(transformer)
    _log("vae")
    vae = AutoencoderKLQwenImage(**REAL_VAE).eval()
    tiny._init_(vae, g)
    vae = vae.to(torch.bfloat16)
    summary["vae_params"] = _params(vae)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny.SCHEDULER_CONFIG)
    pipe = variant.pipeline_class()(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=hf_tok,
        processor=processor,
        transformer=transformer,
    )
    out.mkdir(parents=True, exist_ok=True)
    _log(f"writing {out}")
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    summary["seconds"] = round(time.time() - t0, 1)
    summary["bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    (out / "scale_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"wrote {out} ({summary['bytes'] / 1e9:.2f} GB) in {summary['seconds']} s")
    return summary
