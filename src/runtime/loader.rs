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
    /// The graph computes in FP8 (Q/DQ): its TensorRT engine needs a GPU with FP8 tensor cores.
    pub fp8: bool,
}

/// The oldest compute capability with FP8 tensor cores (Ada; Hopper and Blackwell are newer): TensorRT
/// builds and runs FP8 GEMMs only from here on.
pub const FP8_MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 9);

/// Whether a GPU of compute capability `cc` runs FP8 engines.
pub fn fp8_supported(cc: (i32, i32)) -> bool {
    cc >= FP8_MIN_COMPUTE_CAPABILITY
}

/// Refuses FP8 components on a GPU without FP8 (`cc` of device `ordinal`), naming them and the fix.
pub fn check_fp8_device(components: &[&str], cc: (i32, i32), ordinal: usize) -> Result<(), String> {
    if components.is_empty() || fp8_supported(cc) {
        return Ok(());
    }
    let (major, minor) = FP8_MIN_COMPUTE_CAPABILITY;
    Err(format!(
        "{} computes in FP8 (float8e4m3fn), which needs a GPU of compute capability {major}.{minor} or newer \
         (Ada, Hopper, Blackwell); device {ordinal} is {}.{}. Use a bundle exported without `--precision fp8` \
         (PRECISION_MODE=bf16 or auto with it), or run on an FP8 GPU",
        components.join(", "),
        cc.0,
        cc.1
    ))
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
            let fp8: Vec<&str> = files.iter().filter(|f| f.fp8).map(|f| f.component.as_str()).collect();
            check_fp8_device(&fp8, worker.compute_capability()?, options.trt.device)
                .map_err(|reason| Error::Unavailable { backend: "TensorRT".into(), reason })?;
            for f in files {
                engines.push(Box::new(worker.load(&f.component, &f.plan, Some((&f.inputs[..], &f.outputs[..])))?));
            }
        }
    }
    Ok(engines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_needs_ada_or_newer() {
        for cc in [(8, 9), (9, 0), (10, 0), (12, 0)] {
            assert!(fp8_supported(cc), "{cc:?}");
        }
        for cc in [(7, 5), (8, 0), (8, 6), (8, 7)] {
            assert!(!fp8_supported(cc), "{cc:?}");
        }
        assert!(check_fp8_device(&[], (7, 0), 0).is_ok(), "no FP8 component, any GPU");
        assert!(check_fp8_device(&["transformer"], (9, 0), 0).is_ok());
        let e = check_fp8_device(&["transformer"], (8, 0), 1).unwrap_err();
        assert!(
            e.contains("transformer") && e.contains("8.9") && e.contains("device 1 is 8.0") && e.contains("--precision fp8"),
            "{e}"
        );
    }
}
