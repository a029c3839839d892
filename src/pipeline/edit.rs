//! The edit job as the pipeline sees it, and the two halves that run it: `Preprocessor` (CPU work
//! on request threads: sizes, resizing, tokens, VL patches) and `Pipeline` (the engines, one worker).

use crate::runtime;
use image::RgbImage;
use ndarray::Array3;

/// One edit as given by a client (images already decoded, EXIF orientation applied).
#[derive(Clone, Debug)]
pub struct EditRequest {
    /// Input images: exactly one for Qwen-Image-Edit, one or more for Edit Plus.
    pub images: Vec<RgbImage>,
    pub prompt: String,
    /// True CFG runs only when this is given and `true_cfg_scale > 1` (as the reference).
    pub negative_prompt: Option<String>,
    pub num_inference_steps: u32,
    pub true_cfg_scale: f32,
    pub seed: u64,
    /// Output size; `None` = the reference's size from the (last) input image.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Lightning schedule (constant shift 3) instead of the base one.
    pub lightning: bool,
    /// Initial packed noise [1, seq, 64] instead of the seed's (reproduction against other implementations).
    pub noise: Option<Array3<f32>>,
}

/// What must be equal for jobs to share one batch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub width: u32,
    pub height: u32,
    /// VAE sizes of the condition images, in order.
    pub condition_sizes: Vec<(u32, u32)>,
    pub steps: u32,
    pub true_cfg: bool,
    pub lightning: bool,
    /// Text length the transformer sees (rows' longest, rounded up to the text bucket): jobs batch
    /// only with jobs of the same bucket, so a job's tensors have the same shapes alone and batched.
    pub text_len: usize,
}

/// A finished edit.
#[derive(Clone, Debug)]
pub struct EditOutput {
    pub image: RgbImage,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub steps: u32,
    pub true_cfg: bool,
    pub lightning: bool,
}

/// Errors of preparing or running an edit.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The request cannot be run as given (client error: HTTP 422).
    #[error("{0}")]
    Invalid(String),
    /// The prompt is longer than the bundle accepts (client error: HTTP 422).
    #[error("prompt too long: {tokens} tokens, at most {max} are accepted")]
    PromptTooLong { tokens: usize, max: usize },
    /// An engine failed while running the batch (server error: HTTP 500).
    #[error(transparent)]
    Engine(#[from] runtime::Error),
    /// Anything else that went wrong inside the pipeline (server error: HTTP 500).
    #[error("internal pipeline error: {0}")]
    Internal(String),
}

impl EditError {
    /// A copy for each job of a failed batch (engine errors keep their message).
    pub fn replicate(&self) -> EditError {
        match self {
            EditError::Invalid(m) => EditError::Invalid(m.clone()),
            EditError::PromptTooLong { tokens, max } => EditError::PromptTooLong { tokens: *tokens, max: *max },
            EditError::Engine(e) => EditError::Engine(runtime::Error::Run { component: "batch".into(), reason: e.to_string() }),
            EditError::Internal(m) => EditError::Internal(m.clone()),
        }
    }

