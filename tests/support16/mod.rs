//! The 16-bit tiny bundles on a CPU. ONNX Runtime's CPU provider runs the float16 graphs itself (it computes
//! the nodes it has no float16 kernel for in float32, with casts around them), but refuses to load the
//! bfloat16 ones (no kernels: "Conv with bfloat16 is invalid", "no MatMul(13) for bfloat16"). For those this
//! makes a float32 twin of each graph (the bfloat16 weights widened, which is exact; casts to bfloat16 made
//! casts to float32) and [`Bf16Io`], an engine that declares the bundle's bfloat16 inputs and outputs: its
//! inputs are rounded to bfloat16 as a bfloat16 input buffer holds them, and every output is rounded to
//! bfloat16 as a bfloat16 engine returns it. What this covers: every conversion at the 16-bit boundaries (the
//! seam, pinned staging rows, the step kernel's 16-bit loads and stores) with the bundle's own bfloat16
//! weights. What it does not: bfloat16 arithmetic inside the networks (only a GPU computes that).

#![allow(dead_code)] // each test binary uses part of this module

use std::path::Path;

use onnx_protobuf::{attribute_proto::AttributeType, type_proto, GraphProto, Message, ModelProto, TensorProto};
use qwen_edit::runtime::{DType, Engine, Error, Outputs, Tensor, TensorInfo};

const FLOAT: i32 = 1;
const BFLOAT16: i32 = 16;

fn widen_tensor(t: &mut TensorProto) {
    if t.data_type != BFLOAT16 {
        return;
    }
    let bits: Vec<u16> = if !t.raw_data.is_empty() {
        t.raw_data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    } else {
        t.int32_data.iter().map(|&v| v as u16).collect() // ONNX keeps 16-bit values in int32_data otherwise
    };
    t.raw_data = bits.iter().flat_map(|&b| half::bf16::from_bits(b).to_f32().to_le_bytes()).collect();
    t.int32_data.clear();
    t.data_type = FLOAT;
}

fn widen_graph(g: &mut GraphProto) {
    g.initializer.iter_mut().for_each(widen_tensor);
    for v in g.input.iter_mut().chain(g.output.iter_mut()).chain(g.value_info.iter_mut()) {
        if let Some(type_proto::Value::TensorType(t)) = v.type_.as_mut().and_then(|t| t.value.as_mut()) {
            if t.elem_type == BFLOAT16 {
                t.elem_type = FLOAT;
            }
        }
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            if n.op_type == "Cast" && a.name == "to" && a.i == BFLOAT16 as i64 {
                a.i = FLOAT as i64;
            }
            if let Some(t) = a.t.as_mut() {
                widen_tensor(t);
            }
            match a.type_.enum_value_or_default() {
                AttributeType::GRAPH => {
                    if let Some(sub) = a.g.as_mut() {
                        widen_graph(sub);
                    }
                }
                AttributeType::GRAPHS => a.graphs.iter_mut().for_each(widen_graph),
                _ => {}
            }
        }
    }
}

/// Copies the bundle in `src` to `dst` with every bfloat16 graph as its float32 twin and the manifest's
/// bfloat16 IO declared float32 (what the twins take); [`Bf16Io`] declares the bfloat16 IO again.
pub fn widen_bundle(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        match path.extension().and_then(|x| x.to_str()) {
            Some("onnx") => {
                let mut model = ModelProto::parse_from_bytes(&std::fs::read(&path).unwrap()).unwrap();
                widen_graph(model.graph.as_mut().unwrap());
                std::fs::write(dst.join(&name), model.write_to_bytes().unwrap()).unwrap();
            }
            _ if name == "manifest.json" => {
                let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                for c in m["components"].as_object_mut().unwrap().values_mut() {
                    c["sha256"] = serde_json::Value::String("0".repeat(64)); // the twins are other files
                    for side in ["inputs", "outputs"] {
                        for io in c[side].as_array_mut().unwrap() {
                            if io["dtype"] == "bfloat16" {
                                io["dtype"] = "float32".into();
                            }
                        }
                    }
                }
                std::fs::write(dst.join(&name), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
            }
            _ if path.is_file() => {
                std::fs::copy(&path, dst.join(&name)).unwrap();
            }
            _ => {}
        }
    }
}

fn bf16_round(t: &Tensor) -> Tensor {
    if t.dtype().is_float() {
        t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
    } else {
        t.clone()
    }
}

/// A float32 twin engine that declares bfloat16 IO (see the module docs).
pub struct Bf16Io {
    inner: Box<dyn Engine>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
}

impl Bf16Io {
    pub fn wrap(inner: Box<dyn Engine>) -> Box<dyn Engine> {
        let bf = |v: &[TensorInfo]| -> Vec<TensorInfo> {
            v.iter().map(|t| TensorInfo { dtype: if t.dtype.is_float() { DType::BF16 } else { t.dtype }, ..t.clone() }).collect()
        };
        let (inputs, outputs) = (bf(inner.inputs()), bf(inner.outputs()));
        Box::new(Bf16Io { inner, inputs, outputs })
    }
}

impl Engine for Bf16Io {
    fn component(&self) -> &str {
        self.inner.component()
    }
    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }
    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }
    fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error> {
        let rounded: Vec<Tensor> = inputs.iter().map(|(_, t)| bf16_round(t)).collect();
        let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, _)| *n).zip(&rounded).collect();
        let out = self.inner.run(&named)?;
        Ok(Outputs(out.0.into_iter().map(|(n, t)| (n, bf16_round(&t))).collect()))
    }
}
