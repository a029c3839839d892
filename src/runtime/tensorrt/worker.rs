//! A worker's TensorRT environment: loads CUDA, TensorRT and NVRTC, opens the device and its stream, and
//! deserializes `.plan` files into [`TrtEngine`]s.

use std::path::Path;
use std::sync::Arc;

use super::engine::TrtEngine;
use super::plan::TrtOptions;
use crate::runtime::counters::{EngineMemory, RunCounters};
use crate::runtime::cuda::{Device, StepKernel};
use crate::runtime::nvrtc::{self, Nvrtc};
use crate::runtime::shim::{self, CudaRuntime, CudaStatus, TrtLibrary, TrtVersion};
use crate::runtime::{Error, TensorInfo};

const BACKEND: &str = "TensorRT";

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable { backend: BACKEND.into(), reason: reason.into() }
}

fn missing(library: &str, e: shim::ShimError) -> Error {
    Error::LibraryMissing { library: library.into(), reason: e.to_string() }
}

/// A worker's TensorRT environment: the libraries, the TensorRT runtime and the worker's device/stream.
pub struct TrtWorker {
    runtime: shim::Runtime,
    trt: TrtLibrary,
    cuda: CudaRuntime,
    device: Arc<Device>,
    options: TrtOptions,
    /// The denoising step kernel; without it (no NVRTC) transformers step on the host.
    step_kernel: Option<Arc<StepKernel>>,
    counters: Arc<RunCounters>,
}

impl TrtWorker {
    /// Loads CUDA and TensorRT and opens the device. Each missing piece is a clean error that names it:
    /// no shim, no libcudart, no driver, no device, no libnvinfer (checked in that order).
    pub fn open(options: TrtOptions) -> Result<TrtWorker, Error> {
        if !shim::COMPILED {
            return Err(missing("TensorRT shim", shim::ShimError::NotCompiled));
        }
        let cuda = CudaRuntime::load(&shim::cudart_candidates()).map_err(|e| missing("CUDA runtime (libcudart)", e))?;
        match cuda.status() {
            CudaStatus::Ready { devices, .. } if (options.device as u32) < devices => {}
            CudaStatus::Ready { devices, .. } => {
                return Err(unavailable(format!("CUDA device {} does not exist ({devices} visible)", options.device)))
            }
            CudaStatus::NoDriver { reason } | CudaStatus::NoDevice { reason } | CudaStatus::Error { reason } => {
                return Err(unavailable(reason))
            }
        }
        let trt = TrtLibrary::load(&shim::nvinfer_candidates()).map_err(|e| missing("TensorRT (libnvinfer)", e))?;
        let device = Arc::new(Device::open(options.device)?);
        let ordinal = i32::try_from(options.device).map_err(|_| unavailable("device ordinal out of range"))?;
        let runtime = shim::Runtime::new(&trt, &cuda, ordinal).map_err(|e| unavailable(e.to_string()))?;
        // Each NVRTC in turn: one whose PTX this driver cannot load gives way to an older one.
        let built =
            nvrtc::first_loadable(&nvrtc::candidates(), |c| Nvrtc::load(&[c.to_string()]), |n| device.load_step_kernel(n));
        let step_kernel = match built {
            Ok((k, nvrtc)) => {
                tracing::info!(compute_capability = ?k.compute_capability(), nvrtc, "denoising loop runs on the device");
                Some(Arc::new(k))
            }
            Err(e) => {
                tracing::warn!(error = %e, "no step kernel: the denoising loop steps on the host (install NVRTC, libnvrtc.so, to keep it on the device)");
                None
            }
        };
        let counters = Arc::new(RunCounters::default());
        Ok(TrtWorker { runtime, trt, cuda, device, options, step_kernel, counters })
    }

    /// Counts into `counters` (shared with the pipeline, read by /metrics) instead of the worker's own;
    /// the device (name, memory) and each loaded engine's memory are reported there too (/health).
    pub fn with_counters(mut self, counters: Arc<RunCounters>) -> TrtWorker {
        let device = self.device.clone();
        counters.device.set_probe(Arc::new(move || {
            let (name, free, total) = device.describe().ok()?;
            Some((name, free as u64, total as u64))
        }));
        self.counters = counters;
        self
    }

    pub fn counters(&self) -> &Arc<RunCounters> {
        &self.counters
    }

    pub fn tensorrt_version(&self) -> Option<TrtVersion> {
        self.trt.version()
    }

    pub fn libraries(&self) -> (String, String) {
        (self.trt.path(), self.cuda.path())
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The worker's GPU's compute capability (major, minor).
    pub fn compute_capability(&self) -> Result<(i32, i32), Error> {
        let ordinal = i32::try_from(self.options.device).map_err(|_| unavailable("device ordinal out of range"))?;
        let info = self.cuda.device(ordinal).map_err(|e| unavailable(e.to_string()))?;
        Ok((info.cc_major, info.cc_minor))
    }

    /// Loads the engine at `plan`. `contract` (the manifest's inputs and outputs) names the dynamic
    /// dims, which the text buckets need; without it no dim is bucketed.
    pub fn load(
        &self,
        component: &str,
        plan: &Path,
        contract: Option<(&[TensorInfo], &[TensorInfo])>,
    ) -> Result<TrtEngine, Error> {
        let load_err = |reason: String| Error::Load { component: component.into(), path: plan.display().to_string(), reason };
        let bytes = std::fs::read(plan).map_err(|e| load_err(format!("cannot read the engine: {e}")))?;
        let engine = self.runtime.deserialize(&bytes).map_err(|e| load_err(e.to_string()))?;
        let weights_bytes = bytes.len() as u64;
        drop(bytes);
        let kernel = self.step_kernel.clone();
        let engine =
            TrtEngine::new(component, engine, self.device.clone(), contract, &self.options, kernel, self.counters.clone());
        let engine = engine.map_err(|e| match e {
            Error::Load { .. } => e,
            other => load_err(other.to_string()),
        })?;
        let (activation_bytes, io_bytes) = engine.memory();
        let component = component.to_string();
        self.counters.device.add_engine(EngineMemory { component, weights_bytes, activation_bytes, io_bytes });
        Ok(engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_worker_here_names_what_is_missing() {
        // No GPU on this machine or in CI: opening must fail cleanly, naming the missing piece.
        let e = match TrtWorker::open(TrtOptions::default()) {
            Ok(_) => return, // a GPU host with TensorRT: covered by scripts/gpu-smoke.sh
            Err(e) => e.to_string(),
        };
        let named = ["shim", "libcudart", "driver", "device", "libnvinfer", "libcuda"].iter().any(|w| e.contains(w));
        assert!(named, "{e}");
    }
}