    /// Whether the client caused it (4xx) rather than the server (5xx).
    pub fn is_client_error(&self) -> bool {
        matches!(self, EditError::Invalid(_) | EditError::PromptTooLong { .. })
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

use crate::bundle::{self, Bundle, Variant};
use crate::imaging::{self, Filter};
use crate::pipeline::latents::{self, EditSizes, LatentStats};
use crate::pipeline::prompt::{self, PromptEncoder, PromptError, PromptRow, PromptSettings};
use crate::pipeline::rope::{Rope, RopeSpec};
use crate::pipeline::schedule::{Schedule, SchedulerConfig};
use crate::pipeline::torch_cpu::CpuKernels;
use crate::pipeline::vision::{self, VisionBatch, VisionImage, VisionSettings};
use crate::runtime::backend::{self, BackendKind, BackendRequest, GpuProbe};
use crate::runtime::ort::{OrtBackend, OrtSettings};
use crate::runtime::step::{self, StepShape};
use crate::runtime::tensorrt::{TrtOptions, TrtWorker};
use crate::runtime::{DType, DenoiseLoop, Engine, Tensor};
use ndarray::{s, Array2, Array4, ArrayD, Axis, Ix3, IxDyn};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most this many input images per Edit Plus request (each adds VL and latent tokens).
pub const MAX_PLUS_IMAGES: usize = 4;

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
}

/// Default text bucket, in tokens.
pub const DEFAULT_TEXT_BUCKET: usize = 64;

/// What a loaded pipeline is and accepts; shown by /health and used for request defaults.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineInfo {
    pub bundle: String,
    pub bundle_dir: PathBuf,
    /// `edit` or `edit-plus`.
    pub variant: &'static str,
    pub zero_cond_t: bool,
    pub dtype: DType,
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

/// Everything the CPU side needs, shared by the preprocessor(s) and the engine worker.
#[derive(Clone)]
struct Shared {
    info: PipelineInfo,
    prompt: PromptEncoder,
    vision: VisionSettings,
    condition_area: Option<u64>,
    stats: LatentStats,
    base: SchedulerConfig,
    lightning: SchedulerConfig,
    rope: Rope,
    kernels: CpuKernels,
    z_dim: usize,
    text_bucket: usize,
}

/// Converts one manifest section into the pipeline module's settings type (same keys).
fn section<T: serde::de::DeserializeOwned>(value: &impl Serialize, what: &str, bundle: &str) -> Result<T, LoadError> {
    serde_json::to_value(value)
        .and_then(serde_json::from_value)
        .map_err(|e| LoadError::Invalid { bundle: bundle.to_string(), reason: format!("manifest `{what}`: {e}") })
}

impl Shared {
    fn new(bundle: &Bundle, choice: &backend::BackendChoice, text_bucket: usize) -> Result<Shared, LoadError> {
        let m = bundle.manifest();
        let name = m.name.clone();
        let invalid = |reason: String| LoadError::Invalid { bundle: name.clone(), reason };
        let vision: VisionSettings = section(&m.vision, "vision", &name)?;
        vision.validate().map_err(|e| invalid(e.to_string()))?;
        let prompt_settings: PromptSettings = section(&m.prompt, "prompt", &name)?;
        let prompt =
            PromptEncoder::from_file(&bundle.tokenizer_path(), prompt_settings, &vision).map_err(|e| invalid(e.to_string()))?;
        let base: SchedulerConfig = section(&m.scheduler.base, "scheduler.base", &name)?;
        let lightning: SchedulerConfig = section(&m.scheduler.lightning, "scheduler.lightning", &name)?;
        base.validate().map_err(|e| invalid(format!("scheduler.base: {e}")))?;
        lightning.validate().map_err(|e| invalid(format!("scheduler.lightning: {e}")))?;
        let stats = LatentStats::new(&m.vae.latents_mean, &m.vae.latents_std).map_err(|e| invalid(e.to_string()))?;
        let kernels = cpu_kernels();
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
            denoise_loop: "host",
        };
        Ok(Shared {
            info,
            prompt,
            vision,
            condition_area: m.vision.condition_area,
            stats,
            base,
            lightning,
            rope,
            kernels,
            z_dim: m.vae.z_dim,
            text_bucket: if text_bucket == 0 { DEFAULT_TEXT_BUCKET } else { text_bucket },
        })
    }
}

/// The CPU half: turns requests into prepared jobs. Cheap to clone; use from any thread.
#[derive(Clone)]
pub struct Preprocessor {
    shared: Arc<Shared>,
}

/// The engines of one bundle. Owned by one engine worker; `run_batch` runs batches of prepared jobs.
pub struct Pipeline {
    shared: Arc<Shared>,
    text_encoder: Box<dyn Engine>,
    transformer: Box<dyn Engine>,
    vae_encoder: Box<dyn Engine>,
    vae_decoder: Box<dyn Engine>,
    last_stages: Option<StageTimes>,
}

/// Wall time of each stage of one batch (for benches and logs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    pub batch: usize,
    /// VL processor patches to prompt embeddings (text encoder).
    pub text: Duration,
    pub vae_encode: Duration,
    /// Every transformer step with its Euler update.
    pub denoise: Duration,
    /// VAE decoder and conversion to pictures.
    pub decode: Duration,
}

