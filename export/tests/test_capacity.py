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


# --- the whole-model plan of docs/real-scale.md ---------------------------------------------------


def test_text_encoder_and_vae_parameters_are_the_real_models():
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from export import scale

    for layers, depth in [(2, 2), (3, 9)]:
        vis = dict(scale.REAL_VISION, depth=depth, fullatt_block_indexes=scale.vision_fullatt(depth))
        cfg = Qwen2_5_VLConfig(text_config=dict(scale.REAL_TEXT, num_hidden_layers=layers), vision_config=vis)
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(cfg).model  # the graph's part: no lm_head
        assert capacity.text_encoder_params(layers, depth) == sum(p.numel() for p in model.parameters())
    assert 7.7e9 < capacity.text_encoder_params() < 7.8e9  # Qwen2.5-VL-7B: 8.29 B with its 0.54 B lm_head
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage(**scale.REAL_VAE)
    assert capacity.weights_gb()["_params"]["vae"] == sum(p.numel() for p in vae.parameters())


def test_traced_work_matches_the_analytic_transformer_and_counts_every_layer():
    """The meta-device tracer (text encoder, VAE) counts what the analytic transformer counts: run on diffusers'
    transformer at the real width (2 blocks), its GEMM FLOPs equal transformer_step's."""
    from diffusers import QwenImageTransformer2DModel

    cfg = {**capacity.QWEN_IMAGE_EDIT_2509, "num_layers": 2}
    shape = capacity.Shape(256, 256, batch=1, txt_tokens=64)
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**cfg)
        x = torch.zeros(1, shape.img_tokens, 64)
        e = torch.zeros(1, 64, 3584)
        t = torch.zeros(1)
    traced = capacity.trace(lambda: model(x, e, None, t, img_shapes=[[(1, 16, 16), (1, 16, 16)]], return_dict=False))
    ours = capacity.transformer_step(cfg, shape, capacity.BF16)
    # On meta tensors attention runs as torch's math path (two batched matmuls): traced GEMMs hold it too.
    assert sum(traced.flops.values()) == pytest.approx(ours.flops["gemm_bf16"] + ours.flops["attention"], rel=1e-6)


def test_plan_arithmetic():
    """Batch gains, edit totals and the fit rule follow from the stage works (small traced depths keep it fast)."""
    gpu = capacity.GPUS["h100-sxm"]
    te = capacity.text_encoder_work(batch=1, depth=2, layers=1)
    te2 = capacity.text_encoder_work(batch=2, depth=2, layers=1)
    assert te2.flops["gemm_bf16"] > 1.5 * te.flops["gemm_bf16"]
    # Weights are read once per batch: a memory-bound stage gains from batching, never loses.
    assert 1.0 <= 2 * capacity.seconds(te, gpu) / capacity.seconds(te2, gpu) <= 2.0
    cfg = capacity.QWEN_IMAGE_EDIT_2509

    def shape(b):
        return capacity.Shape(256, 256, batch=b)

    p = capacity.Plan(
        256,
        {
            "text_encoder": {1: te, 2: te2},
            "vae_encoder": {1: capacity.vae_work(256, "encoder")},
            "transformer": {b: capacity.transformer_step(cfg, shape(b), capacity.BF16) for b in (1, 2)},
            "vae_decoder": {1: capacity.vae_work(256, "decoder")},
        },
    )
    s = lambda w: capacity.seconds(w, gpu)  # noqa: E731 (a one-line helper for the table below)
    st = p.stages
    cfg40 = 2 * s(te) + s(st["vae_encoder"][1]) + 40 * s(st["transformer"][2]) + s(st["vae_decoder"][1])
    assert capacity.edit_seconds(p, gpu, 40, True) == pytest.approx(cfg40)
    lightning = s(te) + s(st["vae_encoder"][1]) + 8 * s(st["transformer"][1]) + s(st["vae_decoder"][1])
    assert capacity.edit_seconds(p, gpu, 8, False) == pytest.approx(lightning)
    assert capacity.vl_patches(384 * 384) == 784
