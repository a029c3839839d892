"""torch -> ONNX (dynamo exporter, opset 18) for the graph wrappers, plus clean-up and verification.

Saved graphs carry no exporter metadata (stack traces, source locations); graphs over 2 GB keep
their weights in external data files next to the .onnx file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export import Dim

from . import graphs

OPSET = 18
# Protobuf cannot hold more than 2 GB: above this, weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

ONNX_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass
class GraphSpec:
    """One component: its wrapper module, example inputs and dynamic dims."""

    name: str
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]
    example: tuple
    dynamic_shapes: tuple


def _dims():
    batch = Dim("batch", min=1, max=256)
    return batch


def transformer_spec(transformer, example) -> GraphSpec:
    g = graphs.TransformerGraph(transformer).eval()
    batch = Dim("batch", min=1, max=256)
    img_seq = Dim("img_seq", min=2, max=262144)
    txt_seq = Dim("txt_seq", min=1, max=4096)
    shapes = [
        {0: batch, 1: img_seq},
        {0: batch, 1: txt_seq},
        {0: batch, 1: txt_seq},
        {0: batch},
        {0: img_seq},
        {0: img_seq},
        {0: txt_seq},
        {0: txt_seq},
    ]
    if g.zero_cond_t:
        shapes.append({0: batch, 1: img_seq})
    return GraphSpec("transformer", g, g.input_names(), ["sample"], tuple(example), tuple(shapes))


def vae_encoder_spec(vae, example) -> GraphSpec:
    g = graphs.VaeEncoderGraph(vae).eval()
    batch = Dim("batch", min=1, max=256)
    h, w = Dim("lh", min=1, max=1024), Dim("lw", min=1, max=1024)
    shapes = ({0: batch, 2: 8 * h, 3: 8 * w},)
    return GraphSpec("vae_encoder", g, ["image"], ["latent"], tuple(example), shapes)


def vae_decoder_spec(vae, example) -> GraphSpec:
    g = graphs.VaeDecoderGraph(vae).eval()
    batch = Dim("batch", min=1, max=256)
    h, w = Dim("lh", min=1, max=1024), Dim("lw", min=1, max=1024)
    shapes = ({0: batch, 2: h, 3: w},)
    return GraphSpec("vae_decoder", g, ["latent"], ["image"], tuple(example), shapes)


def text_encoder_spec(text_encoder, example) -> GraphSpec:
    g = graphs.TextEncoderGraph(text_encoder).eval()
    batch = Dim("batch", min=1, max=256)
    seq = Dim("seq", min=2, max=32768)
    units = Dim("units", min=1, max=262144)
    patches = 4 * units
    shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: seq},
        {1: batch, 2: seq},
        {0: patches},
        {0: patches},
        {0: units},
        {0: patches},
        {0: patches},
        {0: batch, 1: seq},
    )
    return GraphSpec("text_encoder", g, list(graphs.TextEncoderGraph.INPUTS), ["hidden_states"], tuple(example), shapes)


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Removes exporter metadata (stack traces, namespaces, doc strings) from the saved graph."""
    model.doc_string = ""
    del model.metadata_props[:]

    def clean(graph: onnx.GraphProto):
        graph.doc_string = ""
        del graph.metadata_props[:]
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            vi.doc_string = ""
            del vi.metadata_props[:]
        for init in graph.initializer:
            init.doc_string = ""
            del init.metadata_props[:]
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    clean(attr.g)
                for sub in attr.graphs:
                    clean(sub)

    clean(model.graph)
    for fn in model.functions:
        fn.doc_string = ""
        del fn.metadata_props[:]
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer's values from its shape and type. Not `ByteSize()`: protobuf cannot serialise a
    message over 2 GB, and one tensor can be (Qwen2.5-VL-7B's fp32 embedding table is 2.18 GB)."""
    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def export(spec: GraphSpec, out_dir: Path, external_threshold: int | None = None) -> Path:
    """Exports `spec` to `out_dir/<name>.onnx` (+ `<name>.onnx.data` when its weights exceed
    `external_threshold` bytes, default EXTERNAL_DATA_THRESHOLD) and returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{spec.name}.onnx"
    data_name = f"{spec.name}.onnx.data"
    for stale in (path, out_dir / data_name):
        if stale.exists():
            stale.unlink()
    with torch.no_grad():
        program = torch.onnx.export(
            spec.module,
            spec.example,
            dynamo=True,
            opset_version=OPSET,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            optimize=True,
            verbose=False,
            report=False,
        )
    model = program.model_proto
    _strip_metadata(model)
    size = sum(_tensor_bytes(t) for t in model.graph.initializer)
    if size > (EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold):
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        # onnx creates the data file owner-only (0600): a server running as another user could not read it.
        (out_dir / data_name).chmod(0o644)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def io_contract(path: Path) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs as manifest `io` entries (symbolic dims by name)."""
    model = onnx.load(str(path), load_external_data=False)

    def entry(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": vi.name, "dtype": ONNX_DTYPE_NAMES[t.elem_type], "shape": dims}

    return [entry(i) for i in model.graph.input], [entry(o) for o in model.graph.output]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class VerificationError(RuntimeError):
    pass


# Session option ONNX Runtime needs for FP8 Q/DQ graphs: its QDQ selector would fuse DequantizeLinear ->
# MatMul into MatMulIntegerToFloat, which has no float8 kernel (session creation fails).
ORT_FP8_DISABLED_OPTIMIZERS = "QDQSelectorActionTransformer"
_FLOAT8 = {
    onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
}


def carries_fp8(path: Path) -> bool:
    """Whether the ONNX file holds float8 tensors (its weights are not read)."""
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_type in _FLOAT8 for t in model.graph.initializer)


def ort_session_options(path: Path, opts) -> None:
    """Adds what ONNX Runtime needs to run `path` when it is an FP8 Q/DQ graph (a per-graph decision:
    other graphs keep every optimizer)."""
    if carries_fp8(path):
        opts.add_session_config_entry("optimization.disable_specified_optimizers", ORT_FP8_DISABLED_OPTIMIZERS)


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ort_session_options(path, opts)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_session(path).run(None, feeds)


def verify(path: Path, name: str, cases, tolerance: float) -> list[dict]:
    """Runs the ONNX graph on each case's inputs with onnxruntime and compares with the case's torch
    reference output. `cases` yields (label, feeds: dict[str, torch.Tensor], reference: torch.Tensor,
    valid_mask or None). Raises VerificationError beyond `tolerance` (rel L2)."""
    rows = []
    sess = None  # one session for every case: opening one reads (and optimises) all the weights
    for label, feeds, ref, valid in cases:
        sess = sess or ort_session(path)
        out = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        ref = ref.detach().float().numpy()
        if valid is not None:
            out, ref = out[valid.numpy()], ref[valid.numpy()]
        err = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
        rl2 = rel_l2(out, ref)
        rows.append(
            {
                "graph": name,
                "case": label,
                "max_abs": err,
                "rel_l2": rl2,
                "ref_mean_abs": float(np.abs(ref).mean()) if ref.size else 0.0,
            }
        )
        if not math.isfinite(rl2) or rl2 > tolerance:
            raise VerificationError(
                f"{name} [{label}]: ONNX differs from torch: rel L2 {rl2:.3g} > {tolerance:g} (max abs {err:.3g})"
            )
    return rows
