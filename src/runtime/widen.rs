//! Float32 twins of bfloat16 ONNX graphs, for ONNX Runtime's CPU provider, which has no bfloat16 kernels: every
//! bfloat16 weight widened (exact), bfloat16 casts and tensor types made float32 (see `OrtSettings::bf16_as_f32`).
//!
//! External weights are rewritten into one file of a scratch directory that lives as long as the session
//! built from the twin ([`Twin`]): the float32 copies of the bfloat16 ones, the others copied as they are.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{type_proto, GraphProto, ModelProto, StringStringEntryProto, TensorProto};

const FLOAT: i32 = 1;
const BFLOAT16: i32 = 16;
/// The twin's external weights, in its scratch directory.
const WEIGHTS: &str = "weights.f32.bin";

/// The scratch directory of a twin's external weights (deleted with it); `None` inside when the graph had none.
#[derive(Debug)]
pub struct Twin {
    dir: Option<tempfile::TempDir>,
}

impl Twin {
    /// Where the session reads the twin's external weights from.
    pub fn external_data_folder(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }
}

/// Whether the graph computes in bfloat16 anywhere (a weight, a declared type, a cast).
pub fn has_bf16(model: &ModelProto) -> bool {
    model.graph.as_ref().is_some_and(graph_has_bf16)
}

fn graph_has_bf16(g: &GraphProto) -> bool {
    g.initializer.iter().any(|t| t.data_type == BFLOAT16)
        || g.input.iter().chain(&g.output).chain(&g.value_info).any(|v| elem_type(v) == Some(BFLOAT16))
        || g.node.iter().flat_map(|n| n.attribute.iter().map(move |a| (n, a))).any(|(n, a)| {
            (n.op_type == "Cast" && a.name == "to" && a.i == i64::from(BFLOAT16))
                || a.t.as_ref().is_some_and(|t| t.data_type == BFLOAT16)
                || a.g.as_ref().is_some_and(graph_has_bf16)
                || a.graphs.iter().any(graph_has_bf16)
        })
}

fn elem_type(v: &onnx_protobuf::ValueInfoProto) -> Option<i32> {
    match v.type_.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => Some(t.elem_type),
        _ => None,
    }
}

/// Names of a graph's inputs and outputs declared bfloat16.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bf16Io {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// The graph's inputs and outputs declared bfloat16.
pub fn bf16_io(model: &ModelProto) -> Bf16Io {
    let names = |v: &[onnx_protobuf::ValueInfoProto]| {
        v.iter().filter(|v| elem_type(v) == Some(BFLOAT16)).map(|v| v.name.clone()).collect::<Vec<_>>()
    };
    model.graph.as_ref().map_or_else(Bf16Io::default, |g| Bf16Io { inputs: names(&g.input), outputs: names(&g.output) })
}

/// Makes `model` its float32 twin; `model_dir` is where its external weights are (relative locations).
pub fn widen(model: &mut ModelProto, model_dir: &Path) -> Result<Twin, String> {
    let mut weights = Weights { model_dir: model_dir.to_path_buf(), out: None };
    if let Some(g) = model.graph.as_mut() {
        widen_graph(g, &mut weights)?;
    }
    let dir = match weights.out {
        Some((dir, mut file, _)) => {
            file.flush().map_err(|e| format!("cannot write the float32 weights: {e}"))?;
            Some(dir)
        }
        None => None,
    };
    Ok(Twin { dir })
}

