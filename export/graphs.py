"""Export-friendly wrappers of the three networks, with the IO contracts of engines/README.md.

Each wrapper reuses the original modules' weights and sub-modules and replaces only what ONNX and
TensorRT cannot take: complex RoPE (real cos/sin tables from the host), data-dependent vision
bookkeeping (host-computed indices, segment masks instead of cu_seqlens splits), Python caches.
Every attention (transformer, vision tower, language model, VAE) is written by `attention` below.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# Attention: one canonical form for every network
# --------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias=None, scale=None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q [B, N, S, H], k/v [B, N, T, H] and an additive float
    `bias` broadcastable to [B, N, S, T] (0 = attend, the dtype's lowest value = masked; see `mask_bias`).

    Exported as the chain `Mul(q, c) -> MatMul(., Transpose(Mul(k, c))) [-> Add(., bias)] -> Softmax ->
    MatMul(., v)` with c = sqrt(scale): the multi-head attention pattern TensorRT's builder fuses into
    one attention kernel (TensorRT's "Fused Attention" guide, method 2: Q and K each pre-multiplied by
    sqrt(scale), only a pointwise mask add between the first matmul and the softmax, nothing between
    the softmax and the second matmul), which every TensorRT 10.x and 11.x ONNX parser imports. The
    ONNX `Attention` op would need TensorRT >= 10.14 (docs/tensorrt.md). On ONNX Runtime the chain is
    rewritten into `com.microsoft.MultiHeadAttention` when a session is built (src/runtime/attention.rs).
    torch's own SDPA would export this chain plus an IsNaN/Where guard after the softmax, which
    neither TensorRT's fusion nor the rewrite accepts."""
    c = (q.shape[-1] ** -0.5 if scale is None else scale) ** 0.5
    scores = (q * c) @ (k * c).transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def mask_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive bias of a boolean mask (True = attend): 0 or the dtype's lowest finite value, which
    is what SDPA does with a bool mask except on a row with nothing to attend (never ours: image tokens,
    a segment's own token and the causal diagonal are always valid). Built once per graph."""
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=keep.device)
    return torch.where(keep, zero, low)


# --------------------------------------------------------------------------------------------
# Transformer (QwenImageTransformer2DModel)
# --------------------------------------------------------------------------------------------


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated by angle pairs (x[2k], x[2k+1]) -> complex multiply by cos + i sin,
    exactly diffusers' `apply_rotary_emb_qwen(use_real=False)` in real arithmetic."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)
    return out.type_as(x)


