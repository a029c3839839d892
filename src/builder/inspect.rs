//! `qwen-edit inspect`: describes an `.onnx` graph (IO, opsets, precision, external data) or a TensorRT engine
//! (IO and optimization profiles; opening one needs the GPU stack).

use serde::Serialize;
use std::fmt;
use std::path::Path;

use super::Error;
use crate::onnx;
use crate::runtime::tensorrt::{TrtOptions, TrtWorker};
use crate::runtime::{Engine, TensorInfo};

/// What `inspect` found in a file.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Inspection {
    Onnx { path: String, info: onnx::OnnxInfo },
    Engine { path: String, tensorrt: Option<String>, inputs: Vec<TensorInfo>, outputs: Vec<TensorInfo>, profiles: Vec<String> },
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, title: &str, v: &[TensorInfo]| -> fmt::Result {
            writeln!(f, "{title}:")?;
            for t in v {
                writeln!(f, "  {t}")?;
            }
            Ok(())
        };
        match self {
            Inspection::Onnx { path, info } => {
                let opsets: Vec<String> =
                    info.opsets.iter().map(|(d, v)| format!("{}:{v}", if d.is_empty() { "ai.onnx" } else { d })).collect();
                writeln!(f, "ONNX model {path}")?;
                writeln!(
                    f,
                    "  ir {}, opsets {}, producer {:?}, {} nodes, {} initializers, precision {}",
                    info.ir_version,
                    opsets.join(" "),
                    info.producer,
                    info.nodes,
                    info.initializers,
                    info.precision.summary()
                )?;
                list(f, "inputs", &info.inputs)?;
                list(f, "outputs", &info.outputs)?;
                if info.external_data.is_empty() {
                    writeln!(f, "external data: none")
                } else {
                    writeln!(f, "external data: {}", info.external_data.join(", "))
                }
            }
            Inspection::Engine { path, tensorrt, inputs, outputs, profiles } => {
                writeln!(f, "TensorRT engine {path} (TensorRT {})", tensorrt.as_deref().unwrap_or("?"))?;
                list(f, "inputs", inputs)?;
                list(f, "outputs", outputs)?;
                writeln!(f, "profiles:")?;
                for p in profiles {
                    writeln!(f, "  {p}")?;
                }
                Ok(())
            }
        }
    }
}

/// Inspects an `.onnx` graph (no GPU needed) or a TensorRT engine (`.plan`/`.engine`, needs the GPU stack).
pub fn inspect(path: &Path, device: usize) -> Result<Inspection, Error> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "onnx" => Ok(Inspection::Onnx { path: path.display().to_string(), info: onnx::inspect(path)? }),
        "plan" | "engine" | "trt" => {
            if !path.is_file() {
                return Err(Error::Usage(format!("{} does not exist", path.display())));
            }
            let worker = TrtWorker::open(TrtOptions { device, graph_cache: 0, ..TrtOptions::default() })
                .map_err(|e| Error::Unavailable(format!("cannot inspect a TensorRT engine here: {e}")))?;
            let engine = worker.load("engine", path, None).map_err(|e| Error::Usage(e.to_string()))?;
            let profiles = engine
                .profiles()
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let parts: Vec<String> = engine
                        .inputs()
                        .iter()
                        .enumerate()
                        .map(|(i, t)| format!("{} {:?}..{:?}", t.name, p.min[i], p.max[i]))
                        .collect();
                    format!("{k}: {}", parts.join(", "))
                })
                .collect();
            Ok(Inspection::Engine {
                path: path.display().to_string(),
                tensorrt: worker.tensorrt_version().map(|v| v.to_string()),
                inputs: engine.inputs().to_vec(),
                outputs: engine.outputs().to_vec(),
                profiles,
            })
        }
        _ => Err(Error::Usage(format!("{}: expected a .onnx graph or a .plan/.engine TensorRT engine", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::exit;

    #[test]
    fn inspect_onnx_and_engine_files() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/transformer_io.onnx");
        let i = inspect(&fixture, 0).unwrap();
        let text = i.to_string();
        assert!(
            text.contains("encoder_hidden_states: f32[batch, txt_seq, 32]") && text.contains("external data: none"),
            "{text}"
        );
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["kind"], "onnx");
        // An engine file needs the GPU stack: here a clean "unavailable" error, even for garbage bytes.
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("x.plan");
        std::fs::write(&plan, b"not an engine").unwrap();
        match inspect(&plan, 0) {
            Err(e @ Error::Unavailable(_)) => assert!(e.to_string().contains("cannot inspect a TensorRT engine here"), "{e}"),
            Err(e) => assert_eq!(e.exit_code(), exit::INPUT, "{e}"), // a GPU host: corrupt plan rejected
            Ok(_) => panic!("garbage is not an engine"),
        }
        assert_eq!(inspect(&dir.path().join("missing.plan"), 0).unwrap_err().exit_code(), exit::INPUT);
        assert_eq!(inspect(&dir.path().join("notes.txt"), 0).unwrap_err().exit_code(), exit::INPUT);
    }
}
