"""Tiny ONNX graphs for the ONNX Runtime backend tests (tests/fixtures/onnx_ort/), made deterministically.

Each graph is a few hundred bytes. `expected.json` holds inputs and onnxruntime's outputs for each graph,
so the Rust backend is checked against the same library the export checks use.
Run from the repo root: `.venv/bin/python -m export.goldens.ort_fixtures`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "onnx_ort"
OPSET = 17
IR_VERSION = 8

# y = x @ W + b with W[i, j] = (3 i + j - 5) / 4 and b = [0.5, -1, 0.25]: exact in f16 and bf16.
W = np.array([[(3 * i + j - 5) / 4 for j in range(3)] for i in range(4)], dtype=np.float32)
B = np.array([0.5, -1.0, 0.25], dtype=np.float32)
# Embedding table of the int64 graph: TABLE[i] = [i, -i / 2].
TABLE = np.array([[i, -i / 2] for i in range(5)], dtype=np.float32)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qwen-edit-fixtures")
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def matmul_add(elem: int | None) -> onnx.ModelProto:
    """x[batch, 4] -> y[batch, 3]; `elem` = IO element type when not f32 (Cast to f32 inside)."""
    io = elem if elem is not None else TensorProto.FLOAT
    nodes, x, y = [], "x", "y"
    if elem is not None:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
        x, y = "x32", "y32"
    nodes += [helper.make_node("MatMul", [x, "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], [y])]
    if elem is not None:
        nodes.append(helper.make_node("Cast", ["y32"], ["y"], to=elem))
    g = helper.make_graph(
        nodes,
        "matmul_add",
        [helper.make_tensor_value_info("x", io, ["batch", 4])],
        [helper.make_tensor_value_info("y", io, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")],
    )
    return _model(g)


def int64_gather() -> onnx.ModelProto:
    """ids int64[batch, seq], mask bool[batch, seq] -> emb f32[batch, seq, 2] (TABLE[ids], 0 where masked off)."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["g"], axis=0),
        helper.make_node("Unsqueeze", ["mask", "axis"], ["m"]),
        helper.make_node("Where", ["m", "g", "zero"], ["emb"]),
    ]
    g = helper.make_graph(
        nodes,
        "int64_gather",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", 2])],
        initializer=[
            numpy_helper.from_array(TABLE, "table"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    return _model(g)


def two_outputs() -> onnx.ModelProto:
    """x f32[n] -> neg f32[n] = -x, total f32[] = sum(x), len int64[1] = shape(x)."""
    nodes = [
        helper.make_node("Neg", ["x"], ["neg"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Shape", ["x"], ["len"]),
    ]
    g = helper.make_graph(
        nodes,
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [
            helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("len", TensorProto.INT64, [1]),
        ],
    )
    return _model(g)


def symbolic() -> onnx.ModelProto:
    """a f32[batch, <unnamed>, 8] -> mean f32[batch, 8] over axis 1; a dim without a name stays unnamed."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", None, 8])
    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["a"], ["mean"], axes=[1], keepdims=0)],
        "symbolic",
        [a],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 8])],
    )
    return _model(g)


# The FP8 Q/DQ fixture: y = DQ(Q(x)) @ DQ(W8) with a per-tensor activation scale and per-channel weight
# scales (the form export/fp8.py writes), no bias: the pattern ONNX Runtime's QDQ selector would turn into
# MatMulIntegerToFloat, which has no float8 kernel.
FP8_X_SCALE = 2.0**-5
FP8_W = np.array([[1.0, -0.5, 0.25], [2.0, 0.75, -1.5], [-0.375, 1.25, 3.0], [0.5, -2.0, 0.125]], dtype=np.float32)
FP8_W_SCALE = np.array([2.0**-7, 2.0**-7, 2.0**-6], dtype=np.float32)
FP8_OPSET = 21
FP8_IR_VERSION = 10


def matmul_fp8() -> onnx.ModelProto:
    """x f32[batch, 4] -> y f32[batch, 3] through FP8 Q/DQ (opset 21)."""
    import ml_dtypes

    w8 = (FP8_W / FP8_W_SCALE).astype(ml_dtypes.float8_e4m3fn)
    fp8 = TensorProto.FLOAT8E4M3FN
    inits = [
        numpy_helper.from_array(np.array(FP8_X_SCALE, dtype=np.float32), "x_scale"),
        helper.make_tensor("zero", fp8, [], np.zeros(1, np.uint8).tobytes(), raw=True),
        helper.make_tensor("w8", fp8, [4, 3], w8.view(np.uint8).tobytes(), raw=True),
        numpy_helper.from_array(FP8_W_SCALE, "w_scale"),
        helper.make_tensor("w_zero", fp8, [3], np.zeros(3, np.uint8).tobytes(), raw=True),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "zero"], ["xdq"]),
        helper.make_node("DequantizeLinear", ["w8", "w_scale", "w_zero"], ["wdq"], axis=1),
        helper.make_node("MatMul", ["xdq", "wdq"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "matmul_fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", FP8_OPSET)], producer_name="qwen-edit-fixtures")
    m.ir_version = FP8_IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def matmul_fp8_emulated(x: np.ndarray) -> np.ndarray:
    """What matmul_fp8 computes, in numpy (e4m3fn rounding by ml_dtypes, saturating at +-448)."""
    import ml_dtypes

    xq = np.clip(x / FP8_X_SCALE, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * FP8_X_SCALE
    w = (FP8_W / FP8_W_SCALE).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * FP8_W_SCALE
    return (xq.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)


def _np_dtype(name: str):
    import ml_dtypes

    return {
        "float32": np.float32,
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
        "int64": np.int64,
        "bool": np.bool_,
    }[name]


# Inputs of each graph for the reference run: name -> (dtype, shape, values).
CASES = {
    "matmul_add_f32": {"x": ("float32", [2, 4], [1, 0.5, -2, 3, 0, 1, 0.25, -1])},
    "matmul_add_f16": {"x": ("float16", [2, 4], [1, 0.5, -2, 3, 0, 1, 0.25, -1])},
    "matmul_add_bf16": {"x": ("bfloat16", [2, 4], [1, 0.5, -2, 3, 0, 1, 0.25, -1])},
    "int64_gather": {
        "ids": ("int64", [2, 3], [0, 4, 2, 1, 1, 3]),
        "mask": ("bool", [2, 3], [1, 1, 0, 1, 0, 1]),
    },
    "two_outputs": {"x": ("float32", [5], [1, -2, 3.5, 0.25, 4])},
    "symbolic": {"a": ("float32", [1, 2, 8], [float(i) for i in range(16)])},
    # 1.1 / 2^-5 = 35.2 rounds to 36 (e4m3: 4 significant bits); 20 saturates at 448 * 2^-5 = 14.
    "matmul_fp8": {"x": ("float32", [2, 4], [1.1, -0.3, 2.7, 0.05, 20.0, -0.9, 0.33, -3.3])},
}


def _run(sess, feeds: dict) -> list:
    """sess.run, except bfloat16 (which onnxruntime's numpy bridge lacks) goes through OrtValues bound
    to uint16 buffers; the outputs of a bf16 graph have the inputs' shapes (true of our fixtures)."""
    import ml_dtypes
    import onnxruntime as ort

    if not any(a.dtype == ml_dtypes.bfloat16 for a in feeds.values()):
        return sess.run(None, feeds)
    bind = sess.io_binding()
    bufs = []
    for k, a in feeds.items():
        bind.bind_ortvalue_input(
            k, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(np.uint16), TensorProto.BFLOAT16)
        )
    for o in sess.get_outputs():
        shape = [next(iter(feeds.values())).shape[0] if isinstance(d, str) else d for d in o.shape]
        buf = np.zeros(shape, dtype=np.uint16)
        bind.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(buf, TensorProto.BFLOAT16))
        bufs.append(buf)
    sess.run_with_iobinding(bind)
    return [b.view(ml_dtypes.bfloat16) for b in bufs]


def main() -> None:
    import onnxruntime as ort

    OUT.mkdir(parents=True, exist_ok=True)
    models = {
        "matmul_add_f32": matmul_add(None),
        "matmul_add_f16": matmul_add(TensorProto.FLOAT16),
        "matmul_add_bf16": matmul_add(TensorProto.BFLOAT16),
        "int64_gather": int64_gather(),
        "two_outputs": two_outputs(),
        "symbolic": symbolic(),
        "matmul_fp8": matmul_fp8(),
    }
    expected = {}
    for name, model in models.items():
        path = OUT / f"{name}.onnx"
        path.write_bytes(model.SerializeToString(deterministic=True))
        # The default SessionOptions of onnxruntime (ORT_ENABLE_ALL), as the export checks use; for the FP8
        # graph with the QDQ selector off, as the export and the Rust backend build its sessions.
        opts = ort.SessionOptions()
        if name == "matmul_fp8":
            opts.add_session_config_entry("optimization.disable_specified_optimizers", "QDQSelectorActionTransformer")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {k: np.array(v, dtype=_np_dtype(dt)).reshape(shape) for k, (dt, shape, v) in CASES[name].items()}
        outs = _run(sess, feeds)
        if name == "matmul_fp8":
            assert np.array_equal(outs[0], matmul_fp8_emulated(feeds["x"])), (
                "ORT's FP8 Q/DQ differs from e4m3fn rounding"
            )
        expected[name] = {
            "inputs": {
                k: {"dtype": dt, "shape": shape, "data": [float(x) for x in v]}
                for k, (dt, shape, v) in CASES[name].items()
            },
            "outputs": {
                o.name: {"shape": list(r.shape), "data": [float(x) for x in np.asarray(r, dtype=np.float64).ravel()]}
                for o, r in zip(sess.get_outputs(), outs, strict=True)
            },
        }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(models)} graphs and expected.json to {OUT}")


if __name__ == "__main__":
    main()
