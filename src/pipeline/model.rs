//! Opening a bundle for editing: the model's CPU-side parts (tokenizer, settings, RoPE) shared by the
//! preprocessor and the engine worker, what the pipeline reports about itself, and its options.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::latents::LatentStats;
use super::prompt::PromptEncoder;
use super::rope::{Rope, RopeSpec};
use super::schedule::SchedulerConfig;
use super::torch_cpu::CpuKernels;
use super::vision::Vision;
use crate::bundle::{self, Bundle, Precision, PrecisionMode, Variant};
use crate::runtime::backend::{BackendChoice, BackendKind, BackendRequest};
use crate::runtime::counters::RunCounters;
use crate::runtime::loader::{self, EngineFiles, LoadOptions, OrtSettings, TrtOptions};
use crate::runtime::staging::{HeapAlloc, StagingPool};
use crate::runtime::{DType, Engine};

/// At most this many input images per Edit Plus request (each adds VL and latent tokens).
pub const MAX_PLUS_IMAGES: usize = 4;

/// Default text bucket, in tokens.
pub const DEFAULT_TEXT_BUCKET: usize = 64;

/// How to open a bundle.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    pub backend: BackendRequest,
    pub ort: OrtSettings,
    pub trt: TrtOptions,
    /// Check every component file against the manifest's sha256 before loading (slow for real models).
    pub verify_hashes: bool,
    /// Text lengths are padded up to a multiple of this (0 = [`DEFAULT_TEXT_BUCKET`]): equal shapes
    /// make a job's numbers independent of its batch, and repeat TensorRT graph shapes.
    pub text_bucket: usize,
    /// The torch CPU kernel flavour of the seeded noise and the RoPE tables; `None` = what torch
    /// computes on this CPU ([`cpu_kernels`]). Set it to reproduce vectors made on another machine.
    pub kernels: Option<CpuKernels>,
    /// `PRECISION_MODE`: `auto` runs what the bundle has; another mode must be what it has.
    pub precision: PrecisionMode,
    /// Rows per staging block of preprocessed pixels: the batch size the server forms (0 = 1).
    pub staging_rows: usize,
}

/// What a loaded pipeline is and accepts; shown by /health and used for request defaults.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineInfo {
    pub bundle: String,
    pub bundle_dir: PathBuf,
    /// `edit` or `edit-plus`.
    pub variant: &'static str,
    pub zero_cond_t: bool,
    pub dtype: DType,
    /// What the transformer computes in: the dtype's precision, or `fp8` for an FP8-quantized bundle.
    pub precision: Precision,
    pub backend: BackendKind,
    pub backend_reason: String,
    pub gpu_available: bool,
    /// Input images per request: 1 for Edit, up to [`MAX_PLUS_IMAGES`] for Edit Plus.
    pub max_images: usize,
    pub default_steps: u32,
    pub default_true_cfg_scale: f32,
    pub lightning_steps: u32,
    /// A Lightning LoRA is fused into this bundle's transformer.
    pub lightning_fused: bool,
    /// Longest text row the transformer accepts (after the system prompt is dropped), in tokens.
    pub max_text_tokens: usize,
    /// Pixel area of the default output (`vae.image_area`).
    pub image_area: u64,
    /// The output sizes the bundle's engine profiles name (`profiles.resolutions`, `[w, h]`).
    pub resolutions: Vec<(u32, u32)>,
    /// Where the denoising loop runs between transformer calls: `device` (TensorRT with the step
    /// kernel: latents never leave the GPU) or `host`.
    pub denoise_loop: &'static str,
}

/// Errors of opening a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Bundle(#[from] bundle::Error),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
    #[error("bundle {bundle}: {reason}")]
    Invalid { bundle: String, reason: String },
}

