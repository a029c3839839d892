"""Host-side tensors of the text-encoder and transformer graphs, computed in Python the way the
reference does (transformers' vision_utils / get_rope_index, diffusers' QwenEmbedRope).

The Rust pipeline ports these functions; the exporter uses them to verify graphs against torch and
the reference script stores their outputs as reference vectors.
"""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index


def segments_from_cu(cu: torch.Tensor, n: int) -> torch.Tensor:
    """Segment id of each of `n` positions from cumulative boundaries [0, c1, c2, ..., n]."""
    seg = torch.zeros(n, dtype=torch.int64)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        seg[a:b] = s
    return seg


def text_encoder_inputs(model, model_inputs, image_slots=None) -> dict[str, torch.Tensor]:
    """Graph inputs of `text_encoder` from the processor's output (`input_ids`, `attention_mask`,
    `pixel_values`, `image_grid_thw`, `mm_token_type_ids`) and the HF model (for `get_rope_index`).

    `image_slots[r]` lists, for prompt row r, the indices (into image_grid_thw) of its images; by
    default images are assigned to rows in order, as the processor lays them out.
    """
    cfg = model.config
    vcfg = cfg.vision_config
    input_ids = model_inputs["input_ids"]
    attention_mask = model_inputs["attention_mask"]
    grid = model_inputs["image_grid_thw"]
    pixel_values = model_inputs["pixel_values"].to(torch.float32)

    position_ids, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=model_inputs["mm_token_type_ids"],
        image_grid_thw=grid,
        attention_mask=attention_mask,
    )
    vision_pos_ids = get_vision_position_ids(grid, vcfg.spatial_merge_size)
    window_index, cu_window = get_vision_window_index(
        grid, spatial_merge_size=vcfg.spatial_merge_size, window_size=vcfg.window_size, patch_size=vcfg.patch_size
    )
    cu_full = get_vision_cu_seqlens(grid)
    n = pixel_values.shape[0]
    window_seg = segments_from_cu(cu_window, n)
    image_seg = segments_from_cu(cu_full, n)

    # Merged vision tokens are laid out image after image; each <|image_pad|> token of a row takes
    # the next merged token of that row's images (HF's masked_scatter order).
    merge = vcfg.spatial_merge_size**2
    counts = (grid.prod(-1) // merge).tolist()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    if image_slots is None:
        image_slots, k = [], 0
        for r in range(input_ids.shape[0]):
            n_tok = int((input_ids[r] == cfg.image_token_id).sum())
            slots = []
            while n_tok > 0:
                slots.append(k)
                n_tok -= counts[k]
                k += 1
            image_slots.append(slots)
    image_embed_index = torch.full_like(input_ids, -1)
    for r, slots in enumerate(image_slots):
        order = [starts[s] + j for s in slots for j in range(counts[s])]
        pos = (input_ids[r] == cfg.image_token_id).nonzero().flatten().tolist()
        assert len(pos) == len(order), "image tokens do not match the row's images"
        image_embed_index[r, pos] = torch.tensor(order, dtype=torch.int64)

    return {
        "input_ids": input_ids.to(torch.int64),
        "attention_mask": attention_mask.to(torch.int64),
        "position_ids": position_ids.to(torch.int64),
        "pixel_values": pixel_values,
        "vision_pos_ids": vision_pos_ids.to(torch.int64),
        "window_index": window_index.to(torch.int64),
        "window_seg": window_seg,
        "image_seg": image_seg,
        "image_embed_index": image_embed_index,
    }


def rope_tables(img_shapes, txt_len: int, axes_dim=(16, 56, 56), theta: int = 10000):
    """Real cos/sin tables [img_seq, D/2], [txt_len, D/2] equal to diffusers' QwenEmbedRope
    (scale_rope=True) for one sample's image shapes [(frame, h, w), ...] (latent-patch units)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    rope = QwenEmbedRope(theta=theta, axes_dim=list(axes_dim), scale_rope=True)
    vid, txt = rope([list(img_shapes)], device=torch.device("cpu"), max_txt_seq_len=txt_len)
    return vid.real.contiguous(), vid.imag.contiguous(), txt.real.contiguous(), txt.imag.contiguous()


def modulate_index(img_shapes, batch: int) -> torch.Tensor:
    """zero_cond_t: 0 for the target tokens (first shape), 1 for the condition tokens."""
    import math

    first = math.prod(img_shapes[0])
    rest = sum(math.prod(s) for s in img_shapes[1:])
    row = torch.tensor([0] * first + [1] * rest, dtype=torch.int64)
    return row.unsqueeze(0).expand(batch, -1).contiguous()
