"""Tests of the FP8 export (export/fp8.py): which layers get Q/DQ and which are kept, the form of the
rewritten graph (what TensorRT and ONNX Runtime need), FP8 rounding and scales, and that the graph
computes the fake-quantized model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from export import bundle, fp8
from export import onnx_export as ox

ROOT = Path(__file__).resolve().parents[2]
TINY_CKPT = ROOT / "engines/tiny-checkpoints/edit"
PER_BLOCK = [
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
]
KEPT = {
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "img_in",
    "txt_in",
    "norm_out.linear",
    "proj_out",
}


def real_architecture(layers: int = 2):
    """QwenImageTransformer2DModel at the real widths (24 heads of 128, joint dim 3584), on the meta device."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(num_layers=layers)


@pytest.fixture(scope="module")
def transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(str(TINY_CKPT / "transformer")).eval()


@pytest.fixture(scope="module")
def quantized(transformer):
    """The committed tiny fp32 transformer graph rewritten with FP8 Q/DQ (every input amax 4)."""
    layers = fp8.placement(transformer)
    amax = {ly.name: 4.0 for ly in layers}
    model = onnx.load(str(ROOT / "engines/tiny/transformer.onnx"))
    model, in_graph = fp8.quantize_graph(model, transformer, layers, amax, torch.float32)
    return model, in_graph, layers, amax


# --- placement ----------------------------------------------------------------------------------


def test_placement_at_the_real_widths_quantizes_the_block_projections_and_mlps_only():
    layers = fp8.placement(real_architecture(2))
    by_name = {ly.name: ly for ly in layers}
    want = {f"transformer_blocks.{b}.{k}" for b in range(2) for k in PER_BLOCK}
    assert {ly.name for ly in layers if ly.fp8} == want
    kept = {ly.name for ly in layers if not ly.fp8}
    assert kept == KEPT | {f"transformer_blocks.{b}.{m}.1" for b in range(2) for m in ("img_mod", "txt_mod")}
    # Every decision has its reason; the kept layers name what they are.
    assert all(ly.reason for ly in layers)
    assert "first projection" in by_name["img_in"].reason and "velocity" in by_name["proj_out"].reason
    assert "AdaLN" in by_name["transformer_blocks.1.img_mod.1"].reason
    assert "timestep" in by_name["time_text_embed.timestep_embedder.linear_2"].reason
    # The real shapes: 3072-wide projections, MLP 3072 -> 12288 -> 3072, text in from 3584.
    assert (by_name["transformer_blocks.0.img_mlp.net.0.proj"].in_features, by_name["txt_in"].in_features) == (
        3072,
        3584,
    )
    assert by_name["transformer_blocks.0.img_mlp.net.2"].in_features == 12288


def test_keep_patterns_keep_more_layers():
    t = real_architecture(3)
    layers = fp8.placement(t, keep=("img_mlp", "transformer_blocks.2.attn.to_out.0"))
    kept = {ly.name: ly.reason for ly in layers if not ly.fp8}
    for b in range(3):
        assert f"transformer_blocks.{b}.img_mlp.net.0.proj" in kept and f"transformer_blocks.{b}.img_mlp.net.2" in kept
    assert kept["transformer_blocks.2.attn.to_out.0"] == "kept by --fp8-keep"
    assert "transformer_blocks.1.attn.to_out.0" not in kept
    assert "transformer_blocks.0.txt_mlp.net.2" not in kept, "a pattern is a module prefix, not a substring"
    assert sum(ly.fp8 for ly in layers) == 3 * 12 - 3 * 2 - 1


# --- rounding and scales ------------------------------------------------------------------------


