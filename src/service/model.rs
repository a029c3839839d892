//! The model as the service sees it: opened on the engine worker thread (the pipeline never leaves
//! it), its memory probed there (`pipeline::memory`), described for /health and request validation
//! (`ModelInfo`), and the batch runner it gives.

use std::sync::Arc;

use super::work::Reservation;
use crate::batcher::Failure;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::pipeline::{
    EditError, EditOutput, MemoryModel, Pipeline, PipelineInfo, PipelineOptions, Prepared, Preprocessor, StageTimes,
};
use crate::runtime::counters::RunCounters;
use crate::runtime::loader::OrtSettings;

/// What the front ends need to know about the loaded model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelInfo {
    /// The bundle directory as configured.
    pub bundle: String,
    /// The bundle's name (manifest).
    pub name: String,
    /// `edit` or `edit-plus`.
    pub variant: String,
    /// Input images per request (1 for Qwen-Image-Edit).
    pub max_images: usize,
    pub backend: String,
    pub backend_reason: String,
    pub gpu_available: bool,
    pub default_steps: u32,
    pub default_true_cfg_scale: f32,
    pub lightning_enabled: bool,
    /// Whether the bundle has the Lightning LoRA fused into its transformer.
    pub lightning_fused: bool,
    /// Longest prompt (after the system prompt) in tokens.
    pub max_text_tokens: usize,
    /// `device` or `host`: where the denoising loop runs between transformer calls.
    pub denoise_loop: String,
    /// What the transformer computes in (`fp32`, `fp16`, `bf16` or `fp8`).
    pub precision: String,
    /// The bundle's graph dtype (`float32`, ...): the precision of everything but FP8 layers.
    pub dtype: String,
}

/// What the worker hands back once the pipeline is open.
pub struct Loaded {
    pub info: ModelInfo,
    pub preprocessor: Preprocessor,
    /// The output sizes the bundle names (its profiles), for the memory report.
    pub resolutions: Vec<(u32, u32)>,
    /// The measured memory model, or why there is none.
    pub memory: Result<MemoryModel, String>,
    /// The engines' counters (graph captures, replays, ...), for /metrics and /health.
    pub counters: Arc<RunCounters>,
}

/// A queued job: the prepared job and its request's memory, counted until the job is done even
/// when the request has gone.
pub struct Job {
    pub prepared: Prepared,
    pub memory: Option<Reservation>,
}

/// The batch runner: the pipeline, owned by the engine worker thread; `proceed` says whether
/// anyone still waits for the batch (asked at every stage and step).
pub type BatchFn = Box<dyn FnMut(&[Job], &dyn Fn() -> bool) -> Vec<Result<EditOutput, EditError>>>;

impl From<Failure> for EditError {
    fn from(f: Failure) -> EditError {
        match f {
            Failure::TooLarge => EditError::Invalid(f.to_string()),
            f => EditError::Internal(f.to_string()),
        }
    }
}

/// Opens the bundle (call on the engine worker thread); every batch that completes records its
/// stage times in `metrics`.
pub fn open(settings: &Settings, metrics: Arc<Metrics>) -> Result<(BatchFn, Loaded), String> {
    let options = PipelineOptions {
        backend: settings.backend,
        staging_rows: settings.batch_size,
        precision: settings.precision,
        ort: OrtSettings { bf16_as_f32: settings.ort_bf16_as_f32, ..OrtSettings::default() },
        ..PipelineOptions::default()
    };
    let mut pipeline = Pipeline::open(&settings.bundle, &options)
        .map_err(|e| format!("cannot open the model bundle {}: {e}", settings.bundle.display()))?;
    let info = describe(pipeline.info(), settings);
    let preprocessor = pipeline.preprocessor();
    let memory = MemoryModel::probe(&mut pipeline);
    let mut resolutions = pipeline.info().resolutions.clone();
    if resolutions.is_empty() {
        let side = ((pipeline.info().image_area as f64).sqrt() as u32) / 16 * 16;
        resolutions.push((side, side));
    }
    let counters = pipeline.counters();
    counters.reset(); // the memory probe's runs are not served work: /metrics counts requests' work only
    pipeline.take_stages();
    let run: BatchFn = Box::new(move |jobs: &[Job], proceed: &dyn Fn() -> bool| {
        let refs: Vec<&Prepared> = jobs.iter().map(|j| &j.prepared).collect();
        let results = pipeline.run_batch_with(&refs, &|_| proceed());
        if let Some(stages) = pipeline.take_stages() {
            record_stages(&metrics, &stages);
        }
        results
    });
    Ok((run, Loaded { info, preprocessor, resolutions, memory, counters }))
}

/// One completed batch's stages in `qwen_edit_stage_duration_seconds` (one sample per denoising step).
fn record_stages(metrics: &Metrics, s: &StageTimes) {
    metrics.stage("text_encoder", s.batch, s.text);
    metrics.stage("vae_encoder", s.batch, s.vae_encode);
    for step in &s.steps {
        metrics.stage("denoise_step", s.batch, *step);
    }
    metrics.stage("vae_decoder", s.batch, s.decode);
}

fn describe(info: &PipelineInfo, settings: &Settings) -> ModelInfo {
    ModelInfo {
        bundle: settings.bundle.display().to_string(),
        name: info.bundle.clone(),
        variant: info.variant.to_string(),
        max_images: info.max_images.max(1),
        backend: info.backend.to_string(),
        backend_reason: info.backend_reason.clone(),
        gpu_available: info.gpu_available,
        default_steps: if settings.lightning { settings.lightning_steps } else { info.default_steps },
        default_true_cfg_scale: info.default_true_cfg_scale,
        lightning_enabled: settings.lightning,
        lightning_fused: info.lightning_fused,
        max_text_tokens: info.max_text_tokens,
        denoise_loop: info.denoise_loop.to_string(),
        precision: info.precision.to_string(),
        dtype: serde_json::to_value(info.dtype).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
    }
}