fn widen_graph(g: &mut GraphProto, weights: &mut Weights) -> Result<(), String> {
    for t in &mut g.initializer {
        weights.widen_tensor(t)?;
    }
    for v in g.input.iter_mut().chain(g.output.iter_mut()).chain(g.value_info.iter_mut()) {
        if let Some(type_proto::Value::TensorType(t)) = v.type_.as_mut().and_then(|t| t.value.as_mut()) {
            if t.elem_type == BFLOAT16 {
                t.elem_type = FLOAT;
            }
        }
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            if n.op_type == "Cast" && a.name == "to" && a.i == i64::from(BFLOAT16) {
                a.i = i64::from(FLOAT);
            }
            if let Some(t) = a.t.as_mut() {
                weights.widen_tensor(t)?;
            }
            match a.type_.enum_value_or_default() {
                AttributeType::GRAPH => {
                    if let Some(sub) = a.g.as_mut() {
                        widen_graph(sub, weights)?;
                    }
                }
                AttributeType::GRAPHS => {
                    for sub in &mut a.graphs {
                        widen_graph(sub, weights)?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// bfloat16 values (little-endian bits) as float32 bytes: exact.
fn widen_bits(raw: &[u8]) -> Vec<u8> {
    raw.chunks_exact(2).flat_map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32().to_le_bytes()).collect()
}

/// The external weights: read from beside the model, written to the twin's scratch file.
struct Weights {
    model_dir: PathBuf,
    /// The scratch directory, its weights file and the file's length so far.
    out: Option<(tempfile::TempDir, File, u64)>,
}

impl Weights {
    fn widen_tensor(&mut self, t: &mut TensorProto) -> Result<(), String> {
        if t.data_location.enum_value_or_default() == DataLocation::EXTERNAL {
            return self.move_external(t);
        }
        if t.data_type != BFLOAT16 {
            return Ok(());
        }
        // Raw bytes or one value per int32_data entry, as the attention rewrite reads constants.
        let values = super::attention::tensor_floats(t).ok_or_else(|| format!("tensor `{}`: no bfloat16 data", t.name))?;
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        t.int32_data.clear();
        t.data_type = FLOAT;
        Ok(())
    }

    /// Reads an external tensor's bytes, widens them if bfloat16, appends them to the scratch file (page-aligned,
    /// so ONNX Runtime may map them) and points the tensor there.
    fn move_external(&mut self, t: &mut TensorProto) -> Result<(), String> {
        let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
        let location = entry("location").ok_or_else(|| format!("tensor `{}`: external data without a location", t.name))?;
        let number = |k: &str| -> Result<Option<u64>, String> {
            entry(k).map(|v| v.parse::<u64>().map_err(|_| format!("tensor `{}`: bad external `{k}` {v:?}", t.name))).transpose()
        };
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        let path = self.model_dir.join(&location);
        let err = |e: std::io::Error| format!("tensor `{}`: cannot read {}: {e}", t.name, path.display());
        let mut f = File::open(&path).map_err(err)?;
        let length = match length {
            Some(l) => l,
            None => f.metadata().map_err(err)?.len().saturating_sub(offset),
        };
        f.seek(SeekFrom::Start(offset)).map_err(err)?;
        let mut bytes = Vec::new();
        f.take(length).read_to_end(&mut bytes).map_err(err)?;
        if bytes.len() as u64 != length {
            return Err(format!("tensor `{}`: {} ends before its {length} bytes", t.name, path.display()));
        }
        if t.data_type == BFLOAT16 {
            bytes = widen_bits(&bytes);
            t.data_type = FLOAT;
        }
        let at = self.append(&bytes)?;
        t.external_data = vec![
            StringStringEntryProto { key: "location".into(), value: WEIGHTS.into(), ..Default::default() },
            StringStringEntryProto { key: "offset".into(), value: at.to_string(), ..Default::default() },
            StringStringEntryProto { key: "length".into(), value: bytes.len().to_string(), ..Default::default() },
        ];
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<u64, String> {
        let werr = |e: std::io::Error| format!("cannot write the float32 weights: {e}");
        if self.out.is_none() {
            let dir = tempfile::Builder::new().prefix("qwen-edit-f32-twin-").tempdir().map_err(werr)?;
            let file = File::create(dir.path().join(WEIGHTS)).map_err(werr)?;
            self.out = Some((dir, file, 0));
        }
        let (_, file, len) = self.out.as_mut().expect("opened above");
        let at = len.div_ceil(4096) * 4096;
        file.write_all(&vec![0u8; (at - *len) as usize]).map_err(werr)?;
        file.write_all(bytes).map_err(werr)?;
        *len = at + bytes.len() as u64;
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use onnx_protobuf::Message;

    fn bf16_tensor(name: &str, values: &[f32]) -> TensorProto {
        TensorProto {
            name: name.into(),
            data_type: BFLOAT16,
            dims: vec![values.len() as i64],
            raw_data: values.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    fn floats(t: &TensorProto) -> Vec<f32> {
        t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    fn external(t: &TensorProto, k: &str) -> String {
        t.external_data.iter().find(|e| e.key == k).unwrap().value.clone()
    }

    /// The committed bfloat16 bundle: every graph holds bfloat16 and its twin none; weights widen exactly.
    #[test]
    fn the_committed_bf16_graphs_widen_exactly() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/tiny-bf16");
        for c in ["text_encoder", "transformer", "vae_encoder", "vae_decoder"] {
            let model = ModelProto::parse_from_bytes(&std::fs::read(dir.join(format!("{c}.onnx"))).unwrap()).unwrap();
            assert!(has_bf16(&model), "{c}");
            let mut twin = model.clone();
            let t = widen(&mut twin, &dir).unwrap();
            assert!(t.external_data_folder().is_none(), "{c}: no external weights");
            assert!(!has_bf16(&twin), "{c}: bfloat16 left in the twin");
            let (before, after) = (model.graph.as_ref().unwrap(), twin.graph.as_ref().unwrap());
            for (b, a) in before.initializer.iter().zip(&after.initializer).filter(|(b, _)| b.data_type == BFLOAT16) {
                assert_eq!((a.data_type, a.dims.clone()), (FLOAT, b.dims.clone()), "{c}/{}", b.name);
                let want: Vec<f32> = if b.raw_data.is_empty() {
                    b.int32_data.iter().map(|&v| half::bf16::from_bits(v as u16).to_f32()).collect()
                } else {
                    b.raw_data.chunks_exact(2).map(|x| half::bf16::from_le_bytes([x[0], x[1]]).to_f32()).collect()
                };
                assert_eq!(floats(a), want, "{c}/{}", b.name);
            }
            assert_eq!(bf16_io(&twin), Bf16Io::default());
            assert!(!bf16_io(&model).inputs.is_empty() || !bf16_io(&model).outputs.is_empty(), "{c}: declares bfloat16 IO");
        }
    }

    /// External weights: bfloat16 ones widened, others copied, each page-aligned in the scratch file, which goes
    /// with the twin.
    #[test]
    fn external_weights_move_to_the_scratch_file() {
        let src = tempfile::tempdir().unwrap();
        let a = [1.5f32, -2.0, 0.333, 65504.0];
        let bf: Vec<u8> = a.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
        let ints: Vec<u8> = [7i64, -9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut blob = vec![0xAAu8; 10];
        blob.extend_from_slice(&bf);
        blob.extend_from_slice(&ints);
        std::fs::write(src.path().join("w.bin"), &blob).unwrap();
        let ext = |name: &str, ty: i32, offset: usize, length: usize| TensorProto {
            name: name.into(),
            data_type: ty,
            data_location: DataLocation::EXTERNAL.into(),
            external_data: [("location", "w.bin".to_string()), ("offset", offset.to_string()), ("length", length.to_string())]
                .into_iter()
                .map(|(k, v)| StringStringEntryProto { key: k.into(), value: v, ..Default::default() })
                .collect(),
            ..Default::default()
        };
        let mut model = ModelProto {
            graph: Some(GraphProto {
                initializer: vec![
                    ext("a", BFLOAT16, 10, bf.len()),
                    ext("n", 7, 10 + bf.len(), ints.len()),
                    bf16_tensor("c", &[3.0]),
                ],
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let twin = widen(&mut model, src.path()).unwrap();
        let folder = twin.external_data_folder().unwrap().to_path_buf();
        let data = std::fs::read(folder.join(WEIGHTS)).unwrap();
        let g = model.graph.as_ref().unwrap();
        let read = |t: &TensorProto| {
            let (o, l): (usize, usize) = (external(t, "offset").parse().unwrap(), external(t, "length").parse().unwrap());
            assert_eq!((external(t, "location"), o % 4096), (WEIGHTS.to_string(), 0), "{}", t.name);
            data[o..o + l].to_vec()
        };
        let widened: Vec<f32> =
            read(&g.initializer[0]).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let want: Vec<f32> = a.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!((g.initializer[0].data_type, widened), (FLOAT, want));
        assert_eq!((g.initializer[1].data_type, read(&g.initializer[1])), (7, ints));
        assert_eq!((g.initializer[2].data_type, floats(&g.initializer[2])), (FLOAT, vec![3.0]));
        drop(twin);
        assert!(!folder.exists(), "the scratch directory goes with the twin");

        // A location that is not there, or a file shorter than the tensor: an error naming the tensor.
        let mut model = ModelProto {
            graph: Some(GraphProto { initializer: vec![ext("z", BFLOAT16, 0, 4096)], ..Default::default() }).into(),
            ..Default::default()
        };
        let e = widen(&mut model, src.path()).unwrap_err();
        assert!(e.contains("tensor `z`") && e.contains("ends before"), "{e}");
    }
}