def test_fp8_rounding_is_onnx_runtimes_quantize_linear():
    import onnxruntime as ort
    from onnx import helper

    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-4, 3, 20000),
            np.array([448, 449, 464, 465, 1e6, -1e6, 0.0, -0.0, 2.0**-9, 2.0**-10, 3 * 2.0**-11], np.float32),
        ]
    ).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(x)])],
        initializer=[
            numpy_helper.from_array(np.array(1.0, np.float32), "s"),
            helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ours = fp8.to_fp8(torch.from_numpy(x)).float().numpy()
    assert np.array_equal(ours, y), "round to nearest even, saturating at 448, as QuantizeLinear"
    assert ours[-11] == 448 and ours[-9] == 448 and ours[-7] == 448 and ours[-6] == -448


def test_scales():
    assert fp8.activation_scale(448.0) == 1.0
    assert fp8.activation_scale(449.0) == 2.0
    assert fp8.activation_scale(5.66) == 2.0**-6  # 5.66 / 448 = 0.0126 -> 2^-6 = 0.0156: clip at 7
    for amax in (1e-3, 0.37, 3.0, 1234.5):
        s = fp8.activation_scale(amax)
        assert math.log2(s).is_integer() and amax / 448 <= s < 2 * amax / 448
    assert fp8.activation_scale(0.0) == 1.0 and fp8.activation_scale(float("nan")) == 1.0
    w = torch.tensor([[1.0, -3.0], [0.0, 0.0], [0.5, 0.25]])
    s = fp8.weight_scales(w, torch.float32)
    assert torch.equal(s, torch.tensor([3.0 / 448, 1.0, 0.5 / 448]))  # a zero row gets a positive scale
    assert fp8.weight_scales(w, torch.bfloat16).tolist() == s.to(torch.bfloat16).float().tolist()
    w8, _ = fp8.quantize_weight(w, torch.float32)
    assert w8.dtype == torch.float8_e4m3fn and w8.float().abs().max() == 448


# --- the rewritten graph ------------------------------------------------------------------------


def _producers(g):
    return {o: n for n in g.node for o in n.output}


def _consumers(g):
    out = {}
    for n in g.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def test_qdq_sits_exactly_on_the_fp8_layers(quantized):
    model, in_graph, layers, _ = quantized
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = _producers(g)
    assert next(o.version for o in model.opset_import if o.domain == "") >= 21 and model.ir_version >= 9
    # The exporter prunes the last block's text-stream output layers (their output is unused).
    absent = {
        "transformer_blocks.1.attn.to_add_out",
        "transformer_blocks.1.txt_mlp.net.0.proj",
        "transformer_blocks.1.txt_mlp.net.2",
    }
    want = {f"transformer_blocks.{b}.{k}" for b in range(2) for k in PER_BLOCK} - absent
    assert set(in_graph) == want and len(want) == 21

    quantized_nodes, float_weight_nodes, activation_matmuls = set(), set(), []
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        w = n.input[1]
        if w in inits:
            float_weight_nodes.add(n.name)
            assert inits[w].data_type == TensorProto.FLOAT
            assert prod.get(n.input[0]) is None or prod[n.input[0]].op_type != "DequantizeLinear", (
                f"{n.name}: kept layer with Q/DQ input"
            )
        elif w in prod and prod[w].op_type == "DequantizeLinear":
            quantized_nodes.add(n.name)
        else:
            activation_matmuls.append(n)
    assert quantized_nodes == set(in_graph.values())
    # Kept linear layers: img_in, txt_in, proj_out (MatMul) and the time embedding, modulations, norm_out (Gemm).
    assert len(float_weight_nodes) == 3 + 2 + 2 * 2 + 1
    # Attention: Q.K^T and P.V of each block stay unquantized, as do the softmaxes.
    assert len(activation_matmuls) == 4
    for n in activation_matmuls + [n for n in g.node if n.op_type == "Softmax"]:
        assert all(
            prod.get(i) is None or prod[i].op_type not in ("DequantizeLinear", "QuantizeLinear") for i in n.input
        ), n.name


def test_qdq_form_is_what_tensorrt_takes(quantized):
    model, in_graph, layers, amax = quantized
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod, cons = _producers(g), _consumers(g)
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == len(qs) + len(in_graph), "one DQ per activation Q, one per weight"
    for q in qs:
        # Nothing between Q and DQ; per-tensor scalar scale (a power of two), zero point FP8 zero.
        (dq,) = cons[q.output[0]]
        assert dq.op_type == "DequantizeLinear" and dq.input[1:] == q.input[1:]
        scale, zp = inits[q.input[1]], inits[q.input[2]]
        assert list(scale.dims) == [] and math.log2(float(numpy_helper.to_array(scale))).is_integer()
        assert zp.data_type == TensorProto.FLOAT8E4M3FN and zp.raw_data == b"\x00"
        assert not any(a.name == "saturate" for a in q.attribute), "saturate=1 (the default) is what TensorRT does"
        # The DQ output feeds only quantized GEMMs, as their activation input.
        assert all(c.op_type in ("MatMul", "Gemm") and c.input[0] == dq.output[0] for c in cons[dq.output[0]])
    weight_dqs = [d for d in dqs if d.input[0] in inits]
    assert len(weight_dqs) == len(in_graph)
    for d in weight_dqs:
        w8, scale, zp = (inits[i] for i in d.input)
        assert w8.data_type == TensorProto.FLOAT8E4M3FN and len(w8.dims) == 2
        axis = next(a.i for a in d.attribute if a.name == "axis")
        (consumer,) = cons[d.output[0]]
        assert consumer.op_type == "MatMul" and consumer.input[1] == d.output[0] and axis == 1, (
            "W^T [in, out]: channels on axis 1"
        )
        assert list(scale.dims) == [w8.dims[1]] and list(zp.dims) == [w8.dims[1]] and set(zp.raw_data) == {0}
        assert np.all(numpy_helper.to_array(scale) > 0)
    # Shared activations share one Q/DQ: to_q/to_k/to_v read one tensor, add_q/k/v_proj another.
    shared = {
        prod[c.input[0]].name
        for c in g.node
        if c.name in {in_graph[f"transformer_blocks.0.attn.to_{x}"] for x in "qkv"}
    }
    assert len(shared) == 1
    # The float weights of the quantized layers are gone: every initializer left is used.
    used = {i for n in g.node for i in n.input}
    assert all(t.name in used for t in g.initializer)


def test_graph_computes_the_fake_quantized_model(quantized, transformer, tmp_path):
    model, _, layers, amax = quantized
    path = tmp_path / "t.onnx"
    onnx.save(model, str(path))
    assert ox.carries_fp8(path) and not ox.carries_fp8(ROOT / "engines/tiny/transformer.onnx")
    ckpt_pipe = type("P", (), {"transformer": transformer})()
    names = [i.name for i in model.graph.input]
    args, kw = bundle._transformer_inputs(ckpt_pipe, [(1, 8, 8), (1, 8, 8)], 1, 12, torch.float32, 3)
    out = ox.run_ort(path, {k: v.numpy() for k, v in zip(names, args, strict=True)})[0]
    with torch.no_grad():
        ref = transformer(**kw, return_dict=False)[0].numpy()
        with fp8._FakeQuant(transformer, layers, amax, torch.float32):
            fq = transformer(**kw, return_dict=False)[0].numpy()
    # Equal up to FP8 rounding flips of values within float32 noise of a boundary (fp8.FAKE_QUANT_RATIO).
    vs_fq, vs_ref = ox.rel_l2(out, fq), ox.rel_l2(out, ref)
    assert vs_fq < 0.25 * vs_ref and 1e-3 < vs_ref < 0.1, (vs_fq, vs_ref)


def test_opset_upgrade_keeps_the_graph(tmp_path):
    model = onnx.load(str(ROOT / "engines/tiny/transformer.onnx"))
    up = fp8.ensure_opset(onnx.load(str(ROOT / "engines/tiny/transformer.onnx")))
    assert next(o.version for o in up.opset_import if o.domain == "") == 21
    assert [n.op_type for n in up.graph.node] == [n.op_type for n in model.graph.node]
    assert {t.name: t.raw_data for t in up.graph.initializer} == {t.name: t.raw_data for t in model.graph.initializer}


# --- the export command -------------------------------------------------------------------------


def test_cli_fp8_bundle_with_report(tmp_path):
    from export.__main__ import main

    out, report = tmp_path / "b", tmp_path / "r.json"
    code = main(
        ["bundle", "--checkpoint", str(TINY_CKPT), "--out", str(out), "--vae-area", "16384", "--precision", "fp8",
         "--calibration-runs", "1", "--calibration-steps", "2", "--fp8-keep", "img_mlp", "--report", str(report)]
    )  # fmt: skip
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]["transformer"]
    assert (q["format"], q["weights"], q["activations"], q["layers"]) == (
        "float8e4m3fn",
        "per-channel",
        "per-tensor",
        17,
    )
    assert "img_mlp" in q["kept"] and q["calibration"] == {"method": "max", "runs": 1, "steps": 2, "calls": 4}
    r = json.loads(report.read_text())["fp8"]
    rows = {row["name"]: row for row in r["layers"]}
    assert not rows["transformer_blocks.0.img_mlp.net.2"]["fp8"] and rows["transformer_blocks.0.attn.to_q"]["fp8"]
    assert rows["transformer_blocks.0.attn.to_q"]["onnx_node"] and rows["proj_out"]["onnx_node"] is None
    assert all(row["output_sqnr_db"] > 15 for row in r["layers"]), "each layer's FP8 error on the held-out run"
    assert len(r["verification"]) == 6 and all(v["rel_l2_vs_unquantized"] < 0.1 for v in r["verification"])
    assert ox.run_ort(out / "transformer.onnx", _random_feeds(out / "transformer.onnx"))[0].shape[0] == 2
    assert m["components"]["transformer"]["sha256"] == bundle._file_sha256(out / "transformer.onnx")


def _random_feeds(path):
    ins, _ = ox.io_contract(path)
    sizes = {"batch": 2, "img_seq": 32, "txt_seq": 9}
    rng = np.random.default_rng(0)
    return {
        i["name"]: np.ones([sizes.get(d, d) for d in i["shape"]], np.int64)
        if i["dtype"] == "int64"
        else rng.standard_normal([sizes.get(d, d) if isinstance(d, str) else d for d in i["shape"]]).astype(np.float32)
        for i in ins
    }


def test_cli_fp8_options_need_fp8(tmp_path):
    from export.__main__ import main

    base = ["bundle", "--checkpoint", str(TINY_CKPT), "--out", str(tmp_path / "x")]
    assert main([*base, "--fp8-keep", "img_mlp"]) == 2
    assert main([*base, "--precision", "fp8", "--calibration-runs", "0"]) == 2
    assert not (tmp_path / "x").exists()
