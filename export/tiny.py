"""A tiny, randomly initialised Qwen-Image-Edit of the real classes, made deterministically.

Same architecture as the real models (Qwen2.5-VL text/vision encoder, QwenImage MMDiT, QwenImage VAE,
the real scheduler config), only narrow and shallow, so the whole bundle is a few MB and an edit at
the tiny working areas takes well under a second on a CPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import tokenizer as tiny_tokenizer
from .variants import SYSTEM_PREFIX, Variant

# The real Qwen-Image scheduler config (scheduler/scheduler_config.json of Qwen/Qwen-Image-Edit*).
SCHEDULER_CONFIG = {
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

# Qwen-Image-Lightning's scheduler config (constant shift 3, no terminal stretch).
LIGHTNING_SCHEDULER_CONFIG = {
    **SCHEDULER_CONFIG,
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift_terminal": None,
}

# Working pixel areas of the tiny bundle (real models: 1024*1024 VAE image, 384*384 Plus VL image).
TINY_VAE_AREA = 128 * 128
TINY_CONDITION_AREA = 64 * 64
# VL processor pixel bounds of the tiny bundle (real: 56*56 .. 28*28*16384 = 12845056).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 64

REAL_MIN_PIXELS = 56 * 56
REAL_MAX_PIXELS = 28 * 28 * 16384


def _tokenizer():
    return tiny_tokenizer.build_with_prefix_len(SYSTEM_PREFIX, 64, lo=500)


def _init_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic, scale-aware random init of every parameter (in named order)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf != "gamma" and "embed_tokens" not in name and "embedding" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif "embed_tokens" in name or "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif leaf in ("weight", "gamma") and torch.all(p == 1):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def make_tokenizers():
    """The tiny tokenizer as (tokenizers.Tokenizer, transformers Qwen2Tokenizer)."""
    import tempfile

    from transformers import Qwen2Tokenizer

    tok = _tokenizer()
    with tempfile.TemporaryDirectory() as d:
        tok.save(os.path.join(d, "tokenizer.json"))
        hf_tok = Qwen2Tokenizer(
            tokenizer_file=os.path.join(d, "tokenizer.json"),
            vocab_file=None,
            merges_file=None,
            errors="replace",
            unk_token=None,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            clean_up_tokenization_spaces=False,
            split_special_tokens=False,
            model_max_length=131072,
        )
    return tok, hf_tok


def make_components(variant: Variant, seed: int = 0):
    """Builds (tokenizer, processor, text_encoder, transformer, vae, scheduler) for `variant`."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok, hf_tok = make_tokenizers()
    # The torchvision-backend image processor: what `from_pretrained` gives whenever torchvision is present.
    image_processor = Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor()
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=hf_tok, video_processor=video_processor)

    ids = {t: tok.token_to_id(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    vl_config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=tok.get_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=tok.token_to_id("<|endoftext|>"),
            eos_token_id=tok.token_to_id("<|im_end|>"),
            use_sliding_window=False,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=112,
            out_hidden_size=64,
            fullatt_block_indexes=[1, 3],
            hidden_act="silu",
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    g = torch.Generator().manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(vl_config).eval()
    _init_(text_encoder, g)

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=64,
        axes_dims_rope=(16, 56, 56),
        zero_cond_t=variant.zero_cond_t,
    ).eval()
    _init_(transformer, g)

    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()
    _init_(vae, g)

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    return hf_tok, processor, text_encoder, transformer, vae, scheduler


def make_checkpoint(out_dir: str | os.PathLike, variant: Variant, seed: int = 0) -> Path:
    """Writes a diffusers-format tiny checkpoint of `variant` to `out_dir` (deterministic)."""
    tok, processor, text_encoder, transformer, vae, scheduler = make_components(variant, seed)
    pipe = variant.pipeline_class()(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        processor=processor,
        transformer=transformer,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