/// Picks the torch CPU kernel flavour the reference noise/RoPE used on a machine like this one
/// (`QWEN_EDIT_CPU_KERNELS=avx2|scalar` overrides): torch's AVX2 capability on AVX2 hosts; its
/// AVX-512 and default capabilities compute these kernels like the scalar flavour.
pub fn cpu_kernels() -> CpuKernels {
    match std::env::var("QWEN_EDIT_CPU_KERNELS").ok().as_deref() {
        Some("avx2") => return CpuKernels::Avx2,
        Some("scalar") => return CpuKernels::Scalar,
        _ => {}
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return CpuKernels::Scalar;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return CpuKernels::Avx2;
        }
    }
    CpuKernels::Scalar
}

/// Everything the CPU side needs, built once per bundle and shared by the preprocessor(s) and the
/// engine worker. The settings are the manifest's own sections.
#[derive(Clone)]
pub(crate) struct Model {
    pub info: PipelineInfo,
    pub prompt: PromptEncoder,
    pub vision: Vision,
    pub condition_area: Option<u64>,
    pub stats: LatentStats,
    pub base: SchedulerConfig,
    pub lightning: SchedulerConfig,
    pub rope: Rope,
    pub kernels: CpuKernels,
    pub z_dim: usize,
    pub text_bucket: usize,
    /// Where preprocessing writes the pixel tensors (the engines' staging memory), and in which dtypes:
    /// the VAE encoder's `image` and the text encoder's `pixel_values`.
    pub staging: Arc<StagingPool>,
    pub vae_dtype: DType,
    pub vl_dtype: DType,
}

impl Model {
    fn new(
        bundle: &Bundle,
        choice: &BackendChoice,
        precision: Precision,
        options: &PipelineOptions,
        counters: &Arc<RunCounters>,
    ) -> Result<Model, LoadError> {
        let m = bundle.manifest();
        let invalid = |reason: String| LoadError::Invalid { bundle: m.name.clone(), reason };
        m.vision.validate().map_err(|e| invalid(e.to_string()))?;
        let prompt = PromptEncoder::from_file(&bundle.tokenizer_path(), m.prompt.clone(), &m.vision)
            .map_err(|e| invalid(e.to_string()))?;
        let base = m.scheduler.base.clone();
        let lightning = m.scheduler.lightning.clone();
        base.validate().map_err(|e| invalid(format!("scheduler.base: {e}")))?;
        lightning.validate().map_err(|e| invalid(format!("scheduler.lightning: {e}")))?;
        let stats = LatentStats::new(&m.vae.latents_mean, &m.vae.latents_std).map_err(|e| invalid(e.to_string()))?;
        let kernels = options.kernels.unwrap_or_else(cpu_kernels);
        let t = &m.transformer;
        let rope = Rope::new(RopeSpec { theta: t.rope_theta, axes_dim: t.axes_dims_rope, table_len: t.rope_positions }, kernels)
            .map_err(|e| invalid(e.to_string()))?;
        let plus = m.variant == Variant::EditPlus;
        let info = PipelineInfo {
            bundle: m.name.clone(),
            bundle_dir: bundle.dir().to_path_buf(),
            variant: if plus { "edit-plus" } else { "edit" },
            zero_cond_t: t.zero_cond_t,
            dtype: m.dtype,
            precision,
            backend: choice.backend,
            backend_reason: choice.reason.clone(),
            gpu_available: choice.gpu_available,
            max_images: if plus { MAX_PLUS_IMAGES } else { 1 },
            default_steps: m.defaults.num_inference_steps,
            default_true_cfg_scale: m.defaults.true_cfg_scale as f32,
            lightning_steps: m.defaults.lightning_steps,
            lightning_fused: m.lightning.is_some(),
            max_text_tokens: m.prompt.max_text_tokens,
            image_area: m.vae.image_area,
            resolutions: m.profiles.resolutions.iter().map(|&[w, h]| (w, h)).collect(),
            denoise_loop: "host",
        };
        Ok(Model {
            info,
            prompt,
            vision: m.vision.clone(),
            condition_area: m.vision.condition_area,
            stats,
            base,
            lightning,
            rope,
            kernels,
            z_dim: m.vae.z_dim,
            text_bucket: if options.text_bucket == 0 { DEFAULT_TEXT_BUCKET } else { options.text_bucket },
            staging: StagingPool::new(Arc::new(HeapAlloc), options.staging_rows, counters.clone()),
            vae_dtype: DType::F32,
            vl_dtype: DType::F32,
        })
    }

