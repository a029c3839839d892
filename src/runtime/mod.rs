//! The engine seam: one trait between "what to compute" (pipeline) and "where it runs".
//! `ort` runs the ONNX graphs on CPU (the reference); `tensorrt` runs compiled engines on a GPU.

pub mod attention;
pub mod backend;
pub mod counters;
pub mod cuda;
pub mod fuse;
pub mod loader;
pub mod nvrtc;
pub mod ort;
pub mod qdq;
pub mod shim;
#[cfg(qe_trt)]
mod shim_ffi;
pub mod staging;
pub mod step;
pub mod tensor;
pub mod tensorrt;
pub mod trt_facts;
pub mod widen;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

pub use staging::{Input, Kept, Place, RowCopy, StagedRow, StagingAlloc, StagingPool};
pub use tensor::{DType, Tensor};

/// One dimension of a declared tensor shape: fixed, or dynamic with a symbolic name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// The caller stopped a loop between two steps (nobody waits for its result any more).
    #[error("the denoising loop was stopped before step {step}: nobody waits for its result")]
    Cancelled { step: usize },
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

/// A whole denoising loop, for an engine that keeps it on its device (see [`DeviceLoop`]). Each step
/// runs the transformer, then [`step`]'s CFG + Euler update, which also rewrites the generated-token
/// rows of `hidden_states` for the next step.
pub struct DenoiseLoop<'a> {
    /// Inputs that are the same at every step (text embeddings and mask, RoPE tables, ...).
    pub fixed: &'a [(&'a str, Input<'a>)],
    /// The input rebuilt from the latents every step, and its value at step 0
    /// ([rows, img_seq, channels]: latents, then the condition-image tokens).
    pub state_input: &'a str,
    pub state: &'a Tensor,
    /// The per-step input ([rows]) and its value at each step (the same for every row).
    pub time_input: &'a str,
    pub timesteps: &'a [f32],
    /// The velocity output ([rows, img_seq, channels]).
    pub output: &'a str,
    /// Initial latents [batch, seq, channels], float32.
    pub latents: &'a [f32],
    pub shape: step::StepShape,
    /// `sigma_next - sigma` of each step.
    pub dts: &'a [f32],
    /// True CFG scale of each job (when `shape.cfg`).
    pub scales: Option<&'a [f32]>,
    /// Asked before every step after the first with the step's index: `false` stops the loop there
    /// ([`Error::Cancelled`]). A device engine waits for the previous step to finish before it asks,
    /// so a stop takes effect within one step; what is already launched runs to its end.
    pub proceed: Option<&'a dyn Fn(usize) -> bool>,
}

impl DenoiseLoop<'_> {
    /// Checks the loop's own consistency (the engine checks the tensors against its contract).
    pub fn validate(&self) -> Result<(), Error> {
        let err = |reason: String| Error::Contract { component: "denoise loop".into(), reason };
        self.shape.kernel_dims()?;
        if self.timesteps.len() != self.dts.len() || self.timesteps.is_empty() {
            return Err(err(format!("{} timesteps for {} steps", self.timesteps.len(), self.dts.len())));
        }
        let s = self.shape;
        if self.state.shape() != [s.rows(), s.img_seq, s.channels] {
            return Err(err(format!(
                "`{}` has shape {:?}, the loop needs [{}, {}, {}]",
                self.state_input,
                self.state.shape(),
                s.rows(),
                s.img_seq,
                s.channels
            )));
        }
        if self.latents.len() != s.latents() {
            return Err(err(format!("{} latent values for {s:?}", self.latents.len())));
        }
        if self.scales.map(<[f32]>::len) != s.cfg.then_some(s.batch) {
            return Err(err(format!("CFG scales {:?} for {s:?}", self.scales.map(<[f32]>::len))));
        }
        Ok(())
    }
}

