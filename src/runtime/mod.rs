//! The engine seam: one trait between "what to compute" (pipeline) and "where it runs".
//! `ort` runs the ONNX graphs on CPU (the reference); `tensorrt` runs compiled engines on a GPU.

pub mod backend;
pub mod cuda;
pub mod ort;
pub mod shim;
#[cfg(qe_trt)]
mod shim_ffi;
pub mod tensor;
pub mod tensorrt;

use serde::{Deserialize, Serialize};
use std::fmt;

pub use tensor::{DType, Tensor};

/// One dimension of a declared tensor shape: fixed, or dynamic with a symbolic name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Dynamic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic(s) => f.write_str(s),
        }
    }
}

/// Name, element type and shape of one input or output of a component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorInfo {
    /// Whether a concrete shape fits this declaration (rank and fixed dims).
    pub fn accepts(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self.shape.iter().zip(shape).all(|(d, &n)| match d {
                Dim::Fixed(f) => *f == n,
                Dim::Dynamic(_) => true,
            })
    }
}

impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        write!(f, "{}: {}[{}]", self.name, self.dtype, dims.join(", "))
    }
}

/// Errors of the runtime layer (loading and running components).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A runtime library (ONNX Runtime, TensorRT, CUDA) could not be loaded.
    #[error("{library} is not available: {reason}")]
    LibraryMissing { library: String, reason: String },
    /// The backend exists but cannot run here (no GPU, no driver, ...).
    #[error("{backend} backend unavailable: {reason}")]
    Unavailable { backend: String, reason: String },
    /// A component file could not be loaded (missing, corrupt, wrong version).
    #[error("cannot load {component} from {path}: {reason}")]
    Load { component: String, path: String, reason: String },
    /// Inputs given to `run` do not match the component's IO contract.
    #[error("{component}: {reason}")]
    Contract { component: String, reason: String },
    /// The engine failed while running.
    #[error("{component} failed: {reason}")]
    Run { component: String, reason: String },
}

/// Named output tensors of one `run`.
#[derive(Debug, Default)]
pub struct Outputs(pub Vec<(String, Tensor)>);

impl Outputs {
    /// Removes and returns the output called `name`.
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.swap_remove(i).1)
    }
}

/// A loaded component (one network) ready to run batches.
///
/// Inputs are given by name; float inputs may be f32 even when the graph is f16/bf16 (the engine
/// converts at the seam), and float outputs are returned as f32.
pub trait Engine: Send {
    /// Component name, as in the manifest (`text_encoder`, `transformer`, ...).
    fn component(&self) -> &str;
    fn inputs(&self) -> &[TensorInfo];
    fn outputs(&self) -> &[TensorInfo];
    /// Runs the component once on named inputs and returns every output.
    fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs, Error>;
}

/// Checks `inputs` against an engine's declared inputs: every declared input present once,
/// no unknown names, rank and fixed dims matching, dtype equal or a float the engine converts.
pub fn check_inputs(
    component: &str,
    declared: &[TensorInfo],
    inputs: &[(&str, &Tensor)],
) -> Result<(), Error> {
    let err = |reason: String| Error::Contract { component: component.to_string(), reason };
    for (name, t) in inputs {
        let Some(info) = declared.iter().find(|i| i.name == *name) else {
            return Err(err(format!("unknown input `{name}`")));
        };
        let dtype_ok = t.dtype() == info.dtype || (t.dtype().is_float() && info.dtype.is_float());
        if !dtype_ok {
            return Err(err(format!("input `{name}` is {} but the graph takes {}", t.dtype(), info.dtype)));
        }
        if !info.accepts(t.shape()) {
            return Err(err(format!("input `{name}` has shape {:?}, graph declares {info}", t.shape())));
        }
    }
    for info in declared {
        match inputs.iter().filter(|(n, _)| *n == info.name).count() {
            0 => return Err(err(format!("missing input `{}`", info.name))),
            1 => {}
            _ => return Err(err(format!("input `{}` given twice", info.name))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, dtype: DType, shape: Vec<Dim>) -> TensorInfo {
        TensorInfo { name: name.into(), dtype, shape }
    }

    #[test]
    fn contract_check_names_the_problem() {
        let decl = vec![
            info("x", DType::F16, vec![Dim::Dynamic("batch".into()), Dim::Fixed(4)]),
            info("ids", DType::I64, vec![Dim::Dynamic("batch".into())]),
        ];
        let x = Tensor::f32(&[2, 4], vec![0.0; 8]);
        let ids = Tensor::i64(&[2], vec![1, 2]);
        assert!(check_inputs("c", &decl, &[("x", &x), ("ids", &ids)]).is_ok());
        let bad = Tensor::f32(&[2, 3], vec![0.0; 6]);
        let e = check_inputs("c", &decl, &[("x", &bad), ("ids", &ids)]).unwrap_err().to_string();
        assert!(e.contains("shape [2, 3]"), "{e}");
        let e = check_inputs("c", &decl, &[("x", &x)]).unwrap_err().to_string();
        assert!(e.contains("missing input `ids`"), "{e}");
        let e = check_inputs("c", &decl, &[("x", &x), ("ids", &x)]).unwrap_err().to_string();
        assert!(e.contains("is f32 but the graph takes i64"), "{e}");
        let e = check_inputs("c", &decl, &[("x", &x), ("ids", &ids), ("y", &ids)]).unwrap_err().to_string();
        assert!(e.contains("unknown input `y`"), "{e}");
    }

    #[test]
    fn dims_parse_from_manifest_json() {
        let i: TensorInfo =
            serde_json::from_str(r#"{"name":"a","dtype":"float32","shape":["batch",16,"h"]}"#).unwrap();
        assert_eq!(i.dtype, DType::F32);
        assert_eq!(i.shape[1], Dim::Fixed(16));
        assert_eq!(i.to_string(), "a: f32[batch, 16, h]");
    }
}