impl Pipeline {
    /// Opens the bundle in `dir`, chooses the backend (auto: TensorRT when it can run here, else ONNX
    /// Runtime) and loads the four engines, checking each against the manifest's IO contract.
    pub fn open(dir: &Path, options: &PipelineOptions) -> Result<Pipeline, LoadError> {
        let bundle = if options.verify_hashes { Bundle::open_verified(dir)? } else { Bundle::open(dir)? };
        let onnx_files: Vec<String> = bundle::COMPONENTS.iter().map(|c| bundle.manifest().components[*c].file.clone()).collect();
        let probe = GpuProbe::detect();
        let plans = backend::plans_present(bundle.dir(), &onnx_files);
        let choice = backend::choose(options.backend, &probe, &plans)?;
        let mut shared = Shared::new(&bundle, &choice, options.text_bucket)?;
        let mut engines: Vec<Box<dyn Engine>> = Vec::with_capacity(4);
        match choice.backend {
            BackendKind::Ort => {
                let ort = OrtBackend::new(options.ort.clone())?;
                for c in bundle::COMPONENTS {
                    engines.push(Box::new(ort.load(c, &bundle.onnx_path(c)?)?));
                }
            }
            BackendKind::TensorRt => {
                let worker = TrtWorker::open(options.trt.clone())?;
                for c in bundle::COMPONENTS {
                    let contract = &bundle.manifest().components[c];
                    let engine = worker.load(c, &bundle.plan_path(c)?, Some((&contract.inputs[..], &contract.outputs[..])))?;
                    engines.push(Box::new(engine));
                }
            }
        }
        for e in &engines {
            bundle.check_engine(e.as_ref())?;
        }
        let mut take = |name: &str| -> Box<dyn Engine> {
            let i = engines.iter().position(|e| e.component() == name).expect("all four components loaded");
            engines.swap_remove(i)
        };
        let mut transformer = take("transformer");
        if transformer.device_loop().is_some() {
            shared.info.denoise_loop = "device";
        }
        tracing::info!(
            bundle = %shared.info.bundle,
            backend = %choice.backend,
            reason = %choice.reason,
            denoise_loop = shared.info.denoise_loop,
            "pipeline loaded"
        );
        Ok(Pipeline {
            text_encoder: take("text_encoder"),
            transformer,
            vae_encoder: take("vae_encoder"),
            vae_decoder: take("vae_decoder"),
            shared: Arc::new(shared),
            last_stages: None,
        })
    }

    pub fn info(&self) -> &PipelineInfo {
        &self.shared.info
    }

    /// Stage times of the last batch that completed.
    pub fn last_stages(&self) -> Option<StageTimes> {
        self.last_stages
    }

    /// Replaces the transformer with `wrap(transformer)`: instrumentation, and the emulated device
    /// loop of tests/device_loop.rs (which checks the GPU loop's program without a GPU).
    pub fn wrap_transformer(self, wrap: impl FnOnce(Box<dyn Engine>) -> Box<dyn Engine>) -> Pipeline {
        let mut transformer = wrap(self.transformer);
        let mut shared = (*self.shared).clone();
        shared.info.denoise_loop = if transformer.device_loop().is_some() { "device" } else { "host" };
        Pipeline { transformer, shared: Arc::new(shared), ..self }
    }

    pub fn preprocessor(&self) -> Preprocessor {
        Preprocessor { shared: self.shared.clone() }
    }
}

// ---------------------------------------------------------------------------------------------
// Preparing a job (CPU, any thread)
// ---------------------------------------------------------------------------------------------

/// A request after all per-job CPU work: sizes, resized images, VL patches, noise.
pub struct Prepared {
    key: BatchKey,
    seed: u64,
    true_cfg_scale: f32,
    prompt: String,
    negative_prompt: Option<String>,
    sizes: EditSizes,
    /// Per input image: the VL processor's patches.
    vl: Vec<VisionImage>,
    /// Per input image: the VAE input, CHW in [-1, 1], at `sizes.vae[i]`.
    vae: Vec<Vec<f32>>,
    /// Packed initial noise [1, seq, 64].
    noise: ndarray::Array3<f32>,
}

