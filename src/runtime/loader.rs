//! Opens a set of engines on one backend: `auto` (TensorRT when it can run here, else ONNX Runtime),
//! `ort` or `tensorrt`, with the reason. The one place above which no code names a concrete backend.

use std::path::PathBuf;
use std::sync::Arc;

use super::backend::{self, BackendChoice, BackendKind, BackendRequest, GpuProbe};
use super::counters::RunCounters;
use super::ort::OrtBackend;
pub use super::ort::OrtSettings;
pub use super::tensorrt::TrtOptions;
use super::tensorrt::TrtWorker;
use super::{Engine, Error, TensorInfo};

/// How to open engines.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub backend: BackendRequest,
    pub ort: OrtSettings,
    pub trt: TrtOptions,
    /// Where the engines count what they do (graph captures, replays, ...; read by /metrics).
    pub counters: Arc<RunCounters>,
}

/// One component to open: its ONNX graph (CPU), its TensorRT engine (GPU; may not exist) and the IO
/// contract the engine must have.
#[derive(Clone, Debug)]
pub struct EngineFiles {
    pub component: String,
    pub onnx: PathBuf,
    pub plan: PathBuf,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

/// The opened engines (in the order of the files given) and the backend decision.
pub struct Loaded {
    pub engines: Vec<Box<dyn Engine>>,
    pub choice: BackendChoice,
}

/// Chooses the backend for `files` and opens every engine on it.
pub fn load(files: &[EngineFiles], options: &LoadOptions) -> Result<Loaded, Error> {
    let choice = choose(files, options.backend)?;
    let engines = open(files, &choice, options)?;
    Ok(Loaded { engines, choice })
}

/// The backend `request` gives for `files` on this machine, with the reason (`auto`: TensorRT when
/// the shim, CUDA, TensorRT and every `.plan` are present, else ONNX Runtime).
pub fn choose(files: &[EngineFiles], request: BackendRequest) -> Result<BackendChoice, Error> {
    let plans = backend::plans_present_at(files.iter().map(|f| f.plan.clone()).collect());
    backend::choose(request, &GpuProbe::detect(), &plans)
}

/// Opens every engine of `files` on the chosen backend, in order.
pub fn open(files: &[EngineFiles], choice: &BackendChoice, options: &LoadOptions) -> Result<Vec<Box<dyn Engine>>, Error> {
    let mut engines: Vec<Box<dyn Engine>> = Vec::with_capacity(files.len());
    match choice.backend {
        BackendKind::Ort => {
            let ort = OrtBackend::new(options.ort.clone())?;
            for f in files {
                engines.push(Box::new(ort.load(&f.component, &f.onnx)?));
            }
        }
        BackendKind::TensorRt => {
            let worker = TrtWorker::open(options.trt.clone())?.with_counters(options.counters.clone());
            for f in files {
                engines.push(Box::new(worker.load(&f.component, &f.plan, Some((&f.inputs[..], &f.outputs[..])))?));
            }
        }
    }
    Ok(engines)
}