/// An engine that runs the whole denoising loop on its device: latents, hidden states and velocities
/// stay there between steps; only the final latents come back.
pub trait DeviceLoop {
    /// Runs every step and returns the final latents [batch, seq, channels].
    fn run_loop(&mut self, job: &DenoiseLoop<'_>) -> Result<Vec<f32>, Error>;
}

/// How a component's working memory grows with its sizes (tokens, pixels) beyond those measured:
/// what the server's memory model (`pipeline::memory`) may assume when it extrapolates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Growth {
    /// At most in proportion: every attention streams its scores (flash), the rest is per token or pixel.
    Linear,
    /// Up to the square: an attention may materialise its tokens x tokens scores (or it is not known).
    Square,
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
    /// How this engine's memory grows with its sizes; `Square` (the safe side) unless it knows better.
    fn growth(&self) -> Growth {
        Growth::Square
    }
    /// A hint that the next runs repeat at the same sizes (the host denoising loop's steps): on, a run keeps its
    /// working memory for the next (ONNX Runtime's arena is otherwise returned after each run, and faulting
    /// 120 MB back in costs a 1 MP transformer step ~10%); off again before the last. Engines with fixed memory
    /// ignore it.
    fn repeat_runs(&mut self, _repeat: bool) {}
    /// The device loop, for an engine that has one; `None` makes the caller step on the host.
    fn device_loop(&mut self) -> Option<&mut dyn DeviceLoop> {
        None
    }
    /// Runs on inputs that may also be staged rows or gathers of a kept output ([`Input`]). The default, for a
    /// backend that reads host memory, makes each a host tensor (stacking staged rows is a counted host copy)
    /// and calls [`Engine::run`]; the GPU backend uploads staged rows as they are and gathers on its device.
    fn run_inputs(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<Outputs, Error> {
        let owned: Vec<Option<Tensor>> = inputs
            .iter()
            .map(|(_, i)| match i {
                Input::Host(_) => Ok(None),
                other => staging::host_tensor(other).map(Some),
            })
            .collect::<Result<_, _>>()
            .map_err(|reason| Error::Contract { component: self.component().to_string(), reason })?;
        let refs: Vec<(&str, &Tensor)> = inputs
            .iter()
            .zip(&owned)
            .filter_map(|((n, i), o)| match (i, o) {
                (Input::Host(t), _) => Some((*n, *t)),
                (_, Some(t)) => Some((*n, t)),
                _ => None,
            })
            .collect();
        self.run(&refs)
    }
    /// [`Engine::run_inputs`] that keeps output `keep` where it was computed (device memory on a GPU, for a
    /// later engine's [`Input::Gather`]) and returns the other outputs. The default keeps it on the host.
    fn run_keep(&mut self, inputs: &[(&str, Input<'_>)], keep: &str) -> Result<(Outputs, Kept), Error> {
        let mut out = self.run_inputs(inputs)?;
        let t = out.take(keep).ok_or_else(|| Error::Run {
            component: self.component().to_string(),
            reason: format!("no output `{keep}` to keep"),
        })?;
        let shape = t.shape().to_vec();
        Ok((out, Kept { dtype: t.dtype(), layout: shape.clone(), shape, place: Place::Host(Arc::new(t)) }))
    }
    /// Memory preprocessing should stage this engine's inputs in (the GPU backend's pinned memory); `None`:
    /// ordinary host memory.
    fn staging(&self) -> Option<Arc<dyn StagingAlloc>> {
        None
    }
}

/// Checks `inputs` against an engine's declared inputs: every declared input present once,
/// no unknown names, rank and fixed dims matching, dtype equal or a float the engine converts.
pub fn check_inputs(component: &str, declared: &[TensorInfo], inputs: &[(&str, &Tensor)]) -> Result<(), Error> {
    let specs: Vec<(&str, DType, &[usize])> = inputs.iter().map(|(n, t)| (*n, t.dtype(), t.shape())).collect();
    check_specs(component, declared, &specs)
}

/// [`check_inputs`] for [`Input`]s.
pub fn check_given(component: &str, declared: &[TensorInfo], inputs: &[(&str, Input<'_>)]) -> Result<(), Error> {
    let specs: Vec<(&str, DType, &[usize])> = inputs.iter().map(|(n, i)| (*n, i.dtype(), i.shape())).collect();
    check_specs(component, declared, &specs)
}

fn check_specs(component: &str, declared: &[TensorInfo], inputs: &[(&str, DType, &[usize])]) -> Result<(), Error> {
    let err = |reason: String| Error::Contract { component: component.to_string(), reason };
    for &(name, dtype, shape) in inputs {
        let Some(info) = declared.iter().find(|i| i.name == name) else {
            return Err(err(format!("unknown input `{name}`")));
        };
        let dtype_ok = dtype == info.dtype || (dtype.is_float() && info.dtype.is_float());
        if !dtype_ok {
            return Err(err(format!("input `{name}` is {dtype} but the graph takes {}", info.dtype)));
        }
        if !info.accepts(shape) {
            return Err(err(format!("input `{name}` has shape {shape:?}, graph declares {info}")));
        }
    }
    for info in declared {
        match inputs.iter().filter(|(n, _, _)| *n == info.name).count() {
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
        let i: TensorInfo = serde_json::from_str(r#"{"name":"a","dtype":"float32","shape":["batch",16,"h"]}"#).unwrap();
        assert_eq!(i.dtype, DType::F32);
        assert_eq!(i.shape[1], Dim::Fixed(16));
        assert_eq!(i.to_string(), "a: f32[batch, 16, h]");
    }
}