    /// Stages pixels where `engines` read them: the VAE encoder's staging memory (pinned on a GPU), in the
    /// dtypes of its `image` and of the text encoder's `pixel_values`; and says where the loop runs.
    pub fn attach(&mut self, engines: &mut Engines, rows: usize) {
        let float = |e: &dyn Engine, name: &str| {
            e.inputs().iter().find(|t| t.name == name).map(|t| t.dtype).filter(|d| d.is_float()).unwrap_or(DType::F32)
        };
        self.vae_dtype = float(engines.vae_encoder.as_ref(), "image");
        self.vl_dtype = float(engines.text_encoder.as_ref(), "pixel_values");
        let alloc = engines.vae_encoder.staging().unwrap_or_else(|| Arc::new(HeapAlloc));
        self.staging = StagingPool::new(alloc, rows, engines.counters.clone());
        self.info.denoise_loop = if engines.transformer.device_loop().is_some() { "device" } else { "host" };
    }

    /// The scheduler config of a job.
    pub fn scheduler(&self, lightning: bool) -> &SchedulerConfig {
        if lightning {
            &self.lightning
        } else {
            &self.base
        }
    }
}

/// The four engines of a bundle, by role.
pub(crate) struct Engines {
    pub text_encoder: Box<dyn Engine>,
    pub transformer: Box<dyn Engine>,
    pub vae_encoder: Box<dyn Engine>,
    pub vae_decoder: Box<dyn Engine>,
    /// What the engines did (shared with them) and the host loop's steps.
    pub counters: Arc<RunCounters>,
}

/// Opens the bundle in `dir`: chooses the backend (auto: TensorRT when it can run here, else ONNX
/// Runtime), builds the CPU-side model, and loads the four engines, checking each against the
/// manifest's IO contract.
pub(crate) fn open(dir: &Path, options: &PipelineOptions) -> Result<(Model, Engines), LoadError> {
    let bundle = if options.verify_hashes { Bundle::open_verified(dir)? } else { Bundle::open(dir)? };
    let precision = bundle.check_precision(options.precision)?;
    let files = bundle::COMPONENTS
        .iter()
        .map(|c| {
            let contract = bundle.component(c)?;
            Ok(EngineFiles {
                component: c.to_string(),
                onnx: bundle.onnx_path(c)?,
                plan: bundle.plan_path(c)?,
                inputs: contract.inputs.clone(),
                outputs: contract.outputs.clone(),
                fp8: bundle.manifest().is_fp8(c),
            })
        })
        .collect::<Result<Vec<_>, bundle::Error>>()?;
    let choice = loader::choose(&files, options.backend)?;
    let counters = Arc::new(RunCounters::default());
    let mut model = Model::new(&bundle, &choice, precision, options, &counters)?;
    let load =
        LoadOptions { backend: options.backend, ort: options.ort.clone(), trt: options.trt.clone(), counters: counters.clone() };
    let opened = loader::open(&files, &choice, &load)?;
    for e in &opened {
        bundle.check_engine(e.as_ref())?;
    }
    let mut engines: Vec<Option<Box<dyn Engine>>> = opened.into_iter().map(Some).collect();
    let mut take = |name: &str| -> Box<dyn Engine> {
        let i = bundle::COMPONENTS.iter().position(|c| *c == name).expect("a bundle component");
        engines[i].take().expect("each component is taken once")
    };
    let mut engines = Engines {
        text_encoder: take("text_encoder"),
        transformer: take("transformer"),
        vae_encoder: take("vae_encoder"),
        vae_decoder: take("vae_decoder"),
        counters,
    };
    model.attach(&mut engines, options.staging_rows);
    tracing::info!(
        bundle = %model.info.bundle,
        backend = %choice.backend,
        precision = %precision,
        reason = %choice.reason,
        denoise_loop = model.info.denoise_loop,
        "pipeline loaded"
    );
    Ok((model, engines))
}
