//! Which backend runs the bundle: `--backend auto|ort|tensorrt`. `auto` takes TensorRT when the shim,
//! CUDA (driver + device), TensorRT and every `.plan` file are present, else ONNX Runtime; always with a reason.

use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::shim::{self, CudaRuntime, CudaStatus, TrtLibrary, TrtVersion};
use super::Error;

/// What the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendRequest {
    #[default]
    Auto,
    Ort,
    TensorRt,
}

impl FromStr for BackendRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendRequest::Auto),
            "ort" | "onnxruntime" | "cpu" => Ok(BackendRequest::Ort),
            "tensorrt" | "trt" | "gpu" => Ok(BackendRequest::TensorRt),
            other => Err(format!("unknown backend `{other}` (expected auto, ort or tensorrt)")),
        }
    }
}

/// The backend that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Ort,
    TensorRt,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Ort => "onnxruntime",
            BackendKind::TensorRt => "tensorrt",
        })
    }
}

/// What this machine offers the GPU backend; each part is Ok or the reason it is missing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuProbe {
    /// TensorRT version of the headers the shim was compiled with.
    pub shim: Result<TrtVersion, String>,
    pub cuda: Result<CudaStatus, String>,
    /// TensorRT library version and path.
    pub tensorrt: Result<(TrtVersion, String), String>,
}

impl GpuProbe {
    /// Probes the shim, libcudart (driver, devices) and libnvinfer without creating any TensorRT object.
    pub fn detect() -> GpuProbe {
        let shim = shim::header_version().ok_or_else(|| shim::ShimError::NotCompiled.to_string());
        if shim.is_err() {
            let e = shim.clone().map(|_| ()).unwrap_err();
            return GpuProbe { shim, cuda: Err(e.clone()), tensorrt: Err(e) };
        }
        let cuda = CudaRuntime::load(&shim::cudart_candidates()).map(|c| c.status()).map_err(|e| e.to_string());
        let tensorrt = TrtLibrary::load(&shim::nvinfer_candidates())
            .map_err(|e| e.to_string())
            .and_then(|t| t.version().map(|v| (v, t.path())).ok_or_else(|| format!("{} reports no version", t.path())));
        GpuProbe { shim, cuda, tensorrt }
    }

    /// Whether a TensorRT engine could run here (plans aside): /health's `gpu_available`.
    pub fn gpu_ready(&self) -> Result<String, String> {
        self.shim.as_ref().map_err(Clone::clone)?;
        let (devices, driver) = match self.cuda.as_ref().map_err(|e| format!("CUDA runtime: {e}"))? {
            CudaStatus::Ready { devices, driver_version, .. } => (*devices, *driver_version),
            CudaStatus::NoDriver { reason } | CudaStatus::NoDevice { reason } | CudaStatus::Error { reason } => {
                return Err(reason.clone())
            }
        };
        let (v, _) = self.tensorrt.as_ref().map_err(|e| e.clone())?;
        Ok(format!("TensorRT {v} on {devices} GPU(s), driver CUDA {}.{}", driver / 1000, (driver % 1000) / 10))
    }
}

/// The `.plan` files of `components` under `dir` (`<file stem>.plan` beside each `.onnx`), or which are missing.
pub fn plans_present(dir: &Path, onnx_files: &[String]) -> Result<Vec<PathBuf>, String> {
    plans_present_at(onnx_files.iter().map(|f| dir.join(f).with_extension("plan")).collect())
}

/// `plans`, if every one of them exists, or which are missing.
pub fn plans_present_at(plans: Vec<PathBuf>) -> Result<Vec<PathBuf>, String> {
    let missing: Vec<String> = plans.iter().filter(|p| !p.is_file()).map(|p| p.display().to_string()).collect();
    if missing.is_empty() {
        Ok(plans)
    } else {
        Err(format!("no TensorRT engine {} (build them with `qwen-edit build`)", missing.join(", ")))
    }
}

/// The decision and the sentence /health shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendChoice {
    pub backend: BackendKind,
    pub reason: String,
    pub gpu_available: bool,
}

