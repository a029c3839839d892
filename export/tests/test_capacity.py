"""Tests of scripts/capacity.py: its layer list is diffusers' QwenImageTransformer2DModel, its FP8 placement
is the exporter's, and its arithmetic is what its docs say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from export import fp8

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("capacity", ROOT / "scripts/capacity.py")
capacity = importlib.util.module_from_spec(_spec)
sys.modules["capacity"] = capacity  # dataclasses look their module up
_spec.loader.exec_module(capacity)


def diffusers_model(layers: int):
    from diffusers import QwenImageTransformer2DModel

    cfg = {**capacity.QWEN_IMAGE_EDIT_2509, "num_layers": layers}
    with torch.device("meta"):
        return QwenImageTransformer2DModel(**cfg)


def test_layers_are_diffusers_linears_at_the_real_widths():
    model = diffusers_model(3)
    theirs = [
        (n, m.in_features, m.out_features, m.bias is not None)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    ours = capacity.transformer_layers({**capacity.QWEN_IMAGE_EDIT_2509, "num_layers": 3})
    assert [(ly.name, ly.in_features, ly.out_features, True) for ly in ours] == theirs
    # Everything but the linears (norm weights) is a rounding error of the parameter count.
    linear = sum(ly.params for ly in ours)
    total = sum(p.numel() for p in model.parameters())
    assert linear <= total < linear * 1.0001


def test_the_real_model_has_20_billion_parameters():
    layers = capacity.transformer_layers(capacity.QWEN_IMAGE_EDIT_2509)
    assert 20.4e9 < sum(ly.params for ly in layers) < 20.5e9
    assert len(layers) == 4 + 60 * 14 + 2  # per block: 2 modulations, 8 attention projections, 2 MLPs of 2


def test_fp8_placement_is_the_exporters():
    assert tuple(fp8.FP8_LAYERS) == capacity.FP8_BLOCK_LAYERS
    model = diffusers_model(2)
    cfg = {**capacity.QWEN_IMAGE_EDIT_2509, "num_layers": 2}
    for recipe, keep in [(capacity.FP8, ()), (capacity.FP8_KEEP_IMG_MLP, ("img_mlp",))]:
        theirs = {ly.name: ly.fp8 for ly in fp8.placement(model, keep)}
        ours = {ly.name: capacity.precision_of(ly, recipe) == "fp8" for ly in capacity.transformer_layers(cfg)}
        assert ours == theirs, recipe.name
    assert all(capacity.precision_of(ly, capacity.BF16) == "bf16" for ly in capacity.transformer_layers(cfg))


def test_arithmetic():
    cfg = capacity.QWEN_IMAGE_EDIT_2509
    shape = capacity.Shape(1024, 1024, batch=2)
    assert shape.img_tokens == 2 * 64 * 64
    assert capacity.Shape(1024, 768, condition_images=2).img_tokens == 3 * 64 * 48
    bf16 = capacity.transformer_step(cfg, shape, capacity.BF16)
    q = capacity.transformer_step(cfg, shape, capacity.FP8)
    # Same FLOPs, moved to FP8; fewer bytes (1-byte weights and GEMM inputs).
    assert sum(bf16.flops.values()) == pytest.approx(sum(q.flops.values()))
    assert q.flops["gemm_fp8"] > 0 and "gemm_fp8" not in bf16.flops
    assert sum(q.bytes.values()) < sum(bf16.bytes.values())
    # One image-stream GEMM: 2 x rows x in x out.
    inner = 24 * 128
    assert bf16.ops[2] == (
        "gemm_bf16",
        2.0 * 2 * 8192 * 64 * inner,
        (64 * inner + inner) * 2 + 2 * 8192 * (64 + inner) * 2,
    )
    h100 = capacity.GPUS["h100-sxm"]
    t_bf16, t_fp8 = sum(capacity.roofline(bf16, h100).values()), sum(capacity.roofline(q, h100).values())
    assert t_fp8 < t_bf16 < 2 * t_fp8, "attention and elementwise work stay bf16"
    assert capacity.weight_bytes(capacity.transformer_layers(cfg), capacity.FP8) < 0.7 * 2 * 20.43e9
    with pytest.raises(ValueError, match="no FP8"):
        capacity.roofline(q, capacity.GPUS["a100-sxm"])


def test_cli(tmp_path, capsys):
    out = tmp_path / "t.md"
    assert capacity.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "Projection, not a measurement" in text and "| fp8 |" in text and "| bf16 |" in text
    assert capacity.main(["--gpu", "tpu"]) == 2 and capacity.main(["--side", "1000"]) == 2