class _RealRopeJointAttn:
    """QwenDoubleStreamAttnProcessor2_0 with real RoPE tables ((img_cos, img_sin), (txt_cos, txt_sin)) and
    the joint key-padding mask given as its additive bias [B, 1, 1, txt + img] (`encoder_hidden_states_mask`).
    Called with diffusers' complex tables (the model's own forward, as torch references run it), it is the
    original processor: the graph wrapper shares the model's weights instead of copying them (a copy doubles
    the exporter's memory)."""

    def __init__(self, original):
        self.original = original

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        if not (isinstance(image_rotary_emb, tuple) and isinstance(image_rotary_emb[0], tuple)):
            return self.original(
                attn,
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                attention_mask=attention_mask,
                image_rotary_emb=image_rotary_emb,
            )
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_q = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_k = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_v = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
        txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)

        (img_cos, img_sin), (txt_cos, txt_sin) = image_rotary_emb
        img_q, img_k = _rotate_pairs(img_q, img_cos, img_sin), _rotate_pairs(img_k, img_cos, img_sin)
        txt_q, txt_k = _rotate_pairs(txt_q, txt_cos, txt_sin), _rotate_pairs(txt_k, txt_cos, txt_sin)

        q = torch.cat([txt_q, img_q], dim=1).transpose(1, 2)
        k = torch.cat([txt_k, img_k], dim=1).transpose(1, 2)
        v = torch.cat([txt_v, img_v], dim=1).transpose(1, 2)
        out = attention(q, k, v, encoder_hidden_states_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out


class TransformerGraph(nn.Module):
    """`transformer` contract: velocity for the whole packed sequence (target + condition tokens)."""

    def __init__(self, transformer):
        super().__init__()
        self.m = transformer  # shared, not copied: the processor below keeps the model's own forward as it was
        for block in self.m.transformer_blocks:
            if not isinstance(block.attn.processor, _RealRopeJointAttn):
                block.attn.set_processor(_RealRopeJointAttn(block.attn.processor))
        self.zero_cond_t = bool(getattr(self.m.config, "zero_cond_t", False))

    def input_names(self):
        names = [
            "hidden_states",
            "encoder_hidden_states",
            "encoder_hidden_states_mask",
            "timestep",
            "img_cos",
            "img_sin",
            "txt_cos",
            "txt_sin",
        ]
        return names + (["modulate_index"] if self.zero_cond_t else [])

    def forward(
        self,
        hidden_states,
        encoder_hidden_states,
        encoder_hidden_states_mask,
        timestep,
        img_cos,
        img_sin,
        txt_cos,
        txt_sin,
        modulate_index=None,
    ):
        m = self.m
        hs = m.img_in(hidden_states)
        timestep = timestep.to(hs.dtype)
        if self.zero_cond_t:
            timestep = torch.cat([timestep, timestep * 0], dim=0)
        ehs = m.txt_in(m.txt_norm(encoder_hidden_states))
        # Joint key padding: padded text keys masked, image keys always valid; one bias for every block.
        keep = torch.cat([encoder_hidden_states_mask.to(torch.bool), torch.ones_like(hs[:, :, 0], dtype=torch.bool)], 1)
        mask = mask_bias(keep[:, None, None, :], hs.dtype)
        temb = m.time_text_embed(timestep, hs)
        rope = ((img_cos, img_sin), (txt_cos, txt_sin))
        batch = hidden_states.shape[0]
        for block in m.transformer_blocks:
            ehs, hs = _block_forward(block, hs, ehs, mask, temb, rope, modulate_index, batch)
        if self.zero_cond_t:
            temb = temb[:batch]
        hs = m.norm_out(hs, temb)
        return m.proj_out(hs)


def _block_forward(block, hidden_states, encoder_hidden_states, mask, temb, rope, modulate_index, batch):
    """diffusers' QwenImageTransformerBlock.forward, with `temb[:batch]` for its `chunk(2)[0]` (same
    values; the chunk makes torch.export specialise the batch size)."""
    img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
    txt_temb = temb[:batch] if block.zero_cond_t else temb
    txt_mod1, txt_mod2 = block.txt_mod(txt_temb).chunk(2, dim=-1)

    img_modulated, img_gate1 = block._modulate(block.img_norm1(hidden_states), img_mod1, modulate_index)
    txt_modulated, txt_gate1 = block._modulate(block.txt_norm1(encoder_hidden_states), txt_mod1)
    img_attn, txt_attn = block.attn(
        hidden_states=img_modulated,
        encoder_hidden_states=txt_modulated,
        encoder_hidden_states_mask=mask,
        image_rotary_emb=rope,
    )
    hidden_states = hidden_states + img_gate1 * img_attn
    encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn

    img_modulated2, img_gate2 = block._modulate(block.img_norm2(hidden_states), img_mod2, modulate_index)
    hidden_states = hidden_states + img_gate2 * block.img_mlp(img_modulated2)
    txt_modulated2, txt_gate2 = block._modulate(block.txt_norm2(encoder_hidden_states), txt_mod2)
    encoder_hidden_states = encoder_hidden_states + txt_gate2 * block.txt_mlp(txt_modulated2)

    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


# --------------------------------------------------------------------------------------------
# VAE (AutoencoderKLQwenImage), single frame
# --------------------------------------------------------------------------------------------


def _vae_attention_forward(self, x):
    """QwenImageAttentionBlock.forward (single head over the h*w positions of each frame) with
    `attention` for its SDPA."""
    identity = x
    batch_size, channels, time, height, width = x.size()
    x = x.permute(0, 2, 1, 3, 4).reshape(batch_size * time, channels, height, width)
    x = self.norm(x)
    qkv = self.to_qkv(x).reshape(batch_size * time, 1, channels * 3, -1).permute(0, 1, 3, 2)
    q, k, v = qkv.chunk(3, dim=-1)
    x = attention(q, k, v)
    x = x.squeeze(1).permute(0, 2, 1).reshape(batch_size * time, channels, height, width)
    x = self.proj(x)
    x = x.view(batch_size, time, channels, height, width).permute(0, 2, 1, 3, 4)
    return x + identity


def _vae_copy(vae):
    """A copy of the VAE whose attention blocks use `attention`."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageAttentionBlock

    vae = copy.deepcopy(vae)
    for module in vae.modules():
        if isinstance(module, QwenImageAttentionBlock):
            module.forward = _vae_attention_forward.__get__(module)
    return vae


class VaeEncoderGraph(nn.Module):
    """`vae_encoder`: image [B,3,H,W] in [-1,1] -> latent distribution mode [B,16,H/8,W/8]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = _vae_copy(vae)
        self.z_dim = vae.config.z_dim

    def forward(self, image):
        h = self.vae._encode(image.unsqueeze(2))
        return h[:, : self.z_dim, 0]


class VaeDecoderGraph(nn.Module):
    """`vae_decoder`: latent [B,16,h,w] (not normalised) -> image [B,3,8h,8w] clamped to [-1,1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = _vae_copy(vae)

    def forward(self, latent):
        return self.vae._decode(latent.unsqueeze(2), return_dict=False)[0][:, :, 0]


# --------------------------------------------------------------------------------------------
# Text encoder (Qwen2_5_VLForConditionalGeneration): vision tower + language model + final norm
# --------------------------------------------------------------------------------------------


def _segment_bias(seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, P, P] bias of "attend within your segment" (equal ids)."""
    return mask_bias((seg[:, None] == seg[None, :])[None, None], dtype)


def _lm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface (as its `sdpa_attention_forward`: K/V heads repeated for GQA,
    output [B, S, N, H]) with `attention`; `attention_mask` is the additive bias of TextEncoderGraph."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = attention(query, key, value, attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


LM_ATTENTION = "qwen_edit_export"


class TextEncoderGraph(nn.Module):
    """`text_encoder` contract: last hidden state (after the final norm) of Qwen2.5-VL."""

    INPUTS = [
        "input_ids",
        "attention_mask",
        "position_ids",
        "pixel_values",
        "vision_pos_ids",
        "window_index",
        "window_seg",
        "image_seg",
        "image_embed_index",
    ]

    def __init__(self, model):
        from transformers import AttentionInterface

        super().__init__()
        self.m = model.model  # shared, not copied (the graph only reads it): one copy of the weights in memory
        self.visual = self.m.visual
        self.lm = self.m.language_model
        AttentionInterface.register(LM_ATTENTION, _lm_attention)

    def _vision_block(self, blk, x, cos, sin, mask):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        n = x.shape[0]
        attn = blk.attn
        h = blk.norm1(x)
        q, k, v = attn.qkv(h).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = attention(q, k, v, mask, scale=attn.scaling)
        o = o.transpose(1, 2).reshape(n, -1)
        x = x + attn.proj(o)
        return x + blk.mlp(blk.norm2(x))

    def vision(self, pixel_values, vision_pos_ids, window_index, window_seg, image_seg):
        vis = self.visual
        hs = vis.patch_embed(pixel_values)
        n = hs.shape[0]
        hs = vis.permute_input_for_window_attn(hs, window_index, seq_len=n)
        cos, sin = vis.rotary_pos_emb(hs, vision_pos_ids)
        cos = vis.permute_input_for_window_attn(cos, window_index, seq_len=n)
        sin = vis.permute_input_for_window_attn(sin, window_index, seq_len=n)
        window_mask = _segment_bias(window_seg, hs.dtype)
        image_mask = _segment_bias(image_seg, hs.dtype)
        for i, blk in enumerate(vis.blocks):
            mask = image_mask if i in vis.fullatt_block_indexes else window_mask
            hs = self._vision_block(blk, hs, cos, sin, mask)
        merged = vis.merger(hs)
        # undo the window permutation: inverse[window_index[j]] = j
        arange = torch.arange(window_index.shape[0], dtype=window_index.dtype, device=window_index.device)
        inverse = torch.zeros_like(window_index).scatter(0, window_index, arange)
        return merged[inverse]

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        pixel_values,
        vision_pos_ids,
        window_index,
        window_seg,
        image_seg,
        image_embed_index,
    ):
        lm = self.lm
        image_embeds = self.vision(pixel_values, vision_pos_ids, window_index, window_seg, image_seg)
        embeds = lm.embed_tokens(input_ids)
        idx = image_embed_index.clamp(min=0)
        gathered = image_embeds[idx].to(embeds.dtype)
        embeds = torch.where((image_embed_index >= 0)[..., None], gathered, embeds)

        seq = input_ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
        mask = mask_bias(causal[None, None] & attention_mask.to(torch.bool)[:, None, None, :], embeds.dtype)
        cos, sin = lm.rotary_emb(embeds, position_ids)
        # The layers read their attention function from their config at call time: `attention` only
        # while this graph runs, so the shared model's own forward (torch references) is untouched.
        configs = {id(layer.self_attn.config): layer.self_attn.config for layer in lm.layers}.values()
        saved = [(config, config._attn_implementation) for config in configs]
        try:
            for config, _ in saved:
                config._attn_implementation = LM_ATTENTION
            hs = embeds
            for layer in lm.layers:
                hs = layer(
                    hs,
                    attention_mask=mask,
                    position_embeddings=(cos, sin),
                    position_ids=None,
                    past_key_values=None,
                    use_cache=False,
                )
        finally:
            for config, implementation in saved:
                config._attn_implementation = implementation
        return lm.norm(hs)