/// Decides the backend. An explicit `tensorrt` request that cannot be met is an error naming why;
/// `auto` falls back to ONNX Runtime and says why.
pub fn choose(request: BackendRequest, probe: &GpuProbe, plans: &Result<Vec<PathBuf>, String>) -> Result<BackendChoice, Error> {
    let gpu = probe.gpu_ready();
    let gpu_available = gpu.is_ok();
    match request {
        BackendRequest::Ort => Ok(BackendChoice {
            backend: BackendKind::Ort,
            reason: "ONNX Runtime on CPU, as requested (--backend ort)".into(),
            gpu_available,
        }),
        BackendRequest::TensorRt => {
            let what = gpu.map_err(|reason| Error::Unavailable { backend: "TensorRT".into(), reason })?;
            plans.as_ref().map_err(|reason| Error::Unavailable { backend: "TensorRT".into(), reason: reason.clone() })?;
            Ok(BackendChoice {
                backend: BackendKind::TensorRt,
                reason: format!("{what}, as requested (--backend tensorrt)"),
                gpu_available,
            })
        }
        BackendRequest::Auto => Ok(match (gpu, plans) {
            (Ok(what), Ok(_)) => {
                BackendChoice { backend: BackendKind::TensorRt, reason: format!("{what}; engines present"), gpu_available }
            }
            (Ok(what), Err(why)) => BackendChoice {
                backend: BackendKind::Ort,
                reason: format!("ONNX Runtime on CPU: a GPU is available ({what}) but {why}"),
                gpu_available,
            },
            (Err(why), _) => BackendChoice {
                backend: BackendKind::Ort,
                reason: format!("ONNX Runtime on CPU: no GPU backend ({why})"),
                gpu_available,
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> TrtVersion {
        TrtVersion { major: 11, minor: 4, patch: 0 }
    }
    fn ready() -> GpuProbe {
        GpuProbe {
            shim: Ok(v()),
            cuda: Ok(CudaStatus::Ready { devices: 1, driver_version: 13000, runtime_version: 13020 }),
            tensorrt: Ok((v(), "libnvinfer.so.11".into())),
        }
    }
    fn plans_ok() -> Result<Vec<PathBuf>, String> {
        Ok(vec![PathBuf::from("transformer.plan")])
    }

    #[test]
    fn auto_picks_tensorrt_only_with_everything_present() {
        let c = choose(BackendRequest::Auto, &ready(), &plans_ok()).unwrap();
        assert_eq!(c.backend, BackendKind::TensorRt);
        assert!(c.gpu_available && c.reason.contains("TensorRT 11.4.0 on 1 GPU(s), driver CUDA 13.0"), "{}", c.reason);

        let no_plans = Err("no TensorRT engine x.plan (build them with `qwen-edit build`)".to_string());
        let c = choose(BackendRequest::Auto, &ready(), &no_plans).unwrap();
        assert_eq!(c.backend, BackendKind::Ort);
        assert!(c.gpu_available && c.reason.contains("x.plan"), "{}", c.reason);

        let mut no_driver = ready();
        no_driver.cuda = Ok(CudaStatus::NoDriver { reason: "no NVIDIA driver (libcuda.so.1)".into() });
        let c = choose(BackendRequest::Auto, &no_driver, &plans_ok()).unwrap();
        assert_eq!((c.backend, c.gpu_available), (BackendKind::Ort, false));
        assert!(c.reason.contains("libcuda.so.1"), "{}", c.reason);

        let mut no_device = ready();
        no_device.cuda = Ok(CudaStatus::NoDevice { reason: "sees no CUDA device".into() });
        assert!(choose(BackendRequest::Auto, &no_device, &plans_ok()).unwrap().reason.contains("no CUDA device"));

        let mut no_trt = ready();
        no_trt.tensorrt = Err("TensorRT library not found (tried libnvinfer.so.11)".into());
        let c = choose(BackendRequest::Auto, &no_trt, &plans_ok()).unwrap();
        assert!(c.backend == BackendKind::Ort && c.reason.contains("libnvinfer.so.11"), "{}", c.reason);

        let no_shim =
            GpuProbe { shim: Err("built without the TensorRT shim".into()), cuda: Err("-".into()), tensorrt: Err("-".into()) };
        assert!(choose(BackendRequest::Auto, &no_shim, &plans_ok()).unwrap().reason.contains("without the TensorRT shim"));
    }

    #[test]
    fn explicit_requests() {
        let c = choose(BackendRequest::Ort, &ready(), &plans_ok()).unwrap();
        assert_eq!(c.backend, BackendKind::Ort);
        assert!(c.gpu_available);
        let mut no_driver = ready();
        no_driver.cuda = Ok(CudaStatus::NoDriver { reason: "no NVIDIA driver".into() });
        let e = choose(BackendRequest::TensorRt, &no_driver, &plans_ok()).unwrap_err().to_string();
        assert!(e.contains("TensorRT backend unavailable: no NVIDIA driver"), "{e}");
        let e = choose(BackendRequest::TensorRt, &ready(), &Err("no TensorRT engine a.plan".into())).unwrap_err().to_string();
        assert!(e.contains("a.plan"), "{e}");
        assert_eq!("TRT".parse::<BackendRequest>().unwrap(), BackendRequest::TensorRt);
        assert_eq!("cpu".parse::<BackendRequest>().unwrap(), BackendRequest::Ort);
        assert!("cuda-maybe".parse::<BackendRequest>().is_err());
    }

    #[test]
    fn plan_files_sit_beside_the_onnx_files() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec!["transformer.onnx".to_string(), "vae_decoder.onnx".to_string()];
        let e = plans_present(dir.path(), &files).unwrap_err();
        assert!(e.contains("transformer.plan") && e.contains("vae_decoder.plan"), "{e}");
        std::fs::write(dir.path().join("transformer.plan"), b"x").unwrap();
        std::fs::write(dir.path().join("vae_decoder.plan"), b"x").unwrap();
        assert_eq!(plans_present(dir.path(), &files).unwrap().len(), 2);
    }

    #[test]
    fn probing_this_machine_gives_reasons_not_panics() {
        let p = GpuProbe::detect();
        assert_eq!(p.shim.is_ok(), shim::COMPILED);
        let c = choose(BackendRequest::Auto, &p, &Err("no plans".into())).unwrap();
        assert_eq!(c.backend, BackendKind::Ort);
        assert!(!c.reason.is_empty());
        if !crate::runtime::cuda::driver_present() {
            assert!(!c.gpu_available, "{p:?}");
        }
    }
}
