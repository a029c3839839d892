"""Small ONNX graphs for the ONNX inspection and profile tests (tests/fixtures/onnx/), made deterministically.

They carry the IO contracts of engines/README.md (symbolic dims `batch`, `img_seq`, `txt_seq`, `lh`, `lw`),
external data, an old-IR graph that lists its weights as inputs, an FP8 Q/DQ graph and a bf16 graph.
Run from the repo root: `.venv/bin/python -m export.goldens.onnx_fixtures`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "onnx"
PRODUCER = "qwen-edit-fixtures"


def _model(graph: onnx.GraphProto, opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER)
    m.ir_version = ir_version
    return m


def _save(m: onnx.ModelProto, name: str, check: bool = True) -> None:
    if check:
        onnx.checker.check_model(m, full_check=True)
    (OUT / name).write_bytes(m.SerializeToString(deterministic=True))


def transformer_io() -> None:
    """The transformer's IO contract (joint dim 32 for the fixture); sample = hidden_states * img_cos."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("hidden_states", f, ["batch", "img_seq", 64]),
        helper.make_tensor_value_info("encoder_hidden_states", f, ["batch", "txt_seq", 32]),
        helper.make_tensor_value_info("encoder_hidden_states_mask", i64, ["batch", "txt_seq"]),
        helper.make_tensor_value_info("timestep", f, ["batch"]),
        helper.make_tensor_value_info("img_cos", f, ["img_seq", 64]),
        helper.make_tensor_value_info("img_sin", f, ["img_seq", 64]),
        helper.make_tensor_value_info("txt_cos", f, ["txt_seq", 64]),
        helper.make_tensor_value_info("txt_sin", f, ["txt_seq", 64]),
    ]
    out = helper.make_tensor_value_info("sample", f, ["batch", "img_seq", 64])
    g = helper.make_graph(
        [helper.make_node("Mul", ["hidden_states", "img_cos"], ["sample"])], "transformer_io", inputs, [out]
    )
    _save(_model(g), "transformer_io.onnx")


def text_encoder_io() -> None:
    """The text encoder's IO contract (hidden 16); hidden_states = float(input_ids)[..., None] @ W."""
    i64, f = TensorProto.INT64, TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", i64, [3, "batch", "seq"]),
        helper.make_tensor_value_info("pixel_values", f, ["patches", 1176]),
        helper.make_tensor_value_info("vision_pos_ids", i64, ["patches", 2]),
        helper.make_tensor_value_info("window_index", i64, ["units"]),
        helper.make_tensor_value_info("window_seg", i64, ["patches"]),
        helper.make_tensor_value_info("image_seg", i64, ["patches"]),
        helper.make_tensor_value_info("image_embed_index", i64, ["batch", "seq"]),
    ]
    out = helper.make_tensor_value_info("hidden_states", f, ["batch", "seq", 16])
    w = numpy_helper.from_array(np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16), "W")
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axes"], ["ids_3d"]),
        helper.make_node("MatMul", ["ids_3d", "W"], ["hidden_states"]),
    ]
    g = helper.make_graph(nodes, "text_encoder_io", inputs, [out], [w, axes])
    _save(_model(g), "text_encoder_io.onnx")


def vae_encoder_io() -> None:
    """The VAE encoder's IO contract: 8x8 average pooling, then a 1x1 conv to 16 latent channels."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", 16, "lh", "lw"])
    w = numpy_helper.from_array(np.linspace(-1, 1, 48, dtype=np.float32).reshape(16, 3, 1, 1), "W")
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Conv", ["pooled", "W"], ["latent"]),
    ]
    g = helper.make_graph(nodes, "vae_encoder_io", [x], [y], [w])
    _save(_model(g), "vae_encoder_io.onnx")


def old_ir_weights() -> None:
    """IR 3: the weight W is also listed among the graph inputs (as old exporters did)."""
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    w_in = helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "old_ir", [x, w_in], [y], [w])
    _save(_model(g, opset=9, ir_version=3), "old_ir_weights.onnx")


def external() -> None:
    """fp16 weights stored in external.onnx.data (8 KiB), as the real >2 GB graphs are."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float16), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 64])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "external", [x], [y], [w])
    m = _model(g)
    onnx.external_data_helper.convert_model_to_external_data(
        m, all_tensors_to_one_file=True, location="external.onnx.data", size_threshold=0
    )
    # writes external.onnx.data and strips the raw bytes from the model that points at it
    (OUT / "external.onnx.data").unlink(missing_ok=True)
    m = onnx.external_data_helper.write_external_data_tensors(m, str(OUT))
    (OUT / "external.onnx").write_bytes(m.SerializeToString(deterministic=True))
    onnx.checker.check_model(str(OUT / "external.onnx"))


def fp8_qdq() -> None:
    """y = DQ(Q(x)) @ W in fp16 with an FP8 (e4m3fn) zero point: what a Q/DQ-quantized export carries."""
    rng = np.random.default_rng(8)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 16])
    scale = numpy_helper.from_array(np.array(0.5, dtype=np.float16), "scale")
    zero = helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, [], [0.0])
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float16), "W")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
        helper.make_node("MatMul", ["xd", "W"], ["y"]),
    ]
    g = helper.make_graph(nodes, "fp8_qdq", [x], [y], [scale, zero, w])
    _save(_model(g, opset=21, ir_version=10), "fp8_qdq.onnx")


def vae_decoder_bf16() -> None:
    """The decoder's input contract in bf16 (a 1x1 conv to 3 channels stands in for the network)."""
    rng = np.random.default_rng(16)
    w = helper.make_tensor(
        "W", TensorProto.BFLOAT16, [3, 16, 1, 1], rng.standard_normal(48).astype(np.float32).tolist()
    )
    x = helper.make_tensor_value_info("latent", TensorProto.BFLOAT16, ["batch", 16, "lh", "lw"])
    y = helper.make_tensor_value_info("image", TensorProto.BFLOAT16, ["batch", 3, "lh", "lw"])
    g = helper.make_graph([helper.make_node("Conv", ["latent", "W"], ["image"])], "vae_decoder", [x], [y], [w])
    _save(_model(g, opset=22, ir_version=10), "vae_decoder_bf16.onnx")


def unsupported_dtype() -> None:
    """A float64 input: not a dtype the engines take."""
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch"])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch"])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "f64", [x], [y])
    _save(_model(g), "unsupported_dtype.onnx")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    transformer_io()
    text_encoder_io()
    vae_encoder_io()
    old_ir_weights()
    external()
    fp8_qdq()
    vae_decoder_bf16()
    unsupported_dtype()
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(OUT.parents[1])}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