impl Prepared {
    pub fn key(&self) -> &BatchKey {
        &self.key
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("key", &self.key).field("seed", &self.seed).finish_non_exhaustive()
    }
}

fn prompt_error(e: PromptError) -> EditError {
    match e {
        PromptError::TooLong { tokens, max, .. } => EditError::PromptTooLong { tokens, max },
        e if e.is_bad_input() => EditError::Invalid(e.to_string()),
        e => EditError::Internal(e.to_string()),
    }
}

/// The VL processor's resize: smart_resize to multiples of 28, then the reference's resampling.
fn vl_patches(image: &RgbImage, s: &VisionSettings) -> Result<VisionImage, EditError> {
    let (w, h) = image.dimensions();
    let (tw, th) = vision::target_size(w, h, s).map_err(|e| EditError::Invalid(e.to_string()))?;
    let resized;
    let img = if (tw, th) == (w, h) {
        image
    } else {
        resized = vision::resize(image, tw, th, s).map_err(|e| EditError::Internal(e.to_string()))?;
        &resized
    };
    vision::patchify(img.as_raw(), tw, th, s).map_err(|e| EditError::Internal(e.to_string()))
}

impl Preprocessor {
    pub fn info(&self) -> &PipelineInfo {
        &self.shared.info
    }

    /// Validates `req` and does its CPU work. Errors are the client's (`is_client_error`) unless
    /// something inside the pipeline is broken.
    pub fn prepare(&self, req: EditRequest) -> Result<Prepared, EditError> {
        let sh = &*self.shared;
        let info = &sh.info;
        let n = req.images.len();
        if n == 0 {
            return Err(EditError::Invalid("no input image".into()));
        }
        if n > info.max_images {
            return Err(EditError::Invalid(if info.max_images == 1 {
                format!("this model ({}) edits one image per request, {n} were given", info.variant)
            } else {
                format!("at most {} input images per request, {n} were given", info.max_images)
            }));
        }
        if req.num_inference_steps == 0 {
            return Err(EditError::Invalid("num_inference_steps must be at least 1".into()));
        }
        if !req.true_cfg_scale.is_finite() || req.true_cfg_scale < 0.0 {
            return Err(EditError::Invalid(format!("true_cfg_scale must be a finite number >= 0, got {}", req.true_cfg_scale)));
        }
        let dims: Vec<(u32, u32)> = req.images.iter().map(|i| i.dimensions()).collect();
        let sizes = latents::edit_sizes(&dims, (req.width, req.height), info.image_area, sh.condition_area)
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        // The schedule must be valid for this request (e.g. 1 step with a terminal stretch is not).
        let config = if req.lightning { &sh.lightning } else { &sh.base };
        Schedule::new(config, req.num_inference_steps as usize, sizes.image_seq_len())
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        // RoPE positions must fit the reference's table for the longest accepted text.
        sh.rope.tables(&sizes.img_shapes, 1).map_err(|e| EditError::Invalid(e.to_string()))?;

        let plus = sh.condition_area.is_some();
        let mut vl = Vec::with_capacity(n);
        let mut vae = Vec::with_capacity(n);
        for (i, image) in req.images.iter().enumerate() {
            let (vw, vh) = sizes.vae[i];
            let vae_img = lanczos(image, vw, vh)?;
            let vl_img = if plus { lanczos(image, sizes.vl[i].0, sizes.vl[i].1)? } else { vae_img.clone() };
            vl.push(vl_patches(&vl_img, &sh.vision)?);
            let mut chw = vec![0f32; 3 * vw as usize * vh as usize];
            imaging::preprocess_into(&vae_img, &mut chw).map_err(|e| EditError::Internal(e.to_string()))?;
            vae.push(chw);
        }

        let true_cfg = req.true_cfg_scale > 1.0 && req.negative_prompt.is_some();
        // Tokenise now so that a prompt that is too long (or reserved tokens) is refused before queueing.
        let slots: Vec<usize> = (0..n).collect();
        let grids: Vec<_> = vl.iter().map(|v| v.grid).collect();
        let mut rows = vec![PromptRow { text: &req.prompt, images: &slots }];
        if true_cfg {
            rows.push(PromptRow { text: req.negative_prompt.as_deref().unwrap_or(""), images: &slots });
        }
        let text = sh.prompt.encode_bucketed(&rows, &grids, sh.text_bucket).map_err(prompt_error)?;
        let text_len = text.seq - text.drop_tokens;
        sh.rope.tables(&sizes.img_shapes, text_len).map_err(|e| EditError::Invalid(e.to_string()))?;

        let (lh, lw) = sizes.latent_size();
        let noise = match req.noise {
            Some(noise) => {
                let want = [1, (lh / 2) * (lw / 2), 4 * sh.z_dim];
                if noise.shape() != want {
                    return Err(EditError::Invalid(format!(
                        "initial latents have shape {:?}, this edit needs {want:?} (packed [1, seq, 64])",
                        noise.shape()
                    )));
                }
                noise
            }
            None => {
                latents::initial_noise(req.seed, sh.z_dim, lh, lw, sh.kernels).map_err(|e| EditError::Internal(e.to_string()))?
            }
        };
        let key = BatchKey {
            width: sizes.output.0,
            height: sizes.output.1,
            condition_sizes: sizes.vae.clone(),
            steps: req.num_inference_steps,
            true_cfg,
            lightning: req.lightning,
            text_len,
        };
        Ok(Prepared {
            key,
            seed: req.seed,
            true_cfg_scale: req.true_cfg_scale,
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            sizes,
            vl,
            vae,
            noise,
        })
    }
}

fn lanczos(image: &RgbImage, w: u32, h: u32) -> Result<RgbImage, EditError> {
    if image.dimensions() == (w, h) {
        return Ok(image.clone());
    }
    imaging::resize(image, w, h, Filter::Lanczos).map_err(|e| EditError::Internal(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Running a batch (the engine worker)
// ---------------------------------------------------------------------------------------------

/// Intermediates of one batch, for parity tests and `edit --dump`: what the reference records.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Text encoder rows (cond rows, then negative rows): token ids and mask [rows, seq].
    pub input_ids: Option<ArrayD<i64>>,
    pub attention_mask: Option<ArrayD<i64>>,
    /// Per input image of every job: VL patches [patches, 1176].
    pub pixel_values: Vec<ArrayD<f32>>,
    /// Text hidden states after the drop, padded [rows, txt_seq, dim], and their mask.
    pub prompt_embeds: Option<ArrayD<f32>>,
    pub prompt_mask: Option<ArrayD<i64>>,
    /// Packed, normalised condition latents [b, cond_seq, 64].
    pub image_latents: Option<ArrayD<f32>>,
    /// Initial packed noise [b, seq, 64].
    pub noise: Option<ArrayD<f32>>,
    pub sigmas: Vec<f32>,
    /// Packed latents after each step.
    pub latents: Vec<ArrayD<f32>>,
    /// VAE decoder input (denormalised) and output float image.
    pub decode_in: Option<ArrayD<f32>>,
    pub decoded: Option<ArrayD<f32>>,
}

fn run_one(engine: &mut dyn Engine, inputs: &[(&str, Tensor)], output: &str) -> Result<ArrayD<f32>, EditError> {
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = engine.run(&refs)?;
    let t =
        out.take(output).ok_or_else(|| EditError::Internal(format!("{} returned no `{output}` output", engine.component())))?;
    t.into_f32().map_err(|e| EditError::Internal(format!("{}: {e}", engine.component())))
}

fn internal(e: impl std::fmt::Display) -> EditError {
    EditError::Internal(e.to_string())
}

impl Pipeline {
    /// Runs jobs that share one [`BatchKey`] as one batch and returns their results in order. An
    /// engine failure fails every job of this batch (and nothing else).
    pub fn run_batch(&mut self, jobs: Vec<Prepared>) -> Vec<Result<EditOutput, EditError>> {
        let n = jobs.len();
        if n == 0 {
            return Vec::new();
        }
        let started = Instant::now();
        match self.run_checked(&jobs, None) {
            Ok(images) => {
                tracing::debug!(batch = n, ms = started.elapsed().as_millis() as u64, "batch done");
                jobs.iter()
                    .zip(images)
                    .map(|(j, image)| {
                        Ok(EditOutput {
                            width: image.width(),
                            height: image.height(),
                            image,
                            seed: j.seed,
                            steps: j.key.steps,
                            true_cfg: j.key.true_cfg,
                            lightning: j.key.lightning,
                        })
                    })
                    .collect()
            }
            Err(e) => {
                tracing::error!(batch = n, error = %e, "batch failed");
                (0..n).map(|_| Err(e.replicate())).collect()
            }
        }
    }

    /// [`Pipeline::run_batch`] that also returns the batch's intermediates (whole batch or error).
    pub fn run_batch_traced(&mut self, jobs: &[Prepared]) -> Result<(Vec<RgbImage>, Trace), EditError> {
        let mut trace = Trace::default();
        let images = self.run_checked(jobs, Some(&mut trace))?;
        Ok((images, trace))
    }

    fn run_checked(&mut self, jobs: &[Prepared], mut trace: Option<&mut Trace>) -> Result<Vec<RgbImage>, EditError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(bad) = jobs.iter().position(|j| j.key != jobs[0].key) {
            return Err(internal(format!("batch mixes incompatible jobs ({:?} vs {:?})", jobs[0].key, jobs[bad].key)));
        }
        let sh = self.shared.clone();
        let key = &jobs[0].key;
        let b = jobs.len();
        let cfg = key.true_cfg;
        let rows = if cfg { 2 * b } else { b };

        // 1. Text encoder: cond rows of every job, then the negative rows; each job's images are
        //    encoded once and shared by its rows.
        let t0 = Instant::now();
        let mut vl_refs: Vec<&VisionImage> = Vec::new();
        let mut slots: Vec<Vec<usize>> = Vec::with_capacity(b);
        for j in jobs {
            let start = vl_refs.len();
            vl_refs.extend(j.vl.iter());
            slots.push((start..vl_refs.len()).collect());
        }
        let mut prompt_rows: Vec<PromptRow<'_>> =
            jobs.iter().zip(&slots).map(|(j, s)| PromptRow { text: &j.prompt, images: s }).collect();
        if cfg {
            for (j, s) in jobs.iter().zip(&slots) {
                prompt_rows.push(PromptRow { text: j.negative_prompt.as_deref().unwrap_or(""), images: s });
            }
        }
        let grids: Vec<_> = vl_refs.iter().map(|v| v.grid).collect();
        let text = sh.prompt.encode_bucketed(&prompt_rows, &grids, sh.text_bucket).map_err(prompt_error)?;
        if text.seq - text.drop_tokens != key.text_len {
            return Err(internal(format!("batch text length {} != key's {}", text.seq - text.drop_tokens, key.text_len)));
        }
        if let Some(t) = trace.as_deref_mut() {
            t.input_ids = Some(ArrayD::from_shape_vec(IxDyn(&[text.batch, text.seq]), text.input_ids.clone()).map_err(internal)?);
            t.attention_mask =
                Some(ArrayD::from_shape_vec(IxDyn(&[text.batch, text.seq]), text.attention_mask.clone()).map_err(internal)?);
            for v in &vl_refs {
                let dim = v.pixel_values.len() / v.grid.patches().max(1);
                t.pixel_values
                    .push(ArrayD::from_shape_vec(IxDyn(&[v.grid.patches(), dim]), v.pixel_values.clone()).map_err(internal)?);
            }
        }
        let vision = VisionBatch::new(&vl_refs, &sh.vision).map_err(internal)?;
        let te_inputs = prompt::text_encoder_inputs(&text, vision).map_err(prompt_error)?;
        let hidden = run_one(self.text_encoder.as_mut(), &te_inputs, "hidden_states")?;
        let hidden = hidden.into_dimensionality::<Ix3>().map_err(internal)?;
        let (embeds, mask) = text.prompt_embeds(hidden.view()).map_err(prompt_error)?;
        let txt_seq = embeds.shape()[1];
        if let Some(t) = trace.as_deref_mut() {
            t.prompt_embeds = Some(embeds.clone().into_dyn());
            t.prompt_mask = Some(mask.clone().into_dyn());
        }
        let t_text = t0.elapsed();

        // 2. VAE encoder: the i-th condition image of every job has the same size (batch key).
        let t1 = Instant::now();
        let mut cond_parts = Vec::new();
        for (i, &(w, h)) in key.condition_sizes.iter().enumerate() {
            let (w, h) = (w as usize, h as usize);
            let mut data = Vec::with_capacity(b * 3 * w * h);
            for j in jobs {
                data.extend_from_slice(&j.vae[i]);
            }
            let image = Tensor::f32(&[b, 3, h, w], data);
            let lat = run_one(self.vae_encoder.as_mut(), &[("image", image)], "latent")?;
            let mut lat = lat.into_dimensionality::<ndarray::Ix4>().map_err(internal)?;
            sh.stats.normalize(lat.view_mut()).map_err(internal)?;
            cond_parts.push(latents::pack_latents(lat.view()).map_err(internal)?);
        }
        let cond_views: Vec<_> = cond_parts.iter().map(|c| c.view()).collect();
        let image_latents = ndarray::concatenate(Axis(1), &cond_views).map_err(internal)?;
        let t_vae = t1.elapsed();
        if let Some(t) = trace.as_deref_mut() {
            t.image_latents = Some(image_latents.clone().into_dyn());
        }

        // 3. Denoising loop: each step runs the transformer, then runtime::step's CFG + Euler update
        //    (which also rewrites the latent rows of hidden_states). An engine that keeps the loop on
        //    its device (TensorRT) runs all of it there; otherwise it steps here. Traces need every
        //    step's latents, so they always step here.
        let t2 = Instant::now();
        let noise_views: Vec<_> = jobs.iter().map(|j| j.noise.view()).collect();
        let mut x = ndarray::concatenate(Axis(0), &noise_views).map_err(internal)?; // [b, seq, 64], standard layout
        let seq = x.shape()[1];
        let ch = x.shape()[2];
        let sizes = &jobs[0].sizes;
        let config = if key.lightning { &sh.lightning } else { &sh.base };
        let schedule = Schedule::new(config, key.steps as usize, sizes.image_seq_len()).map_err(internal)?;
        let tables = sh.rope.tables(&sizes.img_shapes, txt_seq).map_err(|e| EditError::Invalid(e.to_string()))?;
        let img_seq = seq + image_latents.shape()[1];
        if let Some(t) = trace.as_deref_mut() {
            t.noise = Some(x.clone().into_dyn());
            t.sigmas = schedule.sigmas.clone();
        }
        let shape = StepShape { batch: b, seq, img_seq, channels: ch, cfg };
        let mut hs = ndarray::Array3::<f32>::zeros((rows, img_seq, ch));
        for r in 0..rows {
            let j = r % b; // with CFG, row b + j is job j's negative row
            hs.slice_mut(s![r, ..seq, ..]).assign(&x.slice(s![j, .., ..]));
            hs.slice_mut(s![r, seq.., ..]).assign(&image_latents.slice(s![j, .., ..]));
        }
        let steps = schedule.steps();
        let timesteps = (0..steps).map(|i| schedule.model_timestep(i)).collect::<Result<Vec<f32>, _>>().map_err(internal)?;
        let dts = (0..steps).map(|i| schedule.dt(i)).collect::<Result<Vec<f32>, _>>().map_err(internal)?;
        let scales: Vec<f32> = jobs.iter().map(|j| j.true_cfg_scale).collect();
        let scales = cfg.then_some(&scales[..]);
        let ehs = Tensor::F32(embeds.into_dyn());
        let ehs_mask = Tensor::I64(mask.into_dyn());
        let img_cos = Tensor::F32(tables.img_cos.into_dyn());
        let img_sin = Tensor::F32(tables.img_sin.into_dyn());
        let txt_cos = Tensor::F32(tables.txt_cos.into_dyn());
        let txt_sin = Tensor::F32(tables.txt_sin.into_dyn());
        let modulate = sh.info.zero_cond_t.then(|| {
            let mut m = Array2::<i64>::zeros((rows, img_seq));
            m.slice_mut(s![.., seq..]).fill(1);
            Tensor::I64(m.into_dyn())
        });
        let mut fixed: Vec<(&str, &Tensor)> = vec![
            ("encoder_hidden_states", &ehs),
            ("encoder_hidden_states_mask", &ehs_mask),
            ("img_cos", &img_cos),
            ("img_sin", &img_sin),
            ("txt_cos", &txt_cos),
            ("txt_sin", &txt_sin),
        ];
        if let Some(m) = &modulate {
            fixed.push(("modulate_index", m));
        }
        let xs = x.as_slice_mut().ok_or_else(|| internal("latents not contiguous"))?;
        match (trace.is_none(), self.transformer.device_loop()) {
            (true, Some(device)) => {
                let state = Tensor::F32(hs.into_dyn());
                let job = DenoiseLoop {
                    fixed: &fixed,
                    state_input: "hidden_states",
                    state: &state,
                    time_input: "timestep",
                    timesteps: &timesteps,
                    output: "sample",
                    latents: xs,
                    shape,
                    dts: &dts,
                    scales,
                };
                let out = device.run_loop(&job)?;
                if out.len() != xs.len() {
                    return Err(internal(format!("the device loop returned {} latent values, expected {}", out.len(), xs.len())));
                }
                xs.copy_from_slice(&out);
            }
            _ => {
                let mut hs = Tensor::F32(hs.into_dyn());
                for step in 0..steps {
                    let t = Tensor::f32(&[rows], vec![timesteps[step]; rows]);
                    let mut inputs = fixed.clone();
                    inputs.extend([("hidden_states", &hs), ("timestep", &t)]);
                    let velocity = self
                        .transformer
                        .run(&inputs)?
                        .take("sample")
                        .ok_or_else(|| internal("transformer returned no `sample`"))?;
                    let velocity = velocity.into_f32().map_err(internal)?;
                    let velocity = velocity.as_standard_layout();
                    let v = velocity.as_slice().ok_or_else(|| internal("velocity not contiguous"))?;
                    let Tensor::F32(h) = &mut hs else { return Err(internal("hidden states are not float32")) };
                    let h = h.as_slice_mut().ok_or_else(|| internal("hidden states not contiguous"))?;
                    step::cfg_euler(shape, v, xs, Some(h), scales, dts[step])?;
                    if let Some(t) = trace.as_deref_mut() {
                        t.latents.push(ArrayD::from_shape_vec(IxDyn(&[b, seq, ch]), xs.to_vec()).map_err(internal)?);
                    }
                }
            }
        }
        let t_loop = t2.elapsed();

        // 4. VAE decoder.
        let t3 = Instant::now();
        let (lh, lw) = sizes.latent_size();
        let mut lat: Array4<f32> = latents::unpack_latents(x.view(), lh, lw).map_err(internal)?;
        sh.stats.denormalize(lat.view_mut()).map_err(internal)?;
        if let Some(t) = trace.as_deref_mut() {
            t.decode_in = Some(lat.clone().into_dyn());
        }
        let decoded = run_one(self.vae_decoder.as_mut(), &[("latent", Tensor::F32(lat.into_dyn()))], "image")?;
        if let Some(t) = trace {
            t.decoded = Some(decoded.clone());
        }
        let (w, h) = sizes.output;
        let want = IxDyn(&[b, 3, h as usize, w as usize]);
        if decoded.raw_dim() != want {
            return Err(internal(format!(
                "vae_decoder returned {:?}, expected {:?}",
                decoded.shape(),
                [b, 3, h as usize, w as usize]
            )));
        }
        let decoded = decoded.as_standard_layout();
        let per = 3 * w as usize * h as usize;
        let flat = decoded.as_slice().ok_or_else(|| internal("decoded image not contiguous"))?;
        let images =
            flat.chunks(per).map(|chw| imaging::postprocess(chw, w, h).map_err(internal)).collect::<Result<Vec<_>, _>>()?;
        let stages = StageTimes { batch: b, text: t_text, vae_encode: t_vae, denoise: t_loop, decode: t3.elapsed() };
        tracing::debug!(?stages, "batch stages");
        self.last_stages = Some(stages);
        Ok(images)
    }
}
